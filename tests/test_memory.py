"""Memory options (offload, VAE tiling, text-encoder release) do not change the frames (CPU).

Offload hooks, tiling and a reloaded encoder compute the same clips along another path: they are
compared to rounding (tests/compare.py), not bit for bit."""

import pytest

from compare import assert_same_clips

from cliploom.engine import Engine
from cliploom.errors import CliploomError
from cliploom.models import load_model
from cliploom.story import LoraSpec


def clips(model, story):
    return list(Engine(model).generate(story, progress=False))


def small(tiny_story, **kw):
    """One clip, 2 steps (one per expert on Wan 2.2), no CFG: every part of the model runs once."""
    return tiny_story(1, guidance=1.0, **kw)


_BASELINE: dict = {}


@pytest.fixture
def baseline(tiny_dirs, tiny_story):
    """Clips of the small story without memory options, computed once per variant."""

    def get(variant):
        if variant not in _BASELINE:
            _BASELINE[variant] = clips(load_model(tiny_dirs[variant], device="cpu"), small(tiny_story))
        return _BASELINE[variant]

    return get


@pytest.mark.parametrize("variant", ["wan21", "wan22"])
@pytest.mark.parametrize("offload", ["model", "group", "sequential"])
def test_offload_gives_the_same_frames(tiny_dirs, tiny_story, baseline, offload, variant):
    model = load_model(tiny_dirs[variant], device="cpu")
    assert_same_clips(clips(model, small(tiny_story, offload=offload)), baseline(variant))
    assert model._cliploom_offload == offload
    with pytest.raises(CliploomError, match=f"offload is already '{offload}'"):
        clips(model, small(tiny_story, offload="none"))


def test_release_text_encoder_gives_the_same_frames_and_reloads(tiny_dirs, tiny_story, baseline):
    model = load_model(tiny_dirs["wan21"], device="cpu")
    assert_same_clips(clips(model, small(tiny_story, release_text_encoder=True)), baseline("wan21"))
    assert model.pipe.text_encoder is None
    assert_same_clips(clips(model, small(tiny_story)), baseline("wan21"))  # encoded again from text_encoder/
    assert model.pipe.text_encoder is not None


def test_vae_tiling_gives_the_same_frames_for_frames_within_a_tile(tiny_dirs, tiny_story, baseline):
    from cliploom.models.memory import apply_memory_options

    model = load_model(tiny_dirs["wan21"], device="cpu")
    assert_same_clips(clips(model, small(tiny_story, vae_tiling=True)), baseline("wan21"))
    assert model.vae.use_tiling
    apply_memory_options(model, None, vae_tiling=False)  # what a story without it does
    assert not model.vae.use_tiling


def test_offload_after_fused_and_unfused_loras_gives_the_same_frames(tiny_dirs, tiny_story, tmp_path):
    from test_lora import build_lora, write_lora

    plain = load_model(tiny_dirs["wan21"], device="cpu")
    tensors, _, _ = build_lora(plain, "comfy", alpha=8.0, deltas=True)
    path = write_lora(tmp_path / "lora.safetensors", tensors)
    for fuse in (True, False):
        loras = [LoraSpec(path, 0.6)]
        want = clips(load_model(tiny_dirs["wan21"], device="cpu"), small(tiny_story, loras=loras, fuse_loras=fuse))
        model = load_model(tiny_dirs["wan21"], device="cpu")
        engine = Engine(model)
        got = list(engine.generate(small(tiny_story, loras=loras, fuse_loras=fuse, offload="group"), progress=False))
        assert_same_clips(got, want)
        why = "fused into them" if fuse else "cannot change LoRAs while offload 'group' is on"
        with pytest.raises(CliploomError, match=why):
            list(engine.generate(small(tiny_story, loras=[LoraSpec(path, 0.3)], fuse_loras=False, offload="group")))


def test_unknown_offload_is_an_error(tiny_dirs):
    from cliploom.models.memory import apply_memory_options

    model = load_model(tiny_dirs["wan21"], device="cpu")
    with pytest.raises(CliploomError, match="unknown offload 'disk'"):
        apply_memory_options(model, "disk")


def test_loading_for_offload_defers_placement_and_gives_the_same_frames(tiny_dirs, tiny_story, baseline):
    engine = Engine.load(tiny_dirs["wan22"], device="cpu", offload="group")
    assert engine.model._cliploom_placed is False  # weights wait in host memory for the hooks
    got = list(engine.generate(small(tiny_story, offload="group"), progress=False))
    assert_same_clips(got, baseline("wan22"))
    other = Engine.load(tiny_dirs["wan22"], device="cpu", offload="model")
    got = list(other.generate(small(tiny_story), progress=False))  # the story runs without offload
    assert other.model._cliploom_placed
    assert_same_clips(got, baseline("wan22"))


def test_per_clip_weights_of_full_deltas_are_refused_under_group_offload(tiny_dirs, tiny_story, tmp_path):
    from cliploom.story import ClipSpec
    from test_lora import build_lora, write_lora

    model = load_model(tiny_dirs["wan21"], device="cpu")
    tensors, _, _ = build_lora(model, "comfy", deltas=True)
    path = write_lora(tmp_path / "lx.safetensors", tensors)
    story = small(tiny_story, loras=[LoraSpec(path, 1.0, name="lx")], fuse_loras=False, offload="group")
    story.clips = [ClipSpec("a", lora_weights={"lx": 0.5})]
    with pytest.raises(CliploomError, match="per-clip weights cannot change under offload 'group'"):
        clips(model, story)
