"""The trained LoRA: attached with peft, read and written as plain tensors.

Inside the trainer the LoRA is a peft adapter named ``default`` on a diffusers
``WanTransformer3DModel``; its state is ``{<diffusers module>.lora_A.weight: A, ...lora_B.weight: B}``
in float32 with the update ``W += (alpha / rank) * B @ A``.
"""

from __future__ import annotations

import torch

from ..errors import CliploomError
from .config import TrainConfig

ADAPTER = "default"


def attach_lora(transformer, cfg: TrainConfig, seed: int = 0) -> list[torch.nn.Parameter]:
    """Freeze ``transformer``, add a LoRA per ``cfg`` and return its (float32) parameters."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=cfg.diffusers_targets,
        init_lora_weights=True if cfg.init == "kaiming" else "gaussian",
    )
    torch.manual_seed(seed)  # the same initial A on every process
    try:
        transformer.add_adapter(config, adapter_name=ADAPTER)
    except ValueError as e:
        raise CliploomError(
            f"LoRA targets {cfg.targets} match no layer of this transformer ({str(e).splitlines()[0]})",
            "use SVI names (q, k, v, o, ffn.0, ffn.2) or diffusers names (to_q, ffn.net.2, ...)",
        ) from None
    params = []
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
    return params


def lora_state(transformer) -> dict[str, torch.Tensor]:
    """The adapter's tensors by diffusers module name (``...to_q.lora_A.weight``), float32, on the CPU."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def load_lora_state(transformer, state: dict[str, torch.Tensor]) -> None:
    """Put saved adapter tensors back (the adapter must already be attached with the same shape)."""
    own = dict(transformer.named_parameters())
    missing = []
    for key, value in state.items():
        name = key.replace(".lora_A.weight", f".lora_A.{ADAPTER}.weight").replace(
            ".lora_B.weight", f".lora_B.{ADAPTER}.weight"
        )
        param = own.get(name)
        if param is None or param.shape != value.shape:
            missing.append(key)
            continue
        with torch.no_grad():
            param.copy_(value.to(param))
    expected = sum(1 for n in own if f".{ADAPTER}." in n and "lora_" in n)
    if missing or expected != len(state):
        raise CliploomError(
            f"the saved LoRA does not fit this model ({len(missing)} tensors do not match, "
            f"{expected} expected, {len(state)} saved)",
            "resume with the same model, rank and targets it was trained with",
        )
