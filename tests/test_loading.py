"""Base models from original Wan / ComfyUI files with a family config: the same weights and frames
as from the diffusers folder, every dtype, the shipped family configs, and every loading error."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import real_layouts as RL
from compare import assert_same_clips
from cliploom.engine import Engine
from cliploom.errors import CliploomError
from cliploom.models import load_model
from cliploom.models.loading import family_names, load_family


def clips(model, story):
    return list(Engine(model).generate(story, progress=False))


def states(model):
    return {a: getattr(model.pipe, a).state_dict() for a in ("transformer", "transformer_2", "vae")
            if getattr(model.pipe, a) is not None}


def assert_same_weights(a, b):
    sa, sb = states(a), states(b)
    assert sa.keys() == sb.keys()
    for part in sa:
        assert sa[part].keys() == sb[part].keys(), part
        for k in sa[part]:
            assert sa[part][k].dtype == sb[part][k].dtype and torch.equal(sa[part][k], sb[part][k]), (part, k)


CASES = {
    "wan21-original-single": ("wan21", dict(layout="wan")),
    "wan21-original-sharded": ("wan21", dict(layout="wan", shards=3)),
    "wan21-comfy": ("wan21", dict(layout="comfy", vae_prefix="first_stage_model.")),
    "wan22-expert-folders-sharded": ("wan22", dict(layout="wan", shards=2)),
    "wan22-comfy-named-files": ("wan22", dict(layout="comfy", experts_in_folders=False)),
    "ti2v-original-wan22-vae": ("ti2v", dict(layout="wan")),
}


_REFERENCE_FRAMES: dict = {}  # frames of each diffusers-folder model, computed once


@pytest.mark.parametrize("case", list(CASES))
def test_original_layouts_give_the_same_weights_and_frames(tiny_dirs, tiny_story, tmp_path, case):
    variant, kw = CASES[case]
    folder = RL.write_original(tiny_dirs[variant], tmp_path / case, **kw)
    model = load_model(folder, device="cpu", family=RL.family_path(folder))
    reference = load_model(tiny_dirs[variant], device="cpu")
    assert_same_weights(model, reference)
    assert model.settings.boundary_ratio == reference.settings.boundary_ratio
    assert model.settings.expand_timesteps == reference.settings.expand_timesteps
    story = tiny_story(1, guidance=1.0)  # 2 steps: both experts of wan22 run
    if variant not in _REFERENCE_FRAMES:
        _REFERENCE_FRAMES[variant] = clips(reference, story)
    # The weights are copies (exact, above); the clips are computed from tensors laid out by another
    # loader, so they agree to rounding (tests/compare.py).
    assert_same_clips(clips(model, story), _REFERENCE_FRAMES[variant])


def test_model_may_be_the_dit_file_itself(tiny_dirs, tmp_path):
    folder = RL.write_original(tiny_dirs["wan21"], tmp_path / "m", layout="comfy")
    model = load_model(folder / "wan_dit.safetensors", device="cpu", family=RL.family_path(folder))
    assert_same_weights(model, load_model(tiny_dirs["wan21"], device="cpu"))
    assert model.path == folder  # encoders (and the text encoder reload) come from the file's folder


@pytest.mark.parametrize("stored", ["bfloat16", "float16", "fp8", "fp8-scaled"])
def test_stored_dtypes_are_upcast(tiny_dirs, tmp_path, stored):
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(stored)
    fp8 = {"fp8": "plain", "fp8-scaled": "scaled"}.get(stored)
    folder = RL.write_original(tiny_dirs["wan21"], tmp_path / "m", layout="comfy", dtype=dtype, fp8=fp8)
    written = load_file(str(folder / "wan_dit.safetensors"))
    assert any(t.dtype == (dtype or torch.float8_e4m3fn) for t in written.values())
    model = load_model(folder, device="cpu", family=RL.family_path(folder))
    state = model.transformer.state_dict()
    for key, value in RL.diffusers_state(tiny_dirs["wan21"], "transformer").items():
        stored_value = written["model.diffusion_model." + RL.dit_key_to_original(key)]
        want = stored_value.float()
        if fp8 == "scaled" and stored_value.dtype == torch.float8_e4m3fn:
            want = want * written["model.diffusion_model." + RL.dit_key_to_original(key)[: -len("weight")] + "scale_weight"]
        # exact: one cast and one float32 multiply per value, correctly rounded on every CPU
        assert state[key].dtype == torch.float32 and torch.equal(state[key], want), key
        assert float((state[key] - value).abs().max()) <= 0.07 * float(value.abs().max()) + 1e-6  # close to the original


def test_bfloat16_compute_keeps_the_same_float32_parts_as_diffusers(tiny_dirs, tmp_path):
    folder = RL.write_original(tiny_dirs["wan21"], tmp_path / "m")
    ours = load_model(folder, device="cpu", dtype=torch.bfloat16, family=RL.family_path(folder))
    theirs = load_model(tiny_dirs["wan21"], device="cpu", dtype=torch.bfloat16)
    assert_same_weights(ours, theirs)
    assert ours.transformer.scale_shift_table.dtype == torch.float32  # diffusers' _keep_in_fp32_modules
    assert ours.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16


def test_shipped_family_configs_build_the_real_architectures():
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from cliploom.models import formats
    from cliploom.models.loading import _empty_model, matching_families

    assert family_names() == ["wan21-flf2v-14b-720p", "wan21-i2v-14b-480p", "wan21-i2v-14b-720p",
                              "wan21-t2v-1.3b-causal", "wan22-i2v-a14b", "wan22-ti2v-5b"]
    sizes = {}
    for name in family_names():
        family = load_family(name)
        dit = _empty_model(WanTransformer3DModel, family["transformer"])
        vae = _empty_model(AutoencoderKLWan, family["vae"])
        sizes[name] = sum(p.numel() for p in dit.parameters()) / 1e9
        assert vae.config.z_dim == (48 if name == "wan22-ti2v-5b" else 16)
        # Real original key names for this size (40 or 30 blocks) map onto this model exactly.
        keys = list(dit.state_dict())
        original = [RL.dit_key_to_original(k) for k in keys]
        assert "blocks.39.self_attn.q.weight" in original or name in ("wan22-ti2v-5b", "wan21-t2v-1.3b-causal")
        renamed = formats.rename_original(original)
        assert sorted(renamed.values()) == sorted(keys)
        sig = formats.config_signature(family["transformer"])
        fits = matching_families(sig)
        assert name in fits and (len(fits) == 2) == name.startswith("wan21-i2v")  # 480P and 720P share weights
        if name.startswith("wan21-flf2v"):
            assert fits == [name]  # the position embedding of its two images tells it from I2V
    assert 16.0 < sizes["wan21-i2v-14b-480p"] < 16.8  # 14B plus the CLIP image cross-attention
    assert 14.0 < sizes["wan22-i2v-a14b"] < 14.6  # per expert
    assert 4.8 < sizes["wan22-ti2v-5b"] < 5.2
    assert 1.3 < sizes["wan21-t2v-1.3b-causal"] < 1.45  # Wan 2.1 T2V 1.3B (30 blocks of 1536)


def test_cli_generates_from_original_files(tiny_dirs, reference_png, tmp_path, capsys):
    from cliploom.cli import main

    folder = RL.write_original(tiny_dirs["wan22"], tmp_path / "m", layout="comfy", experts_in_folders=False)
    out = tmp_path / "v.mp4"
    code = main(["generate", "--model", str(folder), "--family", str(RL.family_path(folder)), "--image",
                 str(reference_png), "--prompt", "a", "--frames", "9", "--steps", "2", "--out", str(out), "-q"])
    assert code == 0 and out.is_file(), capsys.readouterr().err


# -- errors --------------------------------------------------------------------------------------


@pytest.fixture
def original(tiny_dirs, tmp_path):
    def make(variant="wan21", **kw):
        return RL.write_original(tiny_dirs[variant], tmp_path / f"m-{variant}", **kw)

    return make


def load(folder, family=None):
    return load_model(folder, device="cpu", family=family or RL.family_path(folder))


def test_family_errors(tiny_dirs, original, tmp_path):
    with pytest.raises(CliploomError, match="unknown model family 'wan3'.*wan21-i2v-14b-480p, wan21-i2v-14b-720p"):
        load_model(tiny_dirs["wan21"], device="cpu", family="wan3")
    with pytest.raises(CliploomError, match="--family needs --model"):
        load_model(None, device="cpu", family="wan22-i2v-a14b")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"transformer": {}, "vae": {}, "resolution": 480}))
    with pytest.raises(CliploomError, match=r"unknown keys \['resolution'\]"):
        load_family(bad)
    with pytest.raises(CliploomError, match="not a diffusers model folder.*pass --family"):
        load_model(original(), device="cpu")
    with pytest.raises(CliploomError, match="is a diffusers folder; --family is for original"):
        load_model(tiny_dirs["wan21"], device="cpu", family=RL.family_path(original()))


def test_checkpoint_of_another_model_is_named(original, tmp_path):
    folder = original()
    family = json.loads(RL.family_path(folder).read_text())
    family["transformer"]["num_layers"] = 3
    family["name"] = "other"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(family))
    with pytest.raises(CliploomError, match=r"does not fit family other: num_layers 2 \(expected 3\)"):
        load(folder, other)


def test_missing_parts_are_named(original):
    folder = original(shards=2)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(CliploomError, match="has no text_encoder/ folder"):
        load(folder)
    folder = original(shards=2)
    (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CliploomError, match=r"shards \['diffusion_pytorch_model-00002-of-00002.safetensors'\].*missing"):
        load(folder)


def test_incomplete_checkpoint_and_two_checkpoints(original):
    folder = original(layout="comfy")
    dit = folder / "wan_dit.safetensors"
    state = load_file(str(dit))
    save_file({k: v for k, v in state.items() if k != "model.diffusion_model.blocks.1.ffn.2.bias"}, str(dit))
    with pytest.raises(CliploomError, match=r"lacks 1 weight\(s\).*blocks.1.ffn.net.2.bias"):
        load(folder)
    save_file(state, str(dit))
    shutil.copy(dit, folder / "wan_dit_copy.safetensors")
    with pytest.raises(CliploomError, match="holds several DiT checkpoints"):
        load(folder)


def test_pickles_and_nan_are_refused(original):
    folder = original()
    vae = folder / "Wan2.1_VAE.safetensors"
    torch.save(load_file(str(vae)), folder / "Wan2.1_VAE.pth")
    vae.unlink()
    with pytest.raises(CliploomError, match="no VAE safetensors.*Wan2.1_VAE.pth is a PyTorch pickle.*never loads"):
        load(folder)
    with pytest.raises(CliploomError, match="pickle"):
        load(folder / "Wan2.1_VAE.pth")
    folder = original(layout="comfy")
    dit = folder / "wan_dit.safetensors"
    state = load_file(str(dit))
    state["model.diffusion_model.blocks.0.cross_attn.k_img.weight"][0, 0] = float("nan")
    save_file(state, str(dit))
    with pytest.raises(CliploomError, match="blocks.0.cross_attn.k_img.weight holds 1 NaN/Inf value"):
        load(folder)


def test_expert_files_must_say_which_expert(original):
    folder = original("wan22", layout="comfy", experts_in_folders=False)
    for f in folder.glob("*high_noise*.safetensors"):
        f.rename(folder / "wan2.2_i2v_A14B_tiny.safetensors")
    with pytest.raises(CliploomError, match="cannot tell which Wan 2.2 expert wan2.2_i2v_A14B_tiny.safetensors is"):
        load(folder)
