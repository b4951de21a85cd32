"""Speed options, all diffusers' or torchao's own: the attention backend, regional compilation of
the repeated transformer blocks, and fp8 matmuls on GPUs with fp8 tensor cores.

* ``attention``: a name of diffusers' attention dispatcher (``set_attention_backend``), by the
  names users know: ``sdpa`` (PyTorch's scaled_dot_product_attention, diffusers' ``native``),
  ``flash`` (flash-attn 2), ``flash3`` (flash-attn 3), ``sage`` (SageAttention), ``xformers``,
  ``flex``, ``cudnn``, ``efficient``, ``math``; ``auto`` takes the fastest one installed for the
  device. Backends that download kernels at run time (diffusers' ``*_hub``) are not offered.
* ``compile``: ``compile_repeated_blocks`` (torch.compile of one transformer block, reused by all
  40): compiled once, on the first clip; the shapes of a story's clips never change, so later
  clips never recompile. The engine reports the compile time apart from the clips' times.
* ``fp8_matmul``: torchao's ``Float8DynamicActivationFloat8WeightConfig`` (fp8 weights and
  dynamically scaled fp8 activations) on the transformers' linear layers; needs CUDA with compute
  capability 8.9 or newer and ``pip install torchao``. LoRAs are fused into the high-precision
  weights first (the quantised layers cannot take adapters).
"""

from __future__ import annotations

import torch

from ..errors import CliploomError

# user name -> diffusers AttentionBackendName value
ATTENTION = {
    "sdpa": "native",
    "flash": "flash",
    "flash3": "_flash_3",
    "sage": "sage",
    "xformers": "xformers",
    "flex": "flex",
    "cudnn": "_native_cudnn",
    "efficient": "_native_efficient",
    "math": "_native_math",
}
AUTO_ORDER_CUDA = ("flash3", "flash", "sage", "sdpa")


def installed_attention(device: torch.device) -> list[str]:
    """The backends of :data:`ATTENTION` whose packages (and device) are there."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    out = []
    for name, value in ATTENTION.items():
        if device.type != "cuda" and name not in ("sdpa", "math", "flex"):
            continue  # the others are CUDA kernels
        try:
            _check_attention_backend_requirements(AttentionBackendName(value))
        except (RuntimeError, ValueError, ImportError):
            continue
        out.append(name)
    return out


def resolve_attention(name: str | None, device: torch.device) -> str:
    """The backend a story's ``attention`` means on ``device`` (``auto``: the fastest installed)."""
    available = installed_attention(device)
    if name in (None, "auto"):
        if device.type == "cuda":
            return next((n for n in AUTO_ORDER_CUDA if n in available), "sdpa")
        return "sdpa"
    if name not in ATTENTION:
        raise CliploomError(f"unknown attention backend {name!r}", f"use auto or one installed here: {', '.join(available)}")
    if name not in available:
        raise CliploomError(f"attention backend {name!r} is not installed or does not run on {device.type}",
                            f"use auto or one installed here: {', '.join(available)}")
    return name


def set_attention(model, name: str) -> None:
    # Always set, never reset: diffusers' reset_attention_backend() clears each processor's backend
    # but leaves the process-wide active backend, so attention after flex -> "sdpa" stayed flex.
    for transformer in _transformers(model):
        transformer.set_attention_backend(ATTENTION[name])
    model._cliploom_attention = name


def compile_blocks(model) -> None:
    """Regional compilation of every transformer's repeated blocks (once per engine)."""
    if getattr(model, "_cliploom_compiled", False):
        return
    for transformer in _transformers(model):
        transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
    model._cliploom_compiled = True


def quantize_fp8_matmul(model) -> None:
    """torchao fp8 weights and activations on the transformers' linear layers (CUDA, sm 8.9+)."""
    if getattr(model, "_cliploom_fp8_matmul", False):
        return
    device = model.device
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise CliploomError("fp8 matmuls need a CUDA GPU with fp8 tensor cores (compute capability 8.9+: L4, "
                            "RTX 40xx, H100, H200)", "drop fp8_matmul; --weights fp8 still halves the weights' memory")
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_
    except ImportError:
        raise CliploomError("fp8 matmuls need torchao", "pip install torchao (cliploom[gpu])") from None
    for transformer in _transformers(model):
        quantize_(transformer, Float8DynamicActivationFloat8WeightConfig())
    model._cliploom_fp8_matmul = True


def _transformers(model):
    return [t for t in (model.transformer, model.transformer_2) if t is not None]
