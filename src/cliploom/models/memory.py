"""Memory options for small GPUs: offloading and VAE tiling. None of them changes the frames."""

from __future__ import annotations

from ..errors import CliploomError


def apply_memory_options(model, offload: str | None = None, vae_tiling: bool = False) -> None:
    """Offload model parts to the CPU between uses and/or decode the VAE in tiles."""
    pipe = model.pipe
    if vae_tiling:
        model.vae.enable_tiling()
    else:
        model.vae.disable_tiling()
    if offload in (None, "none"):
        return
    if model.device.type != "cuda":
        raise CliploomError(f"offload {offload!r} needs a CUDA device, the model is on {model.device}", "drop offload")
    if offload == "model":
        pipe.enable_model_cpu_offload(device=model.device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=model.device)
    elif offload == "group":
        import torch

        for module in (model.transformer, model.transformer_2):
            if module is not None:
                module.enable_group_offload(
                    onload_device=model.device, offload_device=torch.device("cpu"), offload_type="block_level",
                    num_blocks_per_group=1,
                )
    else:
        raise CliploomError(f"unknown offload {offload!r}", "use none, model, group or sequential")
