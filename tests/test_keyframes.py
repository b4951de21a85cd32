"""Keyframes (issue 15): end-frame control through ``y`` and the mask (Wan FLF2V's layout), in
every motion mode and model family; validation in one line; stories without keyframes unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cliploom import conditioning as C
from cliploom.engine import Engine
from cliploom.errors import CliploomError
from cliploom.story import ClipSpec, Keyframe, LoraSpec


def test_mask_with_an_end_frame_matches_diffusers_first_last_frame_pipeline(tiny_models):
    """diffusers' WanImageToVideoPipeline with ``last_image`` (FLF2V) marks pixel frames 0 and F-1."""
    model = tiny_models("wan22")
    image = torch.zeros(1, 3, 32, 32)
    _, cond = model.pipe.prepare_latents(image, 1, 16, 32, 32, 17, torch.float32, torch.device("cpu"),
                                         last_image=torch.zeros(1, 3, 32, 32))
    assert torch.equal(cond[:, :4], C.pixel_frame_mask(17, 4, 4, also_known=(16,)))  # 0/1 masks: exact anywhere


def test_latent_mode_y_holds_anchor_motion_zeros_end():
    anchor, motion, end = torch.full((1, 2, 1, 2, 2), 1.0), torch.full((1, 2, 1, 2, 2), 2.0), torch.full((1, 2, 1, 2, 2), 9.0)
    cond = C.latent_condition(anchor, motion, 5, keyframes=((16, end),))
    mask, y = cond.y[:, :4], cond.y[:, 4:]
    assert y[0, 0, :, 0, 0].tolist() == [1.0, 2.0, 0.0, 0.0, 9.0]
    assert mask[0, :, :, 0, 0].T.tolist() == [[1] * 4, [0] * 4, [0] * 4, [0] * 4, [0, 0, 0, 1]]
    plain = C.latent_condition(anchor, motion, 5)  # no keyframes: exactly the condition of before
    assert torch.equal(plain.y[:, 4:, :4], cond.y[:, 4:, :4])  # copies of the inputs: exact
    assert not plain.y[:, :, 4].any() and cond.y[:, :, 4].any()
    assert torch.equal(plain.y[:, 4:], C.latent_motion_y(anchor, motion, 5))  # y is copied tensors: exact
    with pytest.raises(ValueError, match="motion prefix"):
        C.latent_condition(anchor, motion, 5, keyframes=((4, end),))  # latent 1 holds the motion


def test_ti2v_writes_the_end_latent_as_a_clean_frame():
    anchor, end = torch.full((1, 2, 1, 2, 2), 1.0), torch.full((1, 2, 1, 2, 2), 9.0)
    cond = C.latent_condition(anchor, None, 3, expand_timesteps=True, patch=(1, 1), keyframes=((8, end),))
    assert cond.known[0, 0, :, 0, 0].tolist() == [1, 0, 1]
    x = torch.zeros(1, 2, 3, 2, 2)
    assert cond.finish(x)[0, 0, :, 0, 0].tolist() == [1.0, 0.0, 9.0]
    assert cond.timestep(500.0, x)[0].view(3, 4)[:, 0].tolist() == [0.0, 500.0, 0.0]


def test_pixel_modes_put_the_image_in_the_conditioning_video_and_mark_it():
    reference, motion = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 2, 4, 4), 0.5)
    end = torch.full((1, 3, 4, 4), -0.75)
    video = C.pixel_motion_video(reference, motion, 9, 0, keyframes=((8, end),))
    assert torch.equal(video[:, :, 8], end) and torch.equal(video[:, :, :2], motion) and not video[:, :, 2:8].any()  # copies
    latents = torch.zeros(1, 2, 3, 1, 1)
    cond = C.pixel_condition(latents, 9, 2, keyframes=((8, torch.zeros(1, 2, 1, 1, 1)),))
    assert cond.y[0, :4, :, 0, 0].T.tolist() == [[1] * 4, [0] * 4, [0, 0, 0, 1]]
    with pytest.raises(ValueError, match="motion prefix"):
        C.pixel_motion_video(reference, motion, 9, 0, keyframes=((1, end),))


def _image(path, colour):
    Image.fromarray(np.full((64, 64, 3), colour, np.uint8)).save(path)
    return path


@pytest.mark.parametrize("variant,mode", [("wan21", "pro"), ("wan22", "pro"), ("ti2v", "pro"), ("wan21", "film"),
                                          ("wan22", "chain")])
def test_an_end_frame_changes_only_its_clip_and_pulls_it_to_the_image(tiny_models, tiny_story, tmp_path, variant, mode):
    model = tiny_models(variant)
    end = _image(tmp_path / "end.png", (250, 250, 20))
    plain = tiny_story(2, mode=mode, guidance=1.0)
    keyed = tiny_story(2, mode=mode, guidance=1.0,
                       clips=[ClipSpec("prompt 0"), ClipSpec("prompt 1", keyframes=(Keyframe(-1, end),))])
    a = list(Engine(model).generate(plain, progress=False))
    b = list(Engine(model).generate(keyed, progress=False))
    assert torch.equal(a[0].frames, b[0].frames)  # clip 0 has no keyframe: the same path, the same frames
    assert not torch.equal(a[1].latents, b[1].latents)  # clip 1 is conditioned on it


def test_keyframe_guidance_pushes_keyed_clips_along_their_keyframes_pull_only(tiny_models, tiny_story, tmp_path):
    """Keyframe guidance S: each step is ``v(without) + S (v(with) - v(without))``. Clips without a
    keyframe are untouched (the same path: exact); S = 1 is off; a keyed clip moves further from its
    keyframe-free self than plain conditioning moves it (same model, same noise)."""
    model = tiny_models("wan21")
    end = _image(tmp_path / "end.png", (250, 250, 20))
    clips = [ClipSpec("prompt 0"), ClipSpec("prompt 1", keyframes=(Keyframe(-1, end),))]
    free = list(Engine(model).generate(tiny_story(2, guidance=1.0), progress=False))
    keyed = list(Engine(model).generate(tiny_story(2, guidance=1.0, clips=clips), progress=False))
    pushed = list(Engine(model).generate(tiny_story(2, guidance=1.0, clips=clips, keyframe_guidance=3.0), progress=False))
    off = list(Engine(model).generate(tiny_story(2, guidance=1.0, clips=clips, keyframe_guidance=1.0), progress=False))
    assert torch.equal(pushed[0].frames, keyed[0].frames)  # clip 0 has no keyframe
    assert torch.equal(off[1].latents, keyed[1].latents)  # 1 is off: the same path
    plain_shift = (keyed[1].latents - free[1].latents).norm()
    assert (pushed[1].latents - free[1].latents).norm() > 1.5 * plain_shift
    with pytest.raises(CliploomError, match="keyframe_guidance 9.0 is outside 1.0..8.0"):
        tiny_story(2, keyframe_guidance=9.0)


def test_guidance_between_two_conditions_is_the_cfg_formula():
    from cliploom.sampling import contrast

    x = torch.randn(1, 4, 2, 2, 2)
    a, b = (lambda x, s: 2 * x + s), (lambda x, s: x - s)
    assert torch.allclose(contrast(a, b, 1.0)(x, 0.5), a(x, 0.5))
    assert torch.allclose(contrast(a, b, 3.0)(x, 0.5), b(x, 0.5) + 3 * (a(x, 0.5) - b(x, 0.5)))


def test_keyframe_validation_is_one_line_exit_2(capsys, tiny_dirs, reference_png, tmp_path):
    from test_cli import run

    end = _image(tmp_path / "end.png", (200, 200, 200))
    Image.fromarray(np.zeros((32, 96, 3), np.uint8)).save(tmp_path / "wide.png")
    base = ["generate", "--image", reference_png, "--prompt", "a", "--prompt", "b", "--frames", "9", "--steps", "1",
            "--model", tiny_dirs["wan21"], "--quiet", "--out", tmp_path / "x.mp4"]
    story = tmp_path / "s.yaml"
    cases = [
        ({"frame": 20, "image": str(end)}, None, "outside the clip's frames 1..8"),
        ({"frame": 4, "image": str(end)}, None, "falls in the motion prefix"),
        ({"frame": 6, "image": str(end)}, None, "is inside a latent frame"),
        ({"frame": 8, "image": str(tmp_path / "wide.png")}, None, "not the shape of the 32x32 video"),
        ({"frame": 8, "image": str(tmp_path / "missing.png")}, None, "clip 1 keyframe image"),
    ]
    for key, _, message in cases:
        story.write_text(json.dumps({"reference": str(reference_png), "model": str(tiny_dirs["wan21"]), "frames": 9,
                                     "steps": 1, "clips": ["a", {"prompt": "b", "keyframes": [key]}]}))
        rc, _, err = run(capsys, "generate", story, "--out", tmp_path / "x.mp4", "-q")
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(lines) == 1 and message in lines[0], (key, err)
    rc, _, err = run(capsys, *base, "--end-frame", "5:" + str(end))
    assert rc == 2 and "the story has clips 0..1" in err
    rc, _, err = run(capsys, *base, "--end-frame", "one:" + str(end))
    assert rc == 2 and "is not CLIP:IMAGE" in err
    assert not (tmp_path / "x.mp4").exists()
    rc, out, _ = run(capsys, *base, "--end-frame", "1:" + str(end))
    assert rc == 0 and (tmp_path / "x.mp4").exists()


def test_story_file_end_frame_is_relative_to_the_story(tmp_path):
    from cliploom.story import load_story

    (tmp_path / "keys").mkdir()
    _image(tmp_path / "keys" / "end.png", (1, 2, 3))
    story = tmp_path / "s.yaml"
    story.write_text("reference: ref.png\nclips:\n  - a\n  - {prompt: b, end_frame: keys/end.png}\n")
    s = load_story(story)
    assert s.clips[0].keyframes == () and s.clips[1].keyframes == (Keyframe(-1, tmp_path / "keys" / "end.png"),)


def test_trainer_end_frame_samples_carry_the_true_last_frame(tiny_models):
    from cliploom.train.config import TrainConfig
    from cliploom.train.data import DataClip
    from cliploom.train.samples import Choice, build_sample

    model = tiny_models("wan21")
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (9, 32, 32, 3), dtype=np.uint8)
    clip = DataClip(frames=frames, prompt="p", source="test")
    with_end = build_sample(model, clip, Choice("latent", 1, end_frame=True))
    without = build_sample(model, clip, Choice("latent", 1))
    from cliploom.models.components import frames_to_tensor

    end_latent = model.encode_video(frames_to_tensor(frames[-1:]))
    assert torch.allclose(with_end.cond.y[:, 4:, -1], end_latent[:, :, 0], atol=1e-5)
    assert not without.cond.y[:, 4:, -1].any() and with_end.cond.y[0, 3, -1].all()  # mask: the last pixel frame
    assert torch.equal(with_end.cond.y[:, :, :-1], without.cond.y[:, :, :-1])  # same encodes, same process: same path
    assert TrainConfig(end_frame_prob=0.5).end_frame_prob == 0.5


def test_the_api_refuses_keyframes_that_name_server_files():
    from cliploom.serve.forms import Limits, _check_limits

    with pytest.raises(Exception, match="cannot name end_frame or keyframes files"):
        _check_limits(["a", {"prompt": "b", "end_frame": "/etc/passwd"}], Limits())
    with pytest.raises(Exception, match="cannot name end_frame or keyframes files"):
        _check_limits([{"prompt": "b", "keyframes": [{"frame": 8, "image": "/etc/hosts"}]}], Limits())
    _check_limits(["a", {"prompt": "b", "repeat": 2}], Limits())
    _check_limits([{"prompt": "b", "end_frame": "end_000000.png"}, "c"], Limits(), trusted=1)  # the server's own


def test_the_api_takes_uploaded_end_frames(tmp_path):
    import io

    from test_serve import PROMPT, ThreadServer, http, wait

    srv = ThreadServer(tmp_path / "data")
    try:
        png = io.BytesIO()
        Image.fromarray(np.full((32, 32, 3), (240, 200, 30), np.uint8)).save(png, format="PNG")
        with http(srv, token=None) as h:
            r = h.post("/v1/videos", data={"prompt": PROMPT, "clips": "2"},
                       files={"end_frame[1]": ("end.png", png.getvalue(), "image/png")})
            assert r.status_code == 200, r.text
            done = wait(h, r.json()["id"], timeout=300)
            assert done["status"] == "completed"
            story = json.loads((srv.state.jobs_dir / done["id"] / "story.json").read_text())
            assert story["clips"][1]["end_frame"] == "end_000001.png" and "end_frame" not in story["clips"][0]
            bad = h.post("/v1/videos", data={"prompt": PROMPT, "clips": "2"},
                         files={"end_frame[5]": ("end.png", png.getvalue(), "image/png")})
            assert bad.status_code == 400 and "clips 0..1" in bad.json()["error"]["message"]
            wide = io.BytesIO()
            Image.fromarray(np.zeros((32, 96, 3), np.uint8)).save(wide, format="PNG")
            bad = h.post("/v1/videos", data={"prompt": PROMPT, "clips": "2"},
                         files={"end_frame[1]": ("w.png", wide.getvalue(), "image/png")})
            assert bad.status_code == 400 and "not the shape" in bad.json()["error"]["message"]
            # extending a video made with end frames keeps them (the kept clips are not regenerated)
            ext = h.post("/v1/videos/extensions", data={"video[id]": done["id"], "prompt": PROMPT, "clips": "1"})
            assert ext.status_code == 200, ext.text
            extended = wait(h, ext.json()["id"], timeout=300)
            assert extended["status"] == "completed", extended.get("error")
            report = h.get(f"/v1/videos/{extended['id']}/report").json()["report"]
            assert report["resumed_at_clip"] == 2  # clips 0 and 1 kept from the parent, end frame and all
    finally:
        srv.close()


def test_first_last_frame_models_get_both_images_features_natively(tmp_path, tiny_story):
    """A tiny Wan2.1-FLF2V-style model (its image embedder takes two images' CLIP tokens with a
    position embedding): an end frame reaches it as diffusers' pipeline gives ``last_image``."""
    from cliploom.models import load_model
    from cliploom.models.tiny import make_tiny

    model = load_model(make_tiny(tmp_path / "flf2v", "flf2v"), device="cpu")
    assert model.first_last_frame and model.transformer.config.pos_embed_seq_len == 10
    end = _image(tmp_path / "end.png", (250, 250, 20))
    first = Image.open(end).convert("RGB").resize((32, 32))
    both = model.encode_image_features(first, first)
    # our method is that very call (same path, same process): exact
    assert both.shape[0] == 2 and torch.equal(both, model.pipe.encode_image([first, first], model.device))
    keyed = tiny_story(2, guidance=1.0, clips=[ClipSpec("a", keyframes=(Keyframe(-1, end),)), ClipSpec("b")])
    clips = list(Engine(model).generate(keyed, progress=False))
    assert len(clips) == 2 and all(torch.isfinite(c.latents).all() for c in clips)


def _random_lora(path, model_dir, seed):
    """A small random LoRA (diffusers layout) on the tiny transformer's self-attention."""
    from safetensors.torch import save_file

    cfg = json.loads((model_dir / "transformer" / "config.json").read_text())
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    g = torch.Generator().manual_seed(seed)
    save_file({f"transformer.blocks.{i}.attn1.{p}.lora_{ab}.weight": 0.3 * torch.randn(*((4, dim) if ab == "A" else (dim, 4)), generator=g)
               for i in range(cfg["num_layers"]) for p in ("to_q", "to_v") for ab in "AB"}, str(path))
    return path


def test_a_model_s_keyframe_lora_runs_stories_with_keyframes(tiny_dirs, tiny_story, tmp_path):
    """``keyframe_lora`` in a model's cliploom.json replaces its ``svi_lora`` for stories whose clips
    carry keyframes (the whole story, so that its clips share one model), and only for them; a
    story with ``svi_lora: false`` gets neither; the run key names it so a resume cannot mix them."""
    import shutil

    from cliploom.runs import settings_key

    d = tmp_path / "model"
    shutil.copytree(tiny_dirs["wan21"], d)
    _random_lora(d / "svi.safetensors", d, 1)
    _random_lora(d / "kf.safetensors", d, 2)
    settings = json.loads((d / "cliploom.json").read_text())
    (d / "cliploom.json").write_text(json.dumps({**settings, "svi_lora": "svi.safetensors", "keyframe_lora": "kf.safetensors"}))
    engine = Engine.load(str(d))
    end = _image(tmp_path / "end.png", (250, 250, 20))
    plain = tiny_story(2, guidance=1.0)
    keyed = tiny_story(2, guidance=1.0, clips=[ClipSpec("prompt 0"), ClipSpec("prompt 1", keyframes=(Keyframe(-1, end),))])
    assert [lo.path.name for lo in engine.default_loras(plain)] == ["svi.safetensors"]
    assert [lo.path.name for lo in engine.default_loras(keyed)] == ["kf.safetensors"]
    assert engine.default_loras(tiny_story(2, clips=keyed.clips, svi_lora=False)) == []
    assert engine.model.settings.svi_lora_for(tiny_story(2, clips=keyed.clips, route="df")) is None  # its own weights
    resolved = keyed.resolve(engine.model.settings, engine.model.size_multiple, engine.model.scale_temporal)
    assert settings_key(resolved, engine.model)["keyframe_lora"] == "kf.safetensors"
    assert "keyframe_lora" not in settings_key(plain.resolve(engine.model.settings, engine.model.size_multiple,
                                                             engine.model.scale_temporal), engine.model)
    # the frames: the keyed story's clip 0 is the keyframe LoRA's, not the SVI LoRA's
    by_default = list(engine.generate(keyed, progress=False))
    explicit = list(Engine.load(str(d)).generate(
        tiny_story(2, guidance=1.0, clips=keyed.clips, svi_lora=False, loras=[LoraSpec(d / "kf.safetensors")]), progress=False))
    svi = list(Engine.load(str(d)).generate(plain, progress=False))
    # the same LoRA applied by default or named in the story: one computation up to the adapter's
    # name, so the latents agree to float rounding (1e-5 of their scale)
    assert torch.allclose(by_default[0].latents, explicit[0].latents, atol=1e-5 * float(explicit[0].latents.abs().max()))
    assert not torch.allclose(by_default[0].latents, svi[0].latents, atol=1e-3)
    bad = {**settings, "keyframe_lora": "../kf.safetensors"}
    (d / "cliploom.json").write_text(json.dumps(bad))
    with pytest.raises(CliploomError, match="must be a file inside the model folder"):
        Engine.load(str(d))


def test_first_clip_i2v_runs_clip_0_without_the_svi_lora(tiny_dirs, tiny_story, tmp_path):
    """``first_clip: i2v`` (a story's, or the model's default): clip 0 is the base model's own
    image-to-video -- the SVI LoRA is off there (weight 0, adapters unfused), on from clip 1;
    pixel modes keep their own first clip; the run key records it."""
    import shutil

    from cliploom.runs import settings_key

    d = tmp_path / "model"
    shutil.copytree(tiny_dirs["wan21"], d)
    _random_lora(d / "svi.safetensors", d, 1)
    settings = json.loads((d / "cliploom.json").read_text())
    (d / "cliploom.json").write_text(json.dumps({**settings, "svi_lora": "svi.safetensors", "first_clip": "i2v"}))
    engine = Engine.load(str(d))
    story = tiny_story(2, guidance=1.0, seam_blend=0)
    resolved = story.resolve(engine.model.settings, engine.model.size_multiple, engine.model.scale_temporal)
    assert resolved.first_clip == "i2v" and settings_key(resolved, engine.model)["first_clip"] == "i2v"
    pixel = tiny_story(2, mode="svi2").resolve(engine.model.settings, engine.model.size_multiple, engine.model.scale_temporal)
    assert pixel.first_clip == "pro"  # the model's default applies to pro mode only
    end = _image(tmp_path / "end.png", (250, 250, 20))
    keyed = tiny_story(2, clips=[ClipSpec("prompt 0", keyframes=(Keyframe(-1, end),)), ClipSpec("prompt 1")])
    # nor to keyed stories (their keyframe LoRA was measured with SVI's first clip), unless they ask
    assert keyed.resolve(engine.model.settings, engine.model.size_multiple, engine.model.scale_temporal).first_clip == "pro"
    weights, merged = [], []

    def seen(i):
        weights.append(engine.loras.weights())
        merged.append(engine.loras.merged)

    with_default = list(engine.generate(story, progress=False, on_clip_start=seen))
    # clip 0 with the adapters unfused at weight 0; from clip 1 the stack merged into the weights
    # (base speed), its adapters kept so that the next story's clip 0 can take it out again
    assert weights == [{"svi": 0.0}, {"svi": 1.0}] and merged == [False, True]
    assert engine.loras.merged and not engine.loras.fused
    # clip 0 equals the base model's (no LoRA) i2v clip 0; clip 1 differs from the base model's continuation
    base = list(Engine.load(str(d)).generate(tiny_story(2, guidance=1.0, seam_blend=0, svi_lora=False), progress=False))
    scale = float(base[0].latents.abs().max())
    # adapters at weight 0 against no adapters: one computation up to float rounding (1e-5 of the scale)
    assert torch.allclose(with_default[0].latents, base[0].latents, atol=1e-5 * scale)
    assert not torch.allclose(with_default[1].latents, base[1].latents, atol=1e-3)
    # merged against adapters kept unfused for the whole story (fuse_loras: false): the same clips, W + BA
    # summed before or after the matmul (float32 rounding, 1e-5 of the scale)
    plain = Engine.load(str(d))
    plain.loras.merge = lambda: False  # merging off: the adapters applied at every call
    unfused = list(plain.generate(story, progress=False))
    for a, b in zip(with_default, unfused):
        assert torch.allclose(a.latents, b.latents, atol=1e-5 * scale)
    # the next story on this engine: its clip 0 unmerges the stack, so it is the base model's clip 0 again
    merged.clear()
    again = list(engine.generate(story, progress=False, on_clip_start=seen))
    assert merged == [False, True]
    assert torch.allclose(again[0].latents, base[0].latents, atol=1e-5 * scale)
    # the same story on the same engine, the weights restored in between: the same path, the same clips
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(again, with_default, strict=True))
    # two merge / unmerge round trips later, the weights are exactly the file's (exact: no arithmetic
    # on this path, the file's bytes read and a copy of them put back, on any CPU)
    engine.loras.clear()
    fresh = Engine.load(str(d)).model.transformer.state_dict()
    for name, value in engine.model.transformer.state_dict().items():
        assert torch.equal(value, fresh[name]), name
    # a story's own LoRA named svi stands in for the model's; a weight clip 0 gives it wins over first_clip's 0
    own = tiny_story(2, guidance=1.0, seam_blend=0, svi_lora=False, fuse_loras=False, loras=[LoraSpec(d / "svi.safetensors", name="svi")],
                     clips=[ClipSpec("prompt 0", lora_weights={"svi": 0.5}), ClipSpec("prompt 1")])
    weights = []
    list(engine.generate(own, progress=False, on_clip_start=lambda i: weights.append(engine.loras.weights())))
    assert weights == [{"svi": 0.5}, {"svi": 1.0}]
    pro = list(Engine.load(str(d)).generate(tiny_story(2, guidance=1.0, seam_blend=0, first_clip="pro"), progress=False))
    assert not torch.allclose(pro[0].latents, with_default[0].latents, atol=1e-3)
    # a one-clip i2v story leaves the stack at svi 0; the next story on the engine (SVI's first clip,
    # adapters kept switchable as the service keeps them) has the LoRA back on from its clip 0
    list(engine.generate(tiny_story(1, guidance=1.0, seam_blend=0), progress=False))
    assert engine.loras.weights() == {"svi": 0.0}
    weights = []
    after = list(engine.generate(tiny_story(2, guidance=1.0, seam_blend=0, first_clip="pro", fuse_loras=False),
                                 progress=False, on_clip_start=lambda i: weights.append(engine.loras.weights())))
    assert weights == [{"svi": 1.0}, {"svi": 1.0}]
    for a, b in zip(after, pro):  # merged against fused: float32 rounding
        assert torch.allclose(a.latents, b.latents, atol=1e-5 * scale)
    with pytest.raises(CliploomError, match="first_clip: i2v runs clip 0 without the SVI \\(or df\\) LoRA"):
        list(Engine.load(str(d)).generate(tiny_story(2, fp8_matmul=True), progress=False))
    bad = {**settings, "first_clip": "t2v"}
    (d / "cliploom.json").write_text(json.dumps(bad))
    with pytest.raises(CliploomError, match="unknown first_clip 't2v'"):
        Engine.load(str(d))
