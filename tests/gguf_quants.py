"""Writing tiny GGUF DiT files as city96 / QuantStack publish them (original Wan key names, 2-D
weights quantised, the rest F32), for the tests. gguf-py quantises Q8_0 and Q5_0 itself but not
the K-quants, so Q4_K and Q5_K blocks are packed here in ggml's layout (a plain min/scale fit per
32-value sub-block, not llama.cpp's search); gguf-py's own dequantiser is the reference that
checks the packing (`test_k_quant_packing_matches_gguf`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

QK = 256  # values per K-quant super-block


def _subblock_fit(x: np.ndarray, levels: int):
    """Per 32-value sub-block: scale and min so that x ~ q * scale - min, q in 0..levels."""
    sub = x.reshape(-1, 8, 32)
    lo = np.minimum(sub.min(axis=2), 0.0)
    hi = sub.max(axis=2)
    scale = np.maximum(hi - lo, 1e-8) / levels
    return sub, scale, -lo  # mins stored as positive offsets


def _pack_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """ggml's 12-byte packing of 8 six-bit scales and 8 six-bit mins per super-block."""
    n = sc.shape[0]
    out = np.zeros((n, 12), np.uint8)
    for j in range(4):
        out[:, j] = sc[:, j] & 63
        out[:, j + 4] = mn[:, j] & 63
    for j in range(4, 8):
        out[:, j + 4] = (sc[:, j] & 0xF) | ((mn[:, j] & 0xF) << 4)
        out[:, j - 4] |= (sc[:, j] >> 4) << 6
        out[:, j] |= (mn[:, j] >> 4) << 6
    return out


def _k_quant(rows: np.ndarray, bits: int) -> np.ndarray:
    levels = (1 << bits) - 1
    x = rows.astype(np.float32).reshape(-1, QK)
    sub, scale, mins = _subblock_fit(x, levels)
    d = scale.max(axis=1) / 63.0
    dmin = mins.max(axis=1) / 63.0
    d = np.where(d > 0, d, 1e-8).astype(np.float16)
    dmin = np.where(dmin > 0, dmin, 1e-8).astype(np.float16)
    sc = np.clip(np.rint(scale / d.astype(np.float32)[:, None]), 1, 63).astype(np.uint8)
    mn = np.clip(np.rint(mins / dmin.astype(np.float32)[:, None]), 0, 63).astype(np.uint8)
    eff_scale = sc * d.astype(np.float32)[:, None]
    eff_min = mn * dmin.astype(np.float32)[:, None]
    q = np.clip(np.rint((sub + eff_min[..., None]) / eff_scale[..., None]), 0, levels).astype(np.uint8).reshape(-1, QK)
    n = x.shape[0]
    qs = np.zeros((n, 128), np.uint8)
    qh = np.zeros((n, 32), np.uint8)
    for g in range(4):
        lo, hi = q[:, 64 * g: 64 * g + 32], q[:, 64 * g + 32: 64 * g + 64]
        qs[:, 32 * g: 32 * g + 32] = (lo & 0xF) | ((hi & 0xF) << 4)
        if bits == 5:
            qh |= ((lo >> 4) & 1) << (2 * g)
            qh |= ((hi >> 4) & 1) << (2 * g + 1)
    head = np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), _pack_scales(sc, mn)], axis=1)
    parts = [head, qh, qs] if bits == 5 else [head, qs]
    return np.concatenate(parts, axis=1).reshape(rows.shape[0], -1)


def quantize(array: np.ndarray, kind: str) -> tuple[np.ndarray, object]:
    """``(bytes, GGMLQuantizationType)`` of a 2-D float array in ``kind`` (Q8_0, Q5_0, Q5_K, Q4_K)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize as gguf_quantize

    qtype = getattr(Q, kind)
    if kind in ("Q4_K", "Q5_K"):
        return _k_quant(array, 4 if kind == "Q4_K" else 5), qtype
    return gguf_quantize(array.astype(np.float32), qtype), qtype


def block_size(kind: str) -> int:
    return QK if kind.endswith("_K") else 32


def write_gguf(state: dict, path: Path, kind: str, to_original) -> Path:
    """A GGUF DiT: every 2-D weight whose rows fit ``kind``'s blocks quantised, the rest F32."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="wan")
    for key, value in state.items():
        a = value.float().numpy()
        name = to_original(key)
        if a.ndim == 2 and a.shape[1] % block_size(kind) == 0:
            data, qtype = quantize(a, kind)
            writer.add_tensor(name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(name, a.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
