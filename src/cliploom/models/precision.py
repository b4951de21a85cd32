"""Weight storage apart from compute: ``weights: fp8`` keeps the transformers' linear weights in
float8 (e4m3) with one scale per tensor, ComfyUI's ``fp8_scaled`` scheme, and upcasts one layer at
a time for its matmul, through a diffusers hook (the mechanism of diffusers' layerwise casting,
with the scale added: plain e4m3 flushes the small weights of a real DiT to zero).

Loading streams the checkpoint one tensor at a time into an empty model and quantises as it goes,
so host memory holds the fp8 weights plus one tensor, never a full-precision copy: a 14B model
takes ~14 GB instead of ~28 GB (bf16) or ~56 GB (float32). fp8 files keep their own bytes (and
their per-tensor ``scale_weight``). Norms, embeddings, modulation tables and the input / output
projections stay in the compute dtype, as diffusers' layerwise casting leaves them, unless the
file already stores them in fp8.

LoRAs on an fp8 engine stay unfused (peft adapters in the compute dtype beside the fp8 layer):
fusing would need a full-precision copy of every adapted layer.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import CliploomError
from . import formats
from .memory import trim_host_heap

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
SKIP = re.compile(r"(^|\.)(norm\w*|pos_embed|patch_embed\w*|proj_in|proj_out|condition_embedder|scale_shift_table)(\.|$)")


def quantizable(model) -> set[str]:
    """Names of the linear layers whose weights are stored in fp8."""
    return {name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not SKIP.search(name)}


def to_fp8(t: torch.Tensor, scale: torch.Tensor | None = None, what: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``q * scale`` ~ the weight: an fp8 tensor keeps its bytes (and its file's
    scale, else 1); any other is scaled so its largest value maps to e4m3's largest, 448."""
    if t.dtype in formats.FP8_DTYPES:
        q = t if t.dtype == FP8 else t.float().to(FP8)
        if scale is None:
            return q, torch.tensor(1.0)
        s = scale.float()
        if s.numel() == 1:
            return q, s.reshape(())
        if s.shape in ((t.shape[0], 1), (t.shape[0],)):  # per-row scales (some ComfyUI files)
            return q, s.reshape(t.shape[0], *([1] * (t.dim() - 1)))
        raise CliploomError(f"{what} uses a block-wise quantisation scale {tuple(s.shape)} (weight {tuple(t.shape)})",
                            "use an fp8 file with per-tensor or per-row scales, or a bf16/fp16 file")
    x = t.float()
    amax = float(x.abs().max()) if x.numel() else 0.0
    s = amax / FP8_MAX if amax > 0 else 1.0
    return (x / s).to(FP8), torch.tensor(s, dtype=torch.float32)


def _hook_class():
    from diffusers.hooks import ModelHook

    class ScaledFp8Hook(ModelHook):
        """Upcast an fp8 linear layer's weight (times its scale) for the forward pass only."""

        _is_stateful = False

        def __init__(self, compute_dtype: torch.dtype):
            super().__init__()
            self.compute_dtype = compute_dtype

        def pre_forward(self, module, *args, **kwargs):
            q = module.weight.data
            module._cliploom_fp8 = q
            w = q.to(self.compute_dtype)  # one buffer the size of the layer, scaled in place
            module.weight.data = w.mul_(module._cliploom_fp8_scale.to(q.device, self.compute_dtype))
            return args, kwargs

        def post_forward(self, module, output):
            module.weight.data = module._cliploom_fp8
            del module._cliploom_fp8
            return output

    return ScaledFp8Hook


def enable_fp8(model, scales: dict[str, torch.Tensor], compute_dtype: torch.dtype) -> None:
    """Hook every fp8 linear layer of ``model`` (its weight already fp8, its scale in ``scales``)."""
    from diffusers.hooks import HookRegistry

    hook_class = _hook_class()
    modules = dict(model.named_modules())
    for name, scale in scales.items():
        module = modules[name]
        module.register_buffer("_cliploom_fp8_scale", scale.float(), persistent=False)  # scalar or [out, 1]
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook_class(compute_dtype), "cliploom_fp8")
    model._cliploom_compute_dtype = compute_dtype
    model._cliploom_weights = "fp8"


def load_fp8_transformer(files: list[Path], layout: str, config: dict, compute_dtype: torch.dtype, where: str,
                         device: torch.device | str = "cpu", check=None):
    """A WanTransformer3DModel with fp8 linear weights, streamed from safetensors ``files`` (any
    DiT layout ``formats`` reads: diffusers names, original Wan, ComfyUI, fp8 or fp8_scaled)."""
    from diffusers import WanTransformer3DModel

    from .loading import _empty_model

    model = _empty_model(WanTransformer3DModel, config)
    linears = quantizable(model)
    every_linear = {name for name, m in model.named_modules()  # (diffusers casts the timestep to time_embedder's dtype)
                    if isinstance(m, torch.nn.Linear) and not name.startswith("condition_embedder.time_embedder")}
    keep = set(model._keep_in_fp32_modules or []) if compute_dtype in (torch.float16, torch.bfloat16) else set()
    state: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    since_trim = 0
    for f in files:
        for name, raw, scale, key in formats.stream_dit_raw(f, layout):
            since_trim += raw.numel() * raw.element_size()
            if since_trim > 256 << 20:  # the scratch of the checks and casts goes back as we go
                trim_host_heap()
                since_trim = 0
            module = name.rsplit(".", 1)[0]
            # fp8 bytes stay fp8 even in the layers kept in high precision otherwise (upcasting them
            # would cost memory and restore no precision)
            if name.endswith(".weight") and (module in linears or (raw.dtype in formats.FP8_DTYPES and module in every_linear)):
                formats.check_finite({key: raw}, where)
                q, s = to_fp8(raw, scale, f"{where}: {key}")
                state[name], scales[module] = q.to(device), s
            else:
                target = torch.float32 if keep & set(name.split(".")) else compute_dtype
                t = formats.dequantize_one(key, raw, scale, target, where).to(device)
                formats.check_finite({key: t}, where)
                state[name] = t
    if check is not None:
        check(model, state)
    model.load_state_dict(state, strict=True, assign=True)
    enable_fp8(model, scales, compute_dtype)
    trim_host_heap()
    return model.eval().requires_grad_(False)


def fp8_bytes(model) -> int:
    """Bytes the model's parameters take as stored."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
