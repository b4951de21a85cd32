"""LoRA stacks: several LoRAs, each with a weight and a target expert, applied through peft.

This first version loads the layouts diffusers already converts (diffusers/peft, ComfyUI
``diffusion_model.``, kohya ``lora_unet_``); ``models/formats`` normalises the rest.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CliploomError


class LoraStack:
    """The LoRAs applied to a model; re-applying the same stack is free."""

    def __init__(self, model, fuse: bool = True):
        self.model = model
        self.fuse = fuse
        self.applied: list = []
        self.reports: list[dict] = []

    def apply(self, specs, fuse: bool = True) -> None:
        specs = list(specs)
        key = [(str(s.path), s.weight, s.expert) for s in specs]
        if key == [(str(s.path), s.weight, s.expert) for s in self.applied]:
            return
        if self.applied:
            raise CliploomError("this engine already carries another LoRA stack", "load a new Engine for it")
        from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin
        from safetensors.torch import load_file

        for i, spec in enumerate(specs):
            path = Path(spec.path)
            if path.suffix != ".safetensors" or not path.is_file():
                raise CliploomError(f"LoRA {path} is not a .safetensors file", "convert it to safetensors")
            state = WanLoraLoaderMixin.lora_state_dict(load_file(path))
            name = f"lora{i}_{path.stem}"
            targets = {"both": ["transformer", "transformer_2"], "high": ["transformer"], "low": ["transformer_2"]}
            for attr in targets[spec.expert]:
                module = getattr(self.model.pipe, attr)
                if module is None:
                    continue
                module.load_lora_adapter(dict(state), adapter_name=name, prefix="transformer")
                module.set_adapters([name], weights=[spec.weight])
            self.reports.append({"path": str(path), "weight": spec.weight, "expert": spec.expert})
        self.applied = specs

    def set_clip_weights(self, weights: dict[str, float] | None) -> None:
        """Per-clip LoRA weights by name (unfused stacks only); None restores the stack's weights."""
        raise CliploomError("per-clip LoRA weights are not supported yet", "remove `loras:` from the clips")

    def summary(self) -> list[dict]:
        return list(self.reports)
