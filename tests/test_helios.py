"""The Helios route (cliploom.routes.helios): the transformer built from the DiT, the history, the
loop, its weights, refusals and trainer. On the built-in ShapesWorld model (the tiny Wan 2.1 model
reads CLIP features, which Helios has no input for)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml

from cliploom.errors import CliploomError


@pytest.fixture(scope="module")
def builtin():
    from cliploom.models import load_model

    return load_model("builtin", device="cpu")


def _frames_of(model, story, **kw):
    from cliploom.routes import weave_for

    return list(weave_for("helios")(model, story, progress=False, **kw))


def test_helios_transformer_is_the_dit_with_y_zero_when_there_is_no_history(builtin):
    from cliploom.models.helios import build_helios

    wan = builtin.transformer
    helios = build_helios(wan, builtin.z_dim)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 16, 5, 8, 8, generator=g), torch.randn(2, 24, 64, generator=g)
    t = torch.tensor([700.0, 300.0])
    with torch.no_grad():
        want = wan(hidden_states=torch.cat([x, torch.zeros(2, 20, 5, 8, 8)], dim=1), timestep=t,
                   encoder_hidden_states=text, return_dict=False)[0]
        got = helios(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    # The same float32 arithmetic but for RoPE (Helios computes it from the frame indices in float32, Wan
    # reads a float64-made table): measured 2.4e-6 of an output scale of 7.3; 1e-5 of the scale leaves
    # room for other BLAS orders and nothing for a wrong weight (an order of magnitude above).
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # the DiT's weights are shared, not copied; the patch layers are the Helios module's own
    assert helios.blocks[0].attn1.to_q.weight.data_ptr() == wan.blocks[0].attn1.to_q.weight.data_ptr()
    assert helios.patch_short.weight.data_ptr() != wan.patch_embedding.weight.data_ptr()
    assert torch.equal(helios.norm_out.scale_shift_table, wan.scale_shift_table)  # a copy, not a computation: exact
    # patch_mid / patch_long on cells of equal latents give the short patch of the cell (2x2x2 / 4x4x4 patches)
    cell = torch.randn(1, 16, 1, 2, 2, generator=g)
    for layer, k in (("patch_mid", 2), ("patch_long", 4)):
        big = cell.repeat_interleave(k, 2).repeat_interleave(k, 3).repeat_interleave(k, 4)  # [1, 16, k, 2k, 2k]
        short = helios.patch_short(cell)[0, :, 0, 0, 0]
        assert torch.allclose(getattr(helios, layer)(big)[0, :, 0, 0, 0], short, atol=1e-5)
    # with a history the chunk's output changes (the history is read), its shape does not
    from cliploom.routes.helios import Sizes, make_history

    history = make_history(x[:1, :, :1], torch.randn(1, 16, 6, 8, 8, generator=g), Sizes(2, 2, 2))
    with torch.no_grad():
        with_past = helios(hidden_states=x[:1], timestep=t[:1], encoder_hidden_states=text[:1], return_dict=False,
                           **history.inputs(5, torch.float32))[0]
    assert with_past.shape == got[:1].shape and not torch.allclose(with_past, got[:1], atol=1e-3)


def test_history_is_the_anchor_and_the_newest_past_at_fixed_slots():
    from cliploom.routes.helios import Sizes, make_history

    anchor = torch.full((1, 2, 1, 4, 4), -1.0)
    past = torch.arange(10.0).view(1, 1, 10, 1, 1).expand(1, 2, 10, 4, 4)  # frame j holds the value j
    sizes = Sizes(short=2, mid=2, long=4)  # slots: anchor 0, long 1..4, mid 5..6, short 7..8, chunk from 9
    first = make_history(anchor, None, sizes)  # clip 0: the anchor alone
    assert first.short.shape[2] == 1 and first.mid is None and first.long is None
    assert first.index_short == [0] and first.first == 9
    h = make_history(anchor, past[:, :, :4], sizes)  # clip 1: 4 past latents fill short and mid
    assert h.short[0, 0, :, 0, 0].tolist() == [-1, 2, 3] and h.mid[0, 0, :, 0, 0].tolist() == [0, 1]
    assert h.long is None and h.index_short == [0, 7, 8] and h.index_mid == [5, 6] and h.first == 9
    h = make_history(anchor, past[:, :, :7], sizes)  # 7: long holds 3, in its last slots
    assert h.long[0, 0, :, 0, 0].tolist() == [0, 1, 2] and h.index_long == [2, 3, 4]
    h = make_history(anchor, past, sizes)  # 10: the oldest two fall out; positions never grow
    assert h.long[0, 0, :, 0, 0].tolist() == [2, 3, 4, 5] and h.index_long == [1, 2, 3, 4] and h.first == 9
    inputs = h.repeat(2).inputs(3, torch.float32)
    assert inputs["indices_hidden_states"].tolist() == [[9, 10, 11]] * 2
    assert inputs["latents_history_long"].shape == (2, 2, 4, 4, 4)


def test_history_frames_are_blurred_or_exposed_before_encoding():
    from cliploom.train.helios import corrupt_frames

    flat = np.full((2, 16, 16, 3), 100, np.uint8)
    assert np.array_equal(corrupt_frames(flat, "blur", 1.5), flat)  # a blur keeps a flat image
    assert (corrupt_frames(flat, "exposure", 1.0) == 200).all() and (corrupt_frames(flat, "exposure", -1.0) == 50).all()
    noisy = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    blurred = corrupt_frames(noisy, "blur", 1.5).astype(float)
    assert blurred.std() < 0.5 * noisy.std() and abs(blurred.mean() - noisy.mean()) < 2


def test_helios_loop_streams_the_pro_timeline_with_per_clip_prompts_and_bounded_history(builtin, tiny_story,
                                                                                          monkeypatch):
    from cliploom.routes import helios as route

    seen = []
    real = route.denoiser
    monkeypatch.setattr(route, "denoiser", lambda e, h, t, n, *z: seen.append((h, t)) or real(e, h, t, n, *z))
    opts = {"short": 1, "mid": 2, "long": 0}
    from cliploom.story import ClipSpec

    words = ["a red circle moves right", "a red circle moves up"]  # the built-in text encoder knows its words
    story = tiny_story(clips=[ClipSpec(words[i % 2]) for i in range(5)], route="helios", route_options=opts,
                       width=32, height=32, guidance=2.0, first_clip="pro")
    clips = _frames_of(builtin, story)
    assert [len(c.frames) for c in clips] == [9, 4, 4, 4, 4]  # pro's geometry: 2 new latents, then 1 a clip
    # each clip's chunk was denoised with its own prompt (they alternate)
    emb = {p: builtin.encode_text([p])[0:1] for p in {story.prompt(i) for i in range(5)}}
    for i, (_, text) in enumerate(seen):
        assert torch.allclose(text, emb[story.prompt(i)], atol=1e-5)
        assert all(not torch.allclose(text, e, atol=1e-3) for p, e in emb.items() if p != story.prompt(i))
    # the history: the anchor always, then at most 1 + 2 past latents, newest at full resolution
    sizes = [(h.short.shape[2], 0 if h.mid is None else h.mid.shape[2], h.long) for h, _ in seen]
    assert sizes == [(1, 0, None), (2, 1, None), (2, 2, None), (2, 2, None), (2, 2, None)]
    assert all(h.first == 4 for h, _ in seen)  # fixed positions: the chunk always after the same slots
    for (h, _), prev in zip(seen[1:], clips):
        assert torch.equal(h.short[:, :, 0], seen[0][0].short[:, :, 0])  # the anchor, kept
        assert torch.equal(h.short[:, :, -1], prev.latents[:, :, -1])  # the newest latent as generated
    for prev, clip in zip(clips, clips[1:]):  # decoded as pro decodes: [anchor, previous clip's last latent, new] (copies: exact)
        assert torch.equal(clip.latents[:, :, 1], prev.latents[:, :, -1])
    # the same slots (3 past latents), cut otherwise: clip 0 (no past) is the same, clip 1 reads its past compressed
    compressed = _frames_of(builtin, tiny_story(clips=story.clips[:2], route="helios", width=32, height=32, first_clip="pro",
                                                guidance=2.0, route_options={"short": 0, "mid": 3, "long": 0}))
    assert torch.equal(compressed[0].latents, clips[0].latents)  # clip 0 runs the same path twice in one process: exact
    assert not torch.equal(compressed[1].latents, clips[1].latents)


def test_helios_first_clip_i2v_is_the_svi_routes_image_to_video_clip(builtin, tiny_story, monkeypatch):
    """first_clip: i2v (the built-in model's default on helios too, not on a Helios folder): clip 0 is the DiT's
    own image-to-video, the svi route's clip 0 (same condition, noise, sampler), and its latents start
    the history."""
    from cliploom.loom import weave
    from cliploom.routes import helios as route
    from cliploom.story import ClipSpec

    seen = []
    real = route.denoiser
    monkeypatch.setattr(route, "denoiser", lambda e, h, t, n, *z: seen.append(h) or real(e, h, t, n, *z))
    words = ["a red circle moves right", "a red circle moves up"]
    keys = dict(clips=[ClipSpec(w) for w in words], width=32, height=32, guidance=2.0, seam_blend=0)  # clip 1 differs
    assert tiny_story(route="helios", **keys).resolve(builtin.settings).first_clip == "i2v"  # the model's choice
    native = dataclasses.replace(builtin.settings, native_routes=("helios",))  # a Helios folder: its own clip 0
    assert tiny_story(route="helios", **keys).resolve(native).first_clip == "pro"
    clips = _frames_of(builtin, tiny_story(route="helios", first_clip="i2v", **keys))
    svi = list(weave(builtin, tiny_story(first_clip="i2v", **keys), progress=False))  # no LoRA: the plain DiT
    # one computation on two code paths (the helios loop, the svi loop): a tolerance, not equality
    torch.testing.assert_close(clips[0].latents, svi[0].latents, atol=1e-5, rtol=1e-5)
    assert (clips[0].frames.int() - svi[0].frames.int()).abs().max() <= 1
    assert len(clips[0].frames) == len(svi[0].frames) == 9
    # clip 0 made no Helios pass; clip 1's history holds clip 0's new latents as made (copied: exact)
    assert len(seen) == 1 and torch.equal(seen[0].short[:, :, -1], clips[0].latents[:, :, -1])
    # and clip 1 is Helios', not the svi loop's: far beyond rounding
    assert float((clips[1].latents - svi[1].latents).abs().max()) > 1e-2


def test_helios_refusals_are_one_line(builtin, tiny_models, tiny_dirs, tiny_story, reference_png, tmp_path, capsys):
    from cliploom.cli import main
    from cliploom.loom import Start
    from cliploom.story import ClipSpec, Keyframe

    for keys, message in (({"route_options": {"short": 99}}, "route option short 99 is out of range"),
                          ({"model": str(tiny_dirs["wan21"])}, "has no helios weights")):  # a model without them
        story = tmp_path / "s.yaml"
        story.write_text(yaml.safe_dump({"reference": str(reference_png), "clips": ["a"], "route": "helios",
                                         "steps": 1, **keys}))
        assert main(["generate", str(story), "-o", str(tmp_path / "v.mp4"), "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    with pytest.raises(CliploomError, match="cannot resume or extend"):
        _frames_of(builtin, tiny_story(2, route="helios"), start=Start(1, torch.zeros(1, 16, 1, 8, 8)))
    keyed = [ClipSpec("a"), ClipSpec("b", keyframes=(Keyframe(-1, reference_png),))]
    with pytest.raises(CliploomError, match="does not take keyframes"):
        _frames_of(builtin, tiny_story(2, clips=keyed, route="helios"))
    # first_clip: i2v needs a DiT with image channels (y): the built-in model's, but with a text-to-video DiT's
    from types import SimpleNamespace

    from cliploom.routes import helios as route

    t2v = SimpleNamespace(transformer_2=None, settings=builtin.settings, has_image_encoder=False, z_dim=builtin.z_dim,
                          transformer=SimpleNamespace(config=SimpleNamespace(in_channels=builtin.z_dim)))
    with pytest.raises(CliploomError, match="has no image channels"):
        route._check(t2v, tiny_story(1, route="helios", first_clip="i2v").resolve(builtin.settings), None)
    route._check(t2v, tiny_story(1, route="helios", first_clip="pro").resolve(builtin.settings), None)  # pro: fine
    for variant, message in (("wan22", "two experts"), ("ti2v", "TI2V"), ("wan21", "CLIP image features")):
        with pytest.raises(CliploomError, match=message):
            _frames_of(tiny_models(variant), tiny_story(1, route="helios"))


def test_helios_trainer_learns_exports_and_the_engine_runs_its_lora(builtin, tmp_path, tiny_story):
    from cliploom.engine import Engine
    from cliploom.models import load_model
    from cliploom.models.builtin import SHIPPED
    from cliploom.models.formats import read_header
    from cliploom.routes.helios import Sizes
    from cliploom.train.config import config_from_dict
    from cliploom.train.helios import HeliosTrainer, helios_sample

    base = dict(model="builtin", route="helios", error_recycling=False, export=["diffusers"])
    cfg = config_from_dict(dict(base, out_dir=str(tmp_path / "run"), rank=4, alpha=4, frames=9, steps=2,
                                batch_size=2, clips_per_sample=3, history_corruption_prob=1.0, checkpoint_every=10,
                                lr=0.02, seed=5, history_short=1, history_mid=1, history_long=1))
    trainer = HeliosTrainer(cfg, model=load_model("builtin", device="cpu"), progress=False)
    before = {n: p.detach().clone() for n, p in trainer.transformer.named_parameters() if p.requires_grad}
    assert any("patch_long" in n for n in before) and any("lora_B" in n for n in before)
    for _ in range(2):
        info = trainer.train_step()
        assert np.isfinite(info.loss)
    assert info.modes[0].startswith("helios clip 1")  # seed 5 draws clip 2, then clip 1 (9 frames: 2, 1, 1 latents)
    after = dict(trainer.transformer.named_parameters())  # clip 2's past (3 latents) filled short, mid and long
    assert all(not torch.equal(after[n], before[n]) for n in before if "lora_B" in n or "patch" in n)
    # corruption: the history differs from the clean one drawn the same way, the target does not
    clean_cfg = config_from_dict(dict(base, frames=9, history_corruption_prob=0.0))
    noisy_cfg = config_from_dict(dict(base, frames=9, history_corruption_prob=1.0, history_blur_max=0,
                                      history_exposure_max=0))
    a, b = (helios_sample(trainer.model, torch.Generator().manual_seed(3), 2, 9, 32, Sizes(1, 1, 1), c)
            for c in (clean_cfg, noisy_cfg))
    assert b.choice.corruption == "noise" and torch.equal(a.target, b.target)  # the same encode of the same frames: exact
    assert torch.equal(a.history.short[:, :, 0], b.history.short[:, :, 0])  # the anchor is never corrupted
    assert not torch.allclose(a.history.short[:, :, 1:], b.history.short[:, :, 1:])
    # the export: the route's tag, the LoRA pairs and the patch layers' deltas
    (path,) = trainer.export()
    header = read_header(path, "LoRA")
    assert header.metadata["cliploom_route"] == "helios"
    assert "transformer.patch_mid.diff" in header.keys and "transformer.patch_long.diff_b" in header.keys
    # a model folder naming it in route_loras: the engine puts it on the Helios transformer of a fresh
    # load, which then computes what the trainer's did
    folder = tmp_path / "model"
    folder.mkdir()
    trained = "trained_helios.safetensors"  # a name the shipped folder does not have: nothing is written through a link
    assert not (SHIPPED / trained).exists()
    for entry in SHIPPED.iterdir():
        if entry.name != "cliploom.json":
            (folder / entry.name).symlink_to(entry)
    settings = json.loads((SHIPPED / "cliploom.json").read_text())
    settings["route_loras"] = {**settings["route_loras"], "helios": trained}
    (folder / "cliploom.json").write_text(json.dumps(settings))
    (folder / trained).write_bytes(path.read_bytes())
    engine = Engine.load(folder, device="cpu")
    clips = list(engine.generate(tiny_story(2, route="helios", width=32, height=32), progress=False))
    assert [len(c.frames) for c in clips] == [9, 4]
    (applied,) = engine.helios_loras.summary()
    assert applied["deltas"] == 6 and applied["modules"]["transformer"] > 6 and not applied["fused"]
    x = torch.randn_like(b.target)
    assert b.history.mid is not None and b.history.long is not None  # every patch layer in play
    run = dict(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=trainer.text(b.prompt),
               return_dict=False, **b.history.inputs(x.shape[2], torch.float32))
    with torch.no_grad():
        want = trainer.transformer(**run)[0]
        got = engine.model._cliploom_helios.transformer(**run)[0]
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # the DiT itself is untouched (unfused adapters on shared weights); another route drops the stack
    plain = builtin.transformer.state_dict()  # the same weights read from the same files, never given a LoRA: exact
    assert all(torch.equal(v, plain[k]) for k, v in engine.model.transformer.state_dict().items())
    list(engine.generate(tiny_story(1, steps=1, width=32, height=32), progress=False))
    assert engine.helios_loras.applied == []
    with pytest.raises(CliploomError, match="only the diffusers layout"):
        config_from_dict(dict(base, export=["svi", "diffusers"]))
    with pytest.raises(CliploomError, match="history_short: route option short 9 is out of range"):
        config_from_dict(dict(base, history_short=9))
    with pytest.raises(CliploomError, match="are Helios settings"):
        config_from_dict(dict(model="builtin", history_corruption_prob=0.5))
