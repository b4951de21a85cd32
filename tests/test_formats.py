"""File formats: sniffing, layout detection, LoRA normalisation, VAE/DiT renaming against
diffusers' converters and real key names, fp8 dequantisation, and `cliploom inspect`."""

import json

import pytest
import torch
from safetensors.torch import save_file

import real_layouts as RL
from cliploom.errors import CliploomError
from cliploom.models import formats

# One module of each kind, as diffusers names; the LoRA layouts below write them in their own names.
MODULES = ["blocks.0.attn1.to_q", "blocks.0.attn2.add_k_proj", "blocks.1.ffn.net.2", "proj_out",
           "condition_embedder.time_proj", "condition_embedder.image_embedder.ff.net.0.proj"]
LAYOUT_EXAMPLES = {  # the key of blocks.0.attn1.to_q's A matrix in each layout (svi.md section 3)
    "svi1": "pipe.dit.blocks.0.self_attn.q.lora_A.default.weight",
    "svi2": "blocks.0.self_attn.q.lora_A.default.weight",
    "diffusers": "transformer.blocks.0.attn1.to_q.lora_A.weight",
    "comfy": "diffusion_model.blocks.0.self_attn.q.lora_down.weight",
    "kohya": "lora_unet_blocks_0_self_attn_q.lora_down.weight",
}


def lora_tensors(layout, rank=2, alpha=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in MODULES:
        out[RL.lora_keys(layout, m, "down")] = torch.randn(rank, 8, generator=g)
        out[RL.lora_keys(layout, m, "up")] = torch.randn(8, rank, generator=g)
        if alpha is not None:
            out[RL.lora_keys(layout, m, "alpha")] = torch.tensor(float(alpha))
    return out


def test_sniff_tells_safetensors_from_pickles(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    torch.save({"a": torch.zeros(2)}, tmp_path / "x.pt")
    (tmp_path / "x.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 16)
    (tmp_path / "x.txt").write_text("hello world, not weights")
    assert formats.sniff(tmp_path / "x.safetensors") == "safetensors"
    assert formats.sniff(tmp_path / "x.pt") == "zip"
    assert formats.sniff(tmp_path / "x.gguf") == "gguf"
    assert formats.sniff(tmp_path / "x.txt") == "unknown"
    with pytest.raises(CliploomError, match="GGUF"):
        formats.check_safetensors(tmp_path / "x.gguf")
    with pytest.raises(CliploomError, match="is a folder"):
        formats.check_safetensors(tmp_path)


@pytest.mark.parametrize("layout", list(LAYOUT_EXAMPLES))
def test_every_lora_layout_is_detected_and_normalised_to_the_same_update(tmp_path, layout):
    alpha = {"comfy": 4.0, "kohya": 1.0}.get(layout)
    tensors = lora_tensors(layout, alpha=alpha)
    assert LAYOUT_EXAMPLES[layout] in tensors  # the writer uses the real key names
    assert formats.detect_lora_layout(tensors) == layout
    save_file(tensors, str(tmp_path / "l.safetensors"))
    lora = formats.read_lora(tmp_path / "l.safetensors")
    assert lora.layout == layout and sorted(lora.modules) == sorted(MODULES) and not lora.ignored
    reference = lora_tensors("diffusers")
    scale = (alpha or 2) / 2  # rank 2; no alpha means scale 1
    sd = lora.peft_state_dict()
    for m in MODULES:
        a, b = reference[f"transformer.{m}.lora_A.weight"], reference[f"transformer.{m}.lora_B.weight"]
        assert torch.allclose(sd[f"{m}.lora_B.weight"] @ sd[f"{m}.lora_A.weight"], scale * b @ a, atol=1e-6)


def test_lightx2v_diff_m_is_the_modulation_delta(tmp_path):
    tensors = lora_tensors("comfy", rank=2)
    tensors["diffusion_model.blocks.1.diff_m"] = torch.ones(1, 6, 8)
    tensors["diffusion_model.blocks.1.cross_attn.norm_k_img.diff"] = torch.ones(8)
    save_file(tensors, str(tmp_path / "lx.safetensors"))
    lora = formats.read_lora(tmp_path / "lx.safetensors")
    assert lora.modules["blocks.1.scale_shift_table"].is_param
    assert torch.equal(lora.modules["blocks.1.scale_shift_table"].diff, torch.ones(1, 6, 8))
    assert "blocks.1.attn2.norm_added_k" in lora.deltas()


def test_kohya_names_cover_every_wan_module():
    forward, _ = formats.name_tables(2)
    modules = {formats._module_of(k) for k in forward}
    for module in modules:
        kohya = module.replace(".", "_")
        assert formats._kohya_module(kohya) == module, module


def test_peft_alpha_from_adapter_config_metadata_and_rslora(tmp_path):
    tensors = lora_tensors("diffusers", rank=4)
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file({k.replace("transformer.", "base_model.model."): v for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "alpha_pattern": {"proj_out": 2}}))
    lora = formats.read_lora(folder / "adapter_model.safetensors")
    assert lora.modules["blocks.0.attn1.to_q"].scale == 2.0 and lora.modules["proj_out"].scale == 0.5
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8, "use_rslora": True})}
    save_file(tensors, str(tmp_path / "rs.safetensors"), metadata=meta)
    assert formats.read_lora(tmp_path / "rs.safetensors").modules["proj_out"].scale == 4.0  # 8 / sqrt(4)


def test_lora_bias_is_scaled_like_the_pair_but_diff_b_is_not(tmp_path):
    tensors = lora_tensors("diffusers", rank=2)
    tensors["transformer.proj_out.lora_B.bias"] = torch.ones(8)
    meta = {"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": 6})}
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata=meta)
    assert torch.equal(formats.read_lora(tmp_path / "b.safetensors").modules["proj_out"].bias_delta(), torch.full((8,), 3.0))
    comfy = lora_tensors("comfy", rank=2, alpha=6)
    comfy["diffusion_model.head.head.diff_b"] = torch.ones(8)
    save_file(comfy, str(tmp_path / "c.safetensors"))
    assert torch.equal(formats.read_lora(tmp_path / "c.safetensors").modules["proj_out"].bias_delta(), torch.ones(8))


def test_wan21_vae_renaming_agrees_with_diffusers_converter_on_the_real_architecture():
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from cliploom.models.loading import _empty_model, load_family

    vae = _empty_model(AutoencoderKLWan, load_family("wan21-i2v-14b-480p")["vae"])
    keys = list(vae.state_dict())
    original = RL.vae_keys_to_original(keys, nested=False)
    ours = formats.vae21_to_diffusers_names(original.values())
    theirs = convert_wan_vae_to_diffusers({o: o for o in original.values()})
    assert {o: d for d, o in original.items()} == ours
    assert {o: d for d, o in theirs.items()} == ours
    assert "decoder.upsamples.3.resample.1.weight" in ours  # the first decoder stage's upsampler


def test_wan22_vae_renaming_matches_real_wan22_key_names():
    from diffusers import AutoencoderKLWan

    from cliploom.models.loading import _empty_model, load_family

    vae = _empty_model(AutoencoderKLWan, load_family("wan22-ti2v-5b")["vae"])
    keys = list(vae.state_dict())
    original = RL.vae_keys_to_original(keys, nested=True)
    assert formats.vae22_to_diffusers_names(original.values()) == {o: d for d, o in original.items()}
    # Key names of the released Wan2.2_VAE (ComfyUI's and others' detection probes).
    for probe in ("decoder.upsamples.0.upsamples.0.residual.2.weight", "decoder.upsamples.0.upsamples.3.time_conv.weight",
                  "decoder.upsamples.2.upsamples.3.resample.1.weight", "encoder.downsamples.0.downsamples.2.resample.1.weight",
                  "encoder.downsamples.3.downsamples.1.residual.6.weight", "decoder.middle.0.residual.0.gamma"):
        assert probe in original.values(), probe
    assert formats.detect_vae_layout(original.values()) == "wan22"
    assert formats.detect_vae_layout(RL.vae_keys_to_original(keys, nested=False).values()) == "wan21"


def test_dit_layouts_are_detected_across_shards():
    keys = ["blocks.0.self_attn.q.weight", "blocks.0.ffn.0.weight"]
    assert formats.detect_dit_layout(keys) == "wan"
    assert formats.detect_dit_layout(["model.diffusion_model." + k for k in keys]) == "comfy"
    assert formats.detect_dit_layout(["blocks.3.attn1.to_q.weight"]) == "diffusers"
    assert formats.detect_dit_layout(["encoder.block.0.layer.0.SelfAttention.q.weight"]) is None


@pytest.mark.parametrize("name, expert", [
    ("SVI_v2_PRO_Wan2.2-I2V-A14B_HIGH_lora_rank_128_fp16.safetensors", "high"),
    ("wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors", "low"),
    ("Wan2.2-Lightning_I2V-A14B-4steps-lora_LOW_fp16.safetensors", "low"),
    ("high_noise_model/diffusion_pytorch_model-00001-of-00006.safetensors", "high"),
    ("lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors", None),
    ("slow_motion_lowres_highlights.safetensors", None),
])
def test_expert_from_name(name, expert):
    assert formats.expert_from_name(name) == expert


def test_dequantize_scales_and_refuses_block_scales():
    w = torch.randn(4, 6)
    scale = w.abs().max() / 448
    q = (w / scale).to(torch.float8_e4m3fn)
    out = formats.dequantize({"a.weight": q, "a.scale_weight": scale.reshape(1), "scaled_fp8": torch.zeros(0)},
                             torch.float32, "x")
    assert set(out) == {"a.weight"} and torch.equal(out["a.weight"], q.float() * scale)
    rows = torch.rand(4, 1) + 0.5
    out = formats.dequantize({"a.weight": q, "a.weight_scale": rows}, torch.float32, "x")
    assert torch.equal(out["a.weight"], q.float() * rows)
    with pytest.raises(CliploomError, match="block-wise quantisation scale"):
        formats.dequantize({"a.weight": q, "a.weight_scale": torch.ones(2, 3)}, torch.float32, "x")


# -- cliploom inspect ------------------------------------------------------------------------------


def run_inspect(capsys, *args):
    from cliploom.cli import main

    code = main(["inspect", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_inspect_lora(tmp_path, capsys):
    tensors = lora_tensors("comfy", rank=2, alpha=1.0)
    tensors["diffusion_model.blocks.0.norm3.diff"] = torch.zeros(8)
    tensors["dwpose_embedding.0.weight"] = torch.zeros(3)
    path = tmp_path / "Wan2.2-I2V-A14B_HIGH_style.safetensors"
    save_file({k: v.half() for k, v in tensors.items()}, str(path))
    code, out, _ = run_inspect(capsys, path)
    assert code == 0
    assert "LoRA, ComfyUI / LightX2V" in out and "rank 2, alpha 1, scale 0.5" in out and "dtype float16" in out
    assert "7 modules (6 low-rank pairs, 1 full deltas)" in out and "blocks.{0}.self_attn.q" in out
    assert "head.head" in out and "expert: high (from the name)" in out
    assert "not applied: 1 key(s), e.g. dwpose_embedding.0.weight" in out
    code, out, _ = run_inspect(capsys, path, "--json")
    info = json.loads(out)
    assert info["kind"] == "lora" and info["layout"] == "comfy" and info["ranks"] == [2] and info["alphas"] == [1.0]
    assert info["expert"] == "high" and info["size"] == path.stat().st_size


def test_inspect_lora_names_the_families_its_shapes_fit(tmp_path, capsys):
    """A LoRA at the real 14B width (rank 1 keeps the file small) with Wan 2.1's image attention."""
    t = {}
    for i in (0, 39):
        t[f"blocks.{i}.self_attn.q.lora_A.default.weight"] = torch.zeros(1, 5120, dtype=torch.float16)
        t[f"blocks.{i}.self_attn.q.lora_B.default.weight"] = torch.zeros(5120, 1, dtype=torch.float16)
        t[f"blocks.{i}.ffn.0.lora_A.default.weight"] = torch.zeros(1, 5120, dtype=torch.float16)
        t[f"blocks.{i}.ffn.0.lora_B.default.weight"] = torch.zeros(13824, 1, dtype=torch.float16)
    save_file(t, str(tmp_path / "svi.safetensors"))
    info = json.loads(run_inspect(capsys, tmp_path / "svi.safetensors", "--json")[1])
    assert info["families"] == ["wan21-flf2v-14b-720p", "wan21-i2v-14b-480p", "wan21-i2v-14b-720p", "wan22-i2v-a14b"]
    t["blocks.0.cross_attn.k_img.lora_A.default.weight"] = torch.zeros(1, 5120, dtype=torch.float16)
    t["blocks.0.cross_attn.k_img.lora_B.default.weight"] = torch.zeros(5120, 1, dtype=torch.float16)
    save_file(t, str(tmp_path / "svi21.safetensors"))
    info = json.loads(run_inspect(capsys, tmp_path / "svi21.safetensors", "--json")[1])
    assert info["families"] == ["wan21-flf2v-14b-720p", "wan21-i2v-14b-480p", "wan21-i2v-14b-720p"]


def test_inspect_base_files_and_folders(tiny_dirs, tmp_path, capsys):
    folder = RL.write_original(tiny_dirs["wan22"], tmp_path / "a14b", layout="comfy", experts_in_folders=False,
                               fp8="scaled")
    code, out, _ = run_inspect(capsys, folder / "wan2.2_i2v_high_noise_14B_tiny.safetensors")
    assert code == 0 and "DiT (base transformer), ComfyUI" in out and "2 blocks, width 24" in out
    assert "fp8 with per-tensor scales" in out and "expert: high-noise" in out and "fits: no shipped family" in out
    code, out, _ = run_inspect(capsys, folder / "Wan2.1_VAE.safetensors")
    assert "VAE, original Wan 2.1 VAE" in out and "z_dim 16" in out and "wan22-i2v-a14b" in out
    code, out, _ = run_inspect(capsys, folder)
    assert code == 0 and "folder of 3 safetensors file(s)" in out and "no shipped family has 2 blocks of width 24" in out
    code, out, _ = run_inspect(capsys, tiny_dirs["wan21"])
    assert "diffusers WanImageToVideoPipeline folder, 1 transformer(s)" in out and f"--model {tiny_dirs['wan21']}" in out
    code, out, _ = run_inspect(capsys, tiny_dirs["wan21"] / "text_encoder" / "model.safetensors")
    assert "text encoder" in out


def test_inspect_folder_names_the_family_that_loads_it(tiny_dirs, tmp_path, capsys, monkeypatch):
    """With the tiny model's family among the known ones, a folder of its original files is
    recognised and the printed --model/--family line loads it."""
    from cliploom.models import inspect, loading

    configs = tmp_path / "configs"
    configs.mkdir()
    folder = RL.write_original(tiny_dirs["wan22"], tmp_path / "A14B-tiny", shards=2)
    (configs / "tiny-a14b.json").write_text(RL.family_path(folder).read_text())
    monkeypatch.setattr(loading, "FAMILY_DIR", configs)
    inspect._families.cache_clear()
    try:
        code, out, _ = run_inspect(capsys, folder)
        assert code == 0 and "fits: tiny-a14b" in out and f"load with: --model {folder} --family tiny-a14b" in out
        assert "high_noise_model/diffusion_pytorch_model-00001-of-00002.safetensors" in out
        model = loading.load_model(folder, device="cpu", family="tiny-a14b")
        assert model.settings.family == "A14B-tiny" and model.transformer_2 is not None
    finally:
        inspect._families.cache_clear()


def test_inspect_errors_are_one_line(tmp_path, capsys):
    code, _, err = run_inspect(capsys, tmp_path / "missing.safetensors")
    assert code == 2 and err.strip().startswith("error:") and "does not exist" in err and len(err.strip().splitlines()) == 1
    torch.save({"a": torch.zeros(1)}, tmp_path / "w.ckpt")
    code, _, err = run_inspect(capsys, tmp_path / "w.ckpt")
    assert code == 2 and "pickle" in err
