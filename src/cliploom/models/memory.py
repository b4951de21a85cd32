"""Memory options for small GPUs: offloading and VAE tiling, all diffusers' own.

* ``offload="model"``: each model part moves to the GPU when it runs and back to the CPU after
  (diffusers' ``enable_model_cpu_offload``): peak memory is the largest part (one DiT expert).
* ``offload="group"``: the DiT's blocks stream to the GPU one group at a time (diffusers' group
  offloading, with a CUDA stream to overlap transfers); the VAE and text encoder likewise.
* ``offload="sequential"``: every layer streams: the smallest footprint, the slowest. This is
  diffusers' leaf-level group offloading on every part (accelerate's
  ``enable_sequential_cpu_offload`` breaks on UMT5's tied embedding with transformers 5).
* ``vae_tiling``: the VAE encodes/decodes in overlapping spatial tiles (256 px, stride 192,
  blended at the seams). Frames that fit in one tile are decoded exactly as without tiling;
  larger frames differ slightly along the seams (that is what tiling trades for memory).

Offloading never changes the numbers: the same weights run on the same device, only when they
are resident changes (``tests/test_memory.py`` checks identical frames on the CPU, where the
offload device and the compute device coincide). LoRAs are applied before offloading is turned on;
an engine's offload mode is fixed once set. Load with ``Engine.load(..., offload=...)`` (the CLI
does) so that the weights stay in host memory until the hooks are in place.
"""

from __future__ import annotations

import torch

from ..errors import CliploomError

OFFLOAD = ("none", "model", "group", "sequential")


def apply_memory_options(model, offload: str | None = None, vae_tiling: bool = False) -> None:
    """Offload model parts to the CPU between uses and/or run the VAE in tiles."""
    if vae_tiling:
        model.vae.enable_tiling()
    else:
        model.vae.disable_tiling()
    offload = offload or "none"
    if offload not in OFFLOAD:
        raise CliploomError(f"unknown offload {offload!r}", f"use one of {', '.join(OFFLOAD)}")
    current = getattr(model, "_cliploom_offload", "none")
    if offload == current:
        if offload == "none" and not getattr(model, "_cliploom_placed", True):
            model.pipe.to(model.device)  # loaded for offloading, run without: place it now
            model._cliploom_placed = True
        return
    if current != "none":
        raise CliploomError(
            f"offload is already {current!r} on this model; it cannot change to {offload!r}",
            "load a new Engine for another offload mode",
        )
    pipe = model.pipe
    device = model.device
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        from diffusers.hooks import apply_group_offloading

        cpu = torch.device("cpu")
        stream = device.type == "cuda"
        for module in (model.transformer, model.transformer_2):
            if module is not None and offload == "group":
                apply_group_offloading(module, onload_device=device, offload_device=cpu, offload_type="block_level",
                                       num_blocks_per_group=1, use_stream=stream)
            elif module is not None:
                apply_group_offloading(module, onload_device=device, offload_device=cpu, offload_type="leaf_level",
                                       use_stream=stream)
        for module in (pipe.vae, pipe.text_encoder, pipe.image_encoder):
            if module is not None:
                apply_group_offloading(module, onload_device=device, offload_device=cpu, offload_type="leaf_level",
                                       use_stream=stream)
    model._cliploom_offload = offload


# -- what a story needs ------------------------------------------------------------------------------


def estimate_clip_bytes(model, story) -> int:
    """A lower bound on the working memory of one clip of a resolved ``story`` on ``model``,
    besides the weights: the DiT's activations for every token (batch 2 with CFG), the latents,
    the VAE decode (float output and one causal chunk's full-resolution activations) and the
    uint8 frames. Constant in the number of clips: clips never accumulate."""
    F, H, W = story.frames, story.height, story.width
    T = (F - 1) // model.scale_temporal + 1
    h, w = H // model.scale_spatial, W // model.scale_spatial
    batch = 2 if max(story.guidance, story.guidance_low or 1) > 1 else 1
    cfg = model.transformer.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    ph, pw = model.patch
    tokens = T * (h // ph) * (w // pw)
    dit = tokens * batch * (6 * d + cfg.ffn_dim) * 4
    latents = model.z_dim * T * h * w * 4 * 8
    base = getattr(model.vae.config, "base_dim", 96)
    decode = F * H * W * 3 * 4 * 2 + 4 * H * W * base * 4 * 4
    frames = F * H * W * 3 * 2
    return int(dit + latents + decode + frames)


def check_story_fits(model, story) -> None:
    """Refuse, before anything is allocated, a story whose clip cannot fit in this machine's memory."""
    from ..inputs import available_memory, human_bytes

    need = estimate_clip_bytes(model, story)
    if model.device.type == "cuda":
        where, have = f"{model.device}", torch.cuda.get_device_properties(model.device).total_memory
    else:
        where, have = "host memory", available_memory()
    if have is not None and need > have:
        raise CliploomError(
            f"one {story.frames}-frame clip at {story.width}x{story.height} needs at least {human_bytes(need)} of working "
            f"memory, more than the {human_bytes(have)} of {where} available",
            "use fewer frames per clip (and more clips) or a smaller size")


def trim_host_heap() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    Streaming a checkpoint frees thousands of large temporaries of varying sizes; glibc keeps
    such freed blocks in its heap, which on a 14B load grew the process by 1-10 GB of anonymous
    memory at random (measured: benchmarks/bench_fullsize.py). The loaders call this as they go."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None
