"""Routes (cliploom.routes): diffusion forcing's conditioning, loop and trainer; route validation."""

import numpy as np
import pytest
import torch
import yaml

from compare import assert_same_clips

from cliploom import conditioning as C
from cliploom.cli import main
from cliploom.errors import CliploomError
from cliploom.loom import weave
from cliploom.story import make_story


def frames_of(model, story, **kw):
    return list(weave(model, story, progress=False, **kw))


def test_context_condition_gives_anchor_and_motion_as_context_frames_with_their_timesteps():
    g = torch.Generator().manual_seed(0)
    anchor, motion = torch.randn(1, 2, 1, 4, 4, generator=g), torch.randn(1, 2, 1, 4, 4, generator=g)
    noise = torch.randn(1, 2, 5, 4, 4, generator=g)
    cond = C.context_condition(anchor, motion, 5, patch=(2, 2), context_noise=20, noise=noise)
    # x's frames 0..K are the anchor and the motion noised to t = 20 with the clip's own noise there
    x = torch.full((1, 2, 5, 4, 4), 7.0)
    inp = cond.model_input(x)
    assert torch.equal(inp[:, :2, 0], anchor[:, :, 0])
    assert torch.allclose(inp[:, :2, 1], 0.98 * motion[:, :, 0] + 0.02 * noise[:, :, 1])
    assert inp[:, :2, 2:].eq(7).all()
    # y holds only the anchor (a first clip's y) and the mask marks only its pixel frame
    assert torch.equal(inp[:, 6:, 0], anchor[:, :, 0]) and inp[:, 6:, 1:].eq(0).all()
    assert inp[:, 2:6, 0].eq(1).all() and inp[:, 2:6, 1:].eq(0).all()
    # per-token timesteps: 0 on the anchor, the context noise on the motion, t elsewhere (2x2 tokens a frame)
    assert cond.timestep(500.0, x)[0].view(5, 4)[:, 0].tolist() == [0.0, 20.0, 500.0, 500.0, 500.0]
    assert cond.repeat(2).timestep(500.0, torch.cat([x, x])).shape == (2, 20)
    # clean context: the motion as it is, timestep 0; no motion: exactly latent mode's first clip
    clean = C.context_condition(anchor, motion, 5, patch=(2, 2))
    assert torch.equal(clean.model_input(x)[:, :2, 1], motion[:, :, 0])
    assert clean.timestep(500.0, x)[0].view(5, 4)[:, 0].tolist() == [0.0, 0.0, 500.0, 500.0, 500.0]
    first, svi = C.context_condition(anchor, None, 5), C.latent_condition(anchor, None, 5)
    assert torch.equal(first.y, svi.y) and first.known is None  # context_condition calls latent_condition: one path
    with pytest.raises(ValueError, match="needs the clip's noise"):
        C.context_condition(anchor, motion, 5, context_noise=20)


def test_df_route_runs_the_pro_timeline_with_the_context_kept_in_each_clip(tiny_models, tiny_story):
    model = tiny_models("wan21")
    story = tiny_story(3, frames=13, route="df")
    clips = frames_of(model, story)
    pro = frames_of(model, tiny_story(3, frames=13))
    assert [len(c.frames) for c in clips] == [len(c.frames) for c in pro] == [13, 8, 8]
    assert_same_clips(clips[:1], pro[:1])  # clip 0 has no past: the same as pro's
    for prev, clip in zip(clips, clips[1:]):
        # the context is the previous clip's last latent as generated, kept as it is (same tensor copied)
        assert torch.equal(clip.latents[:, :, 1], prev.latents[:, :, -1])
    assert (clips[1].frames.int() - pro[1].frames.int()).abs().max() > 0  # and it is another route
    again = frames_of(model, tiny_story(3, frames=13, route="df"))
    assert all(torch.equal(a.frames, b.frames) for a, b in zip(again, clips))  # same path, same seed: same frames
    noised = frames_of(model, tiny_story(3, frames=13, route="df", route_options={"addnoise": 300}))
    assert torch.equal(noised[0].frames, clips[0].frames)  # clip 0 has no context: the same path runs twice
    assert (noised[1].frames.int() - clips[1].frames.int()).abs().max() > 0
    assert torch.equal(noised[1].latents[:, :, 1], noised[0].latents[:, :, -1])  # decoded from the clean context


def test_frame_schedule_staggers_each_latent_frame_by_ar_step():
    """SkyReels' asynchronous schedule: every frame runs the whole schedule in order, frame f + 1
    starting ``ar_step`` rows after frame f; a clean prefix stays at 0; ``ar_step`` 0 is the clip's
    own schedule on every frame (the same values copied: exact)."""
    from cliploom.sampling import frame_schedule, schedule

    sigmas = schedule(4, 5.0)
    assert torch.equal(frame_schedule(sigmas, 3, 0), sigmas[:, None].expand(5, 3))
    rows = frame_schedule(sigmas, 5, 2, ready=2)
    assert rows.shape == (4 + 2 * 2 + 1, 5)  # 4 steps, then 2 rows for each later frame
    assert rows[:, :2].eq(0).all()
    starts = []
    for f in range(2, 5):
        path = torch.unique_consecutive(rows[:, f])
        assert torch.equal(path, sigmas)  # the whole schedule, no step skipped or repeated
        starts.append(int((rows[:, f] < 1).nonzero()[0]))
    assert starts == [1, 3, 5]
    assert (rows[:, 2:].diff(dim=1) >= 0).all()  # earlier frames are never noisier than later ones


def test_df_ar_step_gives_each_frame_its_own_timestep_in_one_pass(tiny_models, tiny_story):
    model = tiny_models("wan21")
    plain = frames_of(model, tiny_story(2, frames=13, steps=3, route="df", guidance=1.0))
    zero = frames_of(model, tiny_story(2, frames=13, steps=3, route="df", guidance=1.0, route_options={"ar_step": 0}))
    assert_same_clips(zero, plain)  # 0 is off: the same path
    seen = []
    hook = model.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].clone()),
                                                       with_kwargs=True)
    try:
        staggered = frames_of(model, tiny_story(2, frames=13, steps=3, route="df", guidance=1.0,
                                                route_options={"ar_step": 1}))
    finally:
        hook.remove()
    # 13 frames = 4 latents; clip 0 makes all 4 (3 + 3 rows), clip 1 the 2 after its context (3 + 1)
    assert len(seen) == 6 + 4
    per_frame = [s[0].view(4, -1)[:, 0] for s in seen]  # 4 tokens a frame (32 px, VAE 8, patch 2)
    assert per_frame[0].eq(1000).all() and per_frame[1][0] < per_frame[1][1] == 1000  # frame 0 moves, frame 1 waits
    assert per_frame[7][:2].tolist() == [0.0, 0.0] and per_frame[7][2] < per_frame[7][3] == 1000  # clip 1: context at 0
    assert (staggered[1].frames.int() - plain[1].frames.int()).abs().max() > 0


def test_df_first_clip_i2v_is_the_models_own_image_to_video_with_the_df_lora_off(tiny_dirs, tiny_story, tmp_path):
    """first_clip: i2v on route df: clip 0 is the model's own image-to-video (chain mode's clip 0), the
    df LoRA (named df, as a model's route LoRA is) off there and on again from clip 1, which takes
    clip 0's last latent as its context."""
    import dataclasses

    from test_lora import build_lora, write_lora

    from cliploom.engine import Engine
    from cliploom.models import load_model
    from cliploom.story import ClipSpec, Keyframe, LoraSpec

    engine = Engine.load(tiny_dirs["wan21"], device="cpu")
    tensors, _, _ = build_lora(engine.model, "diffusers", scale_factor=1.0)
    lora = LoraSpec(write_lora(tmp_path / "df.safetensors", tensors), 1.0, name="df")
    keys = dict(frames=13, guidance=1.0, route="df", loras=[lora])
    i2v = list(engine.generate(tiny_story(2, first_clip="i2v", **keys), progress=False))
    assert engine.loras.weights() == {"df": 1.0}  # on again after clip 0
    chain = list(Engine(load_model(tiny_dirs["wan21"], device="cpu")).generate(
        tiny_story(1, frames=13, guidance=1.0, mode="chain"), progress=False))
    # the LoRA at weight 0 against no LoRA: peft adds a zero update, yet another code path: a tolerance
    torch.testing.assert_close(i2v[0].latents, chain[0].latents, atol=1e-5, rtol=1e-5)
    assert torch.equal(i2v[1].latents[:, :, 1], i2v[0].latents[:, :, -1])  # the context, copied
    # ar_step staggers df's clips, not the image-to-video clip 0 (the plain I2V DiT has one timestep a clip)
    staggered = list(engine.generate(tiny_story(2, first_clip="i2v", route_options={"ar_step": 1}, **keys), progress=False))
    torch.testing.assert_close(staggered[0].latents, chain[0].latents, atol=1e-5, rtol=1e-5)
    pro = list(engine.generate(tiny_story(2, first_clip="pro", **keys), progress=False))
    assert float((pro[0].latents - i2v[0].latents).abs().max()) > 1e-2  # df's own clip 0 is another clip
    # the model's first_clip applies to df stories, not to keyed ones nor to the causal routes
    settings = dataclasses.replace(engine.model.settings, first_clip="i2v")
    assert tiny_story(2, route="df").resolve(settings).first_clip == "i2v"
    assert tiny_story(2, route="causal").resolve(settings).first_clip == "pro"
    end = (Keyframe(-1, tiny_story(1).reference),)
    keyed = tiny_story(2, route="df", clips=[ClipSpec("a", keyframes=end), ClipSpec("b")])
    assert keyed.resolve(settings).first_clip == "pro"


def test_df_route_needs_weights_for_it(tiny_dirs, tiny_story):
    from cliploom.engine import Engine

    engine = Engine.load(tiny_dirs["wan21"], device="cpu")
    with pytest.raises(CliploomError, match="has no df weights"):
        list(engine.generate(tiny_story(1, route="df"), progress=False))


@pytest.mark.parametrize("keys, message", [
    ({"route": "helios", "route_options": {"window": 1}}, "route helios has no option 'window'"),
    ({"route": "sideways"}, "unknown route 'sideways'"),
    ({"route": "df", "route_options": {"window": 1}}, "route df has no option 'window'"),
    ({"route": "df", "route_options": {"ar_step": 11}}, "route option ar_step 11 is out of range"),
    ({"route": "df", "route_options": {"addnoise": 1000}}, "route option addnoise 1000 is out of range"),
    ({"route": "df", "route_options": {"addnoise": "lots"}}, "must be a whole number"),
    ({"route": "df", "mode": "film"}, "route df runs on the pro timeline"),
    ({"route_options": {"addnoise": 20}}, "route svi has no option 'addnoise'"),
])
def test_bad_routes_and_options_are_one_line_errors_exit_2(tmp_path, reference_png, capsys, keys, message):
    story = tmp_path / "s.yaml"
    story.write_text(yaml.safe_dump({"reference": str(reference_png), "clips": ["a"], **keys}))
    assert main(["generate", str(story), "-o", str(tmp_path / "v.mp4"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    with pytest.raises(CliploomError, match=message.replace("(", r"\(").replace("'", ".")):
        make_story(clips=["a"], **keys)


def test_route_options_from_the_command_line(tmp_path, reference_png, capsys):
    from cliploom.cli import _story_from_args, build_parser

    story = tmp_path / "s.yaml"
    story.write_text(yaml.safe_dump({"reference": str(reference_png), "clips": ["a"], "route": "df",
                                     "route_options": {"addnoise": 10}}))
    args = build_parser().parse_args(["generate", str(story), "--route-opt", "addnoise=20"])
    assert _story_from_args(args).route_option("addnoise") == 20
    args = build_parser().parse_args(["generate", "--image", str(reference_png), "--prompt", "a", "--route", "df"])
    assert _story_from_args(args).route_option("addnoise") == 0  # the default
    assert main(["generate", str(story), "--route-opt", "addnoise", "-o", str(tmp_path / "v.mp4")]) == 2
    assert "is not KEY=VALUE" in capsys.readouterr().err



def test_df_trainer_batches_first_clips_with_clips_that_have_context(tmp_path, tiny_dirs):
    """A first clip (no motion: no context frames, one timestep, no loss mask) and a later clip
    (per-token timesteps, context out of the loss) train in one batch; the first clip's loss
    covers every frame."""
    from cliploom.models import load_model
    from cliploom.train.config import config_from_dict
    from cliploom.train.loop import SVITrainer, _batch_timesteps

    cfg = config_from_dict(dict(model=str(tiny_dirs["wan21"]), out_dir=str(tmp_path / "run"), rank=4, alpha=8, frames=9,
                                steps=8, batch_size=4, replay_capacity=4, replay_dtype="float32", checkpoint_every=10,
                                lr=0.02, route="df", context_noise_max=50, no_motion_prob=0.5,
                                motion_source="previous_clip"))
    trainer = SVITrainer(cfg, model=load_model(tiny_dirs["wan21"], device="cpu"), progress=False)
    mixed = 0
    for _ in range(4):
        info = trainer.train_step()
        assert np.isfinite(info.loss)
        kinds = {s.cond.known is None for s in info.samples}
        mixed += kinds == {True, False}
    assert mixed, "no batch mixed first clips with later ones in 4 steps: the test did not exercise the mix"
    one, per_token = torch.full((1,), 700.0), torch.tensor([[0.0, 0.0, 700.0, 700.0]])
    batch = _batch_timesteps([one, per_token])
    assert batch.shape == (2, 4) and batch[0].tolist() == [700.0] * 4 and batch[1].tolist() == per_token[0].tolist()
    assert _batch_timesteps([one, one]).shape == (2,)


def test_df_trainer_gives_the_context_as_clean_frames_left_out_of_the_loss(tmp_path, tiny_dirs):
    from cliploom.models import load_model
    from cliploom.train.config import config_from_dict
    from cliploom.train.loop import SVITrainer

    cfg = config_from_dict(dict(model=str(tiny_dirs["wan21"]), out_dir=str(tmp_path / "run"), rank=4, alpha=8, frames=9,
                                steps=3, replay_capacity=4, replay_dtype="float32", checkpoint_every=10, lr=0.02,
                                route="df", context_noise_max=50, no_motion_prob=0.0, motion_source="previous_clip",
                                p_y_error=1.0, p_clean=0.0))
    trainer = SVITrainer(cfg, model=load_model(tiny_dirs["wan21"], device="cpu"), progress=False)
    for _ in range(2):
        info = trainer.train_step()
        assert np.isfinite(info.loss)
    for s in info.samples:
        assert s.cond.known is not None and s.cond.y is not None
        assert s.loss_mask[0, 0, :, 0, 0].tolist() == [0.0, 0.0, 1.0]  # anchor and context: given, not predicted
        assert 0 <= s.choice.context_noise <= 50
        assert s.cond.known_timesteps[0, 0, :, 0, 0].tolist() == [0.0, float(s.choice.context_noise), 0.0]
    # The exported LoRA names its route; inspect says it; the SVI loop refuses it in one line.
    from cliploom.engine import check_lora_routes
    from cliploom.models.inspect import describe_file
    from cliploom.story import LoraSpec

    lora = trainer.export(["svi"])[0]
    assert describe_file(lora)["route"] == "df"
    check_lora_routes([LoraSpec(lora)], "df")
    with pytest.raises(CliploomError, match="was trained for route df; this story runs route svi") as err:
        check_lora_routes([LoraSpec(lora)], "svi")
    assert "route: df" in err.value.fix
    for bad, message in (({"route": "df", "latent_mode_prob": 0.5}, "pro timeline"),
                         ({"context_noise_max": 20}, "diffusion-forcing setting"),
                         ({"route": "df", "context_noise_max": 1000}, "not a timestep")):
        with pytest.raises(CliploomError, match=message):
            config_from_dict(dict(model="builtin", **bad))


def test_a_story_lora_trained_for_the_route_replaces_the_models_own(tmp_path, reference_png):
    """A LoRA in `loras:` tagged for the story's route (cliploom_route, as train-svi writes) takes the
    model's own route / SVI LoRA's place instead of being stacked on it (stacked, a student continued
    from the shipped one counts twice); an untagged LoRA (a style) is stacked; svi_lora: false turns
    the model's own off. Under first_clip: i2v the story's own SVI LoRA is off on clip 0 as the
    model's is."""
    import shutil

    from safetensors.torch import load_file, save_file

    from cliploom.engine import Engine
    from cliploom.story import ClipSpec, LoraSpec

    engine = Engine.load("builtin", device="cpu")
    folder = engine.model.path
    own = tmp_path / "my_student.safetensors"
    shutil.copy(folder / "self-forcing_lora.safetensors", own)  # tagged self-forcing
    style = tmp_path / "style.safetensors"
    save_file(load_file(str(folder / "self-forcing_lora.safetensors")), str(style))  # the same pairs, untagged

    def story(route="self-forcing", n=1, **kw):
        return make_story(clips=[ClipSpec(f"a red circle moves {w}") for w in ["right", "up"][:n]],
                          reference=reference_png, route=route, **kw)

    def names(s):
        return [spec.path.name for spec in engine.default_loras(s)]

    assert names(story()) == ["self-forcing_lora.safetensors"]
    assert names(story(loras=[LoraSpec(own)])) == []
    assert names(story(loras=[LoraSpec(style)])) == ["self-forcing_lora.safetensors"]
    assert names(story(loras=[LoraSpec(style)], svi_lora=False)) == []
    with pytest.raises(CliploomError, match="svi_lora: false turns off its own"):
        engine.default_loras(story(svi_lora=False))
    mine = tmp_path / "my_svi.safetensors"
    shutil.copy(folder / "svi_lora.safetensors", mine)  # tagged svi
    assert names(story("svi")) == ["svi_lora.safetensors"] and names(story("svi", loras=[LoraSpec(mine)])) == []
    keys = dict(width=32, height=32, frames=9, steps=2, seam_blend=0)
    shipped = list(engine.generate(story("svi", 2, **keys), progress=False))
    replaced = list(Engine.load("builtin", device="cpu").generate(story("svi", 2, loras=[LoraSpec(mine)], **keys),
                                                                 progress=False))
    # the same weights (a copy of the file) named otherwise: off on clip 0, on after; one computation, two
    # LoRA names in one process: a tolerance all the same
    for a, b in zip(shipped, replaced):
        torch.testing.assert_close(a.latents, b.latents, atol=1e-5, rtol=1e-5)


def test_a_models_route_options_are_its_stories_defaults(tiny_story):
    """cliploom.json's route_options: the defaults of a route's options for the model's weights; a story's
    own options win; other routes untouched; bad entries refused on load, one line naming the problem."""
    from cliploom.models.components import ModelSettings

    settings = ModelSettings.checked({"route_options": {"helios": {"mid": 0, "short": 1}}}, "cliploom.json")
    story = tiny_story(2, route="helios").resolve(settings)
    assert story.route_option("mid") == 0 and story.route_option("short") == 1 and story.route_option("long") == 4
    own = tiny_story(2, route="helios", route_options={"mid": 3}).resolve(settings)
    assert own.route_option("mid") == 3 and own.route_option("short") == 1
    assert tiny_story(2, route="causal").resolve(settings).route_options == {}
    assert tiny_story(2, route="helios").resolve(ModelSettings.checked({}, "x")).route_options == {}
    for bad, message in (({"warp": {"mid": 0}}, "unknown route 'warp'"),
                         ({"helios": {"window": 2}}, "route helios has no option 'window'"),
                         ({"helios": {"mid": 99}}, "route option mid 99 is out of range"),
                         ({"helios": 0}, "route_options must map route names to options")):
        with pytest.raises(CliploomError, match=message) as err:
            ModelSettings.checked({"route_options": bad}, "cliploom.json")
        assert len(str(err.value).splitlines()) == 1
