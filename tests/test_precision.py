"""Weight storage apart from compute (issue 13): fp8 with per-tensor scales (models.precision) and
GGUF DiTs (diffusers' GGUF support), against the same model in float32.

The bounds below were measured on these tiny models (2 steps, 2 clips, float32 compute): fp8
(e4m3, 3 mantissa bits: up to 6 % per weight, averaging over each dot product) moved the latents
by 0.4-1.7 % of their norm and the frames by 0.1-0.4 levels on average; GGUF Q8_0 by 0.27 %,
Q5_K by 2.1 %, Q4_K by 3.9 % (their per-weight errors: 0.6 %, 4 %, 8 %). The bounds leave 3-7x
headroom, and each is far below what a broken path gives (a transposed or unscaled weight moves
the latents by their whole norm)."""

from __future__ import annotations

import shutil

import pytest
import torch

import real_layouts as RL
from cliploom.engine import Engine
from cliploom.errors import CliploomError
from cliploom.models import load_model
from cliploom.models.precision import fp8_bytes

FP8_LATENT_REL = 0.05
FP8_FRAME_MEAN = 1.5
GGUF_LATENT_REL = {"Q8_0": 0.02, "Q5_K": 0.10, "Q4_K": 0.20}


def clips(model, story):
    return list(Engine(model).generate(story, progress=False))


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("variant", ["wan21", "wan22", "ti2v"])
def test_fp8_storage_halves_the_weights_and_keeps_the_frames_close(tiny_dirs, tiny_story, variant):
    full = load_model(tiny_dirs[variant], device="cpu")
    fp8 = load_model(tiny_dirs[variant], device="cpu", weights="fp8")
    linear = [m for n, m in fp8.transformer.named_modules() if isinstance(m, torch.nn.Linear) and ".attn1." in n]
    assert linear and all(m.weight.dtype == torch.float8_e4m3fn for m in linear)
    assert fp8_bytes(fp8.transformer) < 0.7 * fp8_bytes(full.transformer)
    story = tiny_story(2, guidance=1.0)
    for a, b in zip(clips(fp8, story), clips(full, story)):
        assert rel(a.latents, b.latents) < FP8_LATENT_REL
        assert float((a.frames.float() - b.frames.float()).abs().mean()) < FP8_FRAME_MEAN
    # the hooks put the fp8 bytes back after every forward: nothing was left upcast
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in linear)


def test_fp8_files_keep_their_bytes_and_scales(tiny_dirs, tmp_path):
    """An fp8_scaled ComfyUI file loads with its own fp8 bytes and scale: weight = q * scale exactly."""
    from safetensors.torch import load_file

    folder = RL.write_original(tiny_dirs["wan21"], tmp_path / "m", layout="comfy", fp8="scaled")
    written = load_file(str(folder / "wan_dit.safetensors"))
    model = load_model(folder, device="cpu", family=RL.family_path(folder), weights="fp8")
    layer = model.transformer.blocks[0].attn1.to_q
    key = "model.diffusion_model.blocks.0.self_attn.q."
    assert torch.equal(layer.weight.data.view(torch.uint8), written[key + "weight"].view(torch.uint8))
    assert float(layer._cliploom_fp8_scale) == float(written[key + "scale_weight"])


def test_fp8_with_a_lora_keeps_it_unfused_and_close(tiny_dirs, tiny_story, tmp_path):
    from test_lora import build_lora, write_lora

    from cliploom.story import LoraSpec

    plain = load_model(tiny_dirs["wan21"], device="cpu")
    tensors, _, _ = build_lora(plain, "comfy", alpha=8.0)
    path = write_lora(tmp_path / "l.safetensors", tensors)
    story = tiny_story(1, guidance=1.0, loras=[LoraSpec(path, 0.7)])
    want = clips(plain, story)
    engine = Engine(load_model(tiny_dirs["wan21"], device="cpu", weights="fp8"))
    got = list(engine.generate(story, progress=False))
    assert not engine.loras.fused  # adapters beside the fp8 layers
    assert rel(got[0].latents, want[0].latents) < FP8_LATENT_REL


def test_gguf_dits_load_through_diffusers_and_stay_close(tiny_dirs, tiny_story, tmp_path):
    """city96-style GGUF DiTs (original key names, Q8_0 / Q5_K / Q4_K weights, the rest F32) in an
    original-format folder, against the same weights unquantised."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from cliploom.models.tiny import tiny_transformer
    from gguf_quants import write_gguf

    # a tiny Wan 2.1 whose DiT rows fit K-quant blocks (256 wide)
    src = tmp_path / "src"
    shutil.copytree(tiny_dirs["wan21"], src)
    old = load_model(src, device="cpu").transformer.config
    dit = tiny_transformer(old.in_channels, old.out_channels, old.text_dim, old.image_dim, seed=5, heads=2, head_dim=128,
                           ffn_dim=256)
    shutil.rmtree(src / "transformer")
    dit.save_pretrained(src / "transformer")
    reference = load_model(src, device="cpu")
    story = tiny_story(1, guidance=1.0)
    want = clips(reference, story)[0].latents
    state = RL.diffusers_state(src, "transformer")
    for kind in ("Q8_0", "Q5_K", "Q4_K"):
        folder = RL.write_original(src, tmp_path / kind)
        for f in folder.glob("diffusion_pytorch_model*.safetensors"):
            f.unlink()
        gguf_path = write_gguf(state, folder / f"wan_dit-{kind}.gguf", kind, RL.dit_key_to_original)
        model = load_model(folder, device="cpu", family=RL.family_path(folder))
        assert model.transformer._cliploom_weights == "gguf"
        # the weights diffusers computes with are gguf-py's own dequantisation of the file
        reader = GGUFReader(str(gguf_path))
        tensor = next(t for t in reader.tensors if t.name == "blocks.0.ffn.2.weight")
        expected = dequantize(tensor.data, tensor.tensor_type).reshape(256, 256)
        from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

        got = dequantize_gguf_tensor(model.transformer.blocks[0].ffn.net[2].weight)
        # diffusers computes d * q - dmin * m in float16, gguf-py in float32: equal to a few fp16 ulp
        # (2^-11) of the block's magnitude (cancellation makes small weights' relative error large)
        bound = 4 * 2.0**-11 * float(np.abs(expected).max())
        np.testing.assert_allclose(got.detach().float().numpy(), expected, rtol=0, atol=bound)
        err = rel(clips(model, story)[0].latents, want)
        print(f"GGUF {kind}: relative latent error {err:.4f}")
        assert err < GGUF_LATENT_REL[kind], kind
    with pytest.raises(CliploomError, match="a GGUF DiT is already quantised"):
        load_model(tmp_path / "Q8_0", device="cpu", family=RL.family_path(tmp_path / "Q8_0"), weights="fp8")


def test_attention_backend_names_and_compile(tiny_dirs, tiny_story, capsys):
    from cliploom.models.acceleration import installed_attention

    model = load_model(tiny_dirs["wan21"], device="cpu")
    assert "sdpa" in installed_attention(model.device)
    with pytest.raises(CliploomError, match=r"attention backend 'flash3' is not installed.*sdpa"):
        clips(model, tiny_story(1, attention="flash3"))
    with pytest.raises(CliploomError, match="unknown attention backend 'turbo'"):
        tiny_story(1, attention="turbo")
    engine = Engine(model)
    story = tiny_story(2, guidance=1.0, attention="math", compile=True, steps=1)
    first, second = list(engine.generate(story, progress=False))
    assert model._cliploom_attention == "math" and model._cliploom_compiled
    assert first.seconds_compile > 0 and second.seconds_compile == 0  # compiled once, before clip 0's steps
    again = list(engine.generate(story, progress=False))
    assert again[0].seconds_compile > 0  # a new story warms up again (nothing recompiles: same shapes)


def test_bf16_compute_runs_although_diffusers_keeps_some_tables_in_float32(tiny_dirs, tiny_story):
    """A GPU's default: bf16 weights, with diffusers' _keep_in_fp32_modules (scale_shift_table, the
    time embedder, ...) left in float32. The inputs must be cast to the compute dtype, not to the
    first parameter's (a kept float32 table): a 14B bf16 model on an H200 failed so."""
    model = load_model(tiny_dirs["wan21"], device="cpu", dtype=torch.bfloat16)
    kept = {p.dtype for n, p in model.transformer.named_parameters() if "scale_shift_table" in n}
    assert kept == {torch.float32} and model.transformer.patch_embedding.weight.dtype == torch.bfloat16
    clip, = clips(model, tiny_story(1, guidance=1.0, steps=1))
    assert torch.isfinite(clip.latents).all()


def test_switching_back_to_sdpa_after_flex_really_uses_sdpa(tiny_dirs, tiny_story):
    """diffusers' reset_attention_backend() leaves its process-wide active backend behind: an engine
    that ran a flex story then an sdpa one kept calling flex (and a compiled sdpa story then failed
    to lower flex on the CPU). Every processor must name the backend the story asked for."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    model = load_model(tiny_dirs["wan21"], device="cpu")
    engine = Engine(model)
    for name, backend in (("flex", AttentionBackendName.FLEX), ("sdpa", AttentionBackendName.NATIVE)):
        list(engine.generate(tiny_story(1, guidance=1.0, attention=name, steps=1), progress=False))
        procs = [m.processor for m in model.transformer.modules() if hasattr(getattr(m, "processor", None), "_attention_backend")]
        assert procs and {p._attention_backend for p in procs} == {backend}, name
        assert _AttentionBackendRegistry._active_backend == backend, name


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_nan_scan_by_bits_agrees_with_the_float_values(dtype):
    """The loaders scan fp8 weights for NaN/Inf by their bytes (no float copy of a 14B model):
    every one of the 256 byte values is judged as its float value is."""
    from cliploom.models.formats import _nonfinite

    for b in range(256):
        one = torch.tensor([b], dtype=torch.uint8).view(dtype)
        assert _nonfinite(one) == int(not torch.isfinite(one.float()).all()), (dtype, b)
    every = torch.arange(256, dtype=torch.uint8).view(dtype).repeat(3)
    assert _nonfinite(every) == 3 * int((~torch.isfinite(torch.arange(256, dtype=torch.uint8).view(dtype).float())).sum())


def test_cli_names_the_storage_and_refuses_bad_speed_options_in_one_line(capsys, tiny_dirs, reference_png, tmp_path):
    from test_cli import run

    base = ["generate", "--image", reference_png, "--prompt", "a", "--frames", "9", "--steps", "1",
            "--model", tiny_dirs["wan21"], "--quiet"]
    out = tmp_path / "v.mp4"
    rc, _, _ = run(capsys, *base, "--weights", "fp8", "--attention", "sdpa", "--out", out)
    assert rc == 0
    import json

    report = json.loads(out.with_suffix(".json").read_text())
    assert report["weights"] == "fp8" and report["attention"] == "sdpa"
    for flags, message in ((["--attention", "flash"], "attention backend 'flash' is not installed"),
                           (["--attention", "nope"], "unknown attention backend 'nope'"),
                           (["--fp8-matmul"], "fp8 matmuls need a CUDA GPU"),
                           (["--fp8-matmul", "--weights", "fp8"], "fp8_matmul quantises bf16 weights itself")):
        rc, _, err = run(capsys, *base, *flags, "--out", tmp_path / "x.mp4")
        lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
        assert rc == 2 and len(lines) == 1 and message in lines[0], (flags, err)
        if "attention" in flags[0]:
            assert "sdpa" in lines[0]  # the installed ones are listed
        assert not (tmp_path / "x.mp4").exists()


def test_fp8_storage_takes_per_row_scales_and_refuses_block_scales(tiny_dirs, tmp_path):
    """Per-row ``scale_weight`` (shape [out, 1]) computes weight = q * scale row by row, the same
    weights the upcasting loader makes; a block-wise scale is a one-line error naming the key."""
    from safetensors.torch import load_file, save_file

    folder = RL.write_original(tiny_dirs["wan21"], tmp_path / "m", layout="comfy", fp8="scaled")
    path = folder / "wan_dit.safetensors"
    state = load_file(str(path))
    key = "model.diffusion_model.blocks.0.self_attn.q."
    rows = state[key + "weight"].shape[0]
    per_row = torch.linspace(0.5, 1.5, rows).reshape(rows, 1) * state[key + "scale_weight"]
    save_file({**state, key + "scale_weight": per_row}, str(path))
    family = RL.family_path(folder)
    fp8 = load_model(folder, device="cpu", family=family, weights="fp8")
    upcast = load_model(folder, device="cpu", family=family)
    layer = fp8.transformer.blocks[0].attn1.to_q
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x), upcast.transformer.blocks[0].attn1.to_q(x), rtol=1e-5, atol=1e-6)
    save_file({**state, key + "scale_weight": torch.ones(rows // 2, 2)}, str(path))
    with pytest.raises(CliploomError, match=r"blocks\.0\.self_attn\.q\.weight uses a block-wise quantisation scale"):
        load_model(folder, device="cpu", family=family, weights="fp8")
