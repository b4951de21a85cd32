"""The SVI LoRA trainer: error formulas, injection rules, conditioning shared with the engine, data,
plain fine-tuning as the zero-probability case, and a CPU run that saves, resumes and exports."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cliploom import conditioning as C
from cliploom.cli import main
from cliploom.errors import CliploomError
from cliploom.models.components import frames_to_tensor
from cliploom.sampling import euler_step, schedule
from cliploom.train import config as config_mod
from cliploom.train.config import TrainConfig, config_from_dict
from cliploom.train.data import DataClip, ShapesWorldClips, VideoFolderClips
from cliploom.train.recycling import ErrorRecycler, clean_end_error, noise_end_error
from cliploom.train.samples import Choice, build_sample, draw_choice


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run many tiny ops: on a shared 2-core machine one thread is several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the two error formulas --------------------------------------------------------------------------


def test_one_step_errors_match_hand_computed_values():
    v_hat = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    v = torch.tensor([[0.5, 2.0], [1.0, -1.0]])  # v_hat - v = [[0.5, 0], [2, 5]]
    assert clean_end_error(v_hat, v, 0.25).tolist() == [[-0.125, 0.0], [-0.5, -1.25]]
    assert noise_end_error(v_hat, v, 0.25).tolist() == [[0.375, 0.0], [1.5, 3.75]]
    # one sigma per sample of a batch
    vb_hat, vb = torch.ones(2, 1, 1, 1, 2), torch.zeros(2, 1, 1, 1, 2)
    sig = torch.tensor([0.2, 0.9])
    assert clean_end_error(vb_hat, vb, sig).flatten().tolist() == pytest.approx([-0.2, -0.2, -0.9, -0.9])
    assert noise_end_error(vb_hat, vb, sig).flatten().tolist() == pytest.approx([0.8, 0.8, 0.1, 0.1])


def test_errors_are_the_residuals_of_one_euler_step_to_either_end():
    g = torch.Generator().manual_seed(0)
    x0, noise, v_hat = (torch.randn(3, 4, generator=g) for _ in range(3))
    sigma = 0.3
    x_t = (1 - sigma) * x0 + sigma * noise
    v = noise - x0
    x0_hat = euler_step(x_t, v_hat, sigma, 0.0)  # the engine's own integrator
    x1_hat = euler_step(x_t, v_hat, sigma, 1.0)
    assert torch.allclose(x0_hat - euler_step(x_t, v, sigma, 0.0), clean_end_error(v_hat, v, sigma), atol=1e-6)
    assert torch.allclose(x1_hat - euler_step(x_t, v, sigma, 1.0), noise_end_error(v_hat, v, sigma), atol=1e-6)
    assert torch.allclose(euler_step(x_t, v, sigma, 0.0), x0, atol=1e-6)


# -- injection rules and banking ---------------------------------------------------------------------


def _recycler(**kw):
    cfg = TrainConfig(replay_capacity=8, replay_dtype="float32", **kw)
    return ErrorRecycler(cfg, schedule(cfg.replay_bins, 5.0)[:-1] * 1000)


def test_draws_follow_each_probability_and_clean_steps_inject_nothing():
    g = torch.Generator().manual_seed(0)
    always = _recycler(p_latent_error=1, p_y_error=1, p_noise_error=1, p_clean=0)
    assert {always.draw(g).flags() for _ in range(20)} == {"LYN"}
    assert {_recycler(p_clean=1).draw(g).flags() for _ in range(20)} == {"C"}
    never = _recycler(p_latent_error=0, p_y_error=0, p_noise_error=0, p_clean=0)
    assert {never.draw(g).flags() for _ in range(20)} == {"-"}
    off = _recycler(error_recycling=False, p_latent_error=1, p_y_error=1, p_noise_error=1, p_clean=0)
    assert {off.draw(g).flags() for _ in range(20)} == {"-"}
    rec = _recycler()  # official: 0.9 / 0.9 / 0.01, clean 0.2
    draws = [rec.draw(g) for _ in range(4000)]
    assert 0.17 < np.mean([d.clean for d in draws]) < 0.23
    assert 0.69 < np.mean([d.latent for d in draws]) < 0.75  # 0.9 of the 0.8 non-clean steps
    assert np.mean([d.noise for d in draws]) < 0.02


def test_banking_files_both_errors_and_updates_rarely_on_clean_steps():
    rec = _recycler(clean_update_prob=0.0)
    g = torch.Generator().manual_seed(1)
    v_hat, v = torch.ones(2, 1, 1, 1, 2), torch.zeros(2, 1, 1, 1, 2)
    sig = torch.tensor([0.5, 0.5])
    assert rec.bank(v_hat, v, sig, [False, True], g) == 1  # the clean step's sample is skipped
    t = 500.0
    assert rec.clean_memory.sample(t, g).flatten().tolist() == pytest.approx([-0.5, -0.5])
    assert rec.noise_memory.sample(t, g).flatten().tolist() == pytest.approx([0.5, 0.5])
    assert _recycler(clean_update_prob=1.0).bank(v_hat, v, sig, [True, True], g) == 2
    assert _recycler(error_recycling=False).bank(v_hat, v, sig, [False, False], g) == 0


def test_y_error_goes_into_the_motion_latents_of_y_only():
    rec = _recycler(y_error_frames=2)
    g = torch.Generator().manual_seed(0)
    anchor, motion = torch.zeros(1, 3, 1, 2, 2), torch.zeros(1, 3, 1, 2, 2)
    cond = C.latent_condition(anchor, motion, 5)
    mask_before = cond.y[:, :4].clone()
    error = torch.arange(5.0).view(1, 5, 1, 1).expand(3, 5, 2, 2)  # frame j holds j
    src, dst = rec.inject_y(cond, error, 1, g)
    y = cond.y[:, 4:]
    assert dst == 1 and 0 <= src <= 3
    assert torch.equal(cond.y[:, :4], mask_before)  # the mask is untouched
    assert y[:, :, 0].abs().sum() == 0  # the anchor (the user's image) stays clean
    assert y[0, 0, 1, 0, 0] == src and y[0, 0, 2, 0, 0] == src + 1
    assert y[:, :, 3:].abs().sum() == 0


# -- config ------------------------------------------------------------------------------------------


def test_defaults_are_the_official_values():
    cfg = TrainConfig()
    assert (cfg.rank, cfg.alpha, cfg.lr, cfg.grad_clip, cfg.batch_size) == (128, 128.0, 1e-4, 1.0, 1)
    assert cfg.targets == ["q", "k", "v", "o", "ffn.0", "ffn.2"]
    assert cfg.diffusers_targets == ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    assert (cfg.p_latent_error, cfg.p_y_error, cfg.p_noise_error, cfg.p_clean) == (0.9, 0.9, 0.01, 0.2)
    assert (cfg.replay_bins, cfg.replay_capacity, cfg.replay_replace, cfg.clean_update_prob) == (50, 500, "nearest", 0.1)
    assert cfg.velocity_target == "clean" and cfg.timestep_weighting == "gaussian"


@pytest.mark.parametrize("data, fragment", [
    ({"p_clean": 2}, "p_clean 2.0 is not a probability"),
    ({"wall_prob": -0.1}, "wall_prob -0.1 is not a probability"),
    ({"wall_move": "far"}, "wall_move 'far' is not one of"),
    ({"rank": 0}, "rank 0 must be at least 1"),
    ({"rnak": 4}, "unknown keys ['rnak']"),
    ({"frames": 10}, "frames 10 is not of the form 4k+1"),
    ({"data": "videos"}, "data: videos needs a folder"),
    ({"targets": "q"}, None),  # a single value is a one-element list
    ({"replay_replace": "fifo"}, "replay_replace 'fifo' is not one of"),
    ({"lr": "fast"}, "lr must be a number"),
])
def test_config_validation(data, fragment):
    if fragment is None:
        assert config_from_dict(data).targets == ["q"]
        return
    with pytest.raises(CliploomError) as err:
        config_from_dict(data, "c.yaml")
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_bad_config_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("p_noise_error: -1\n")
    assert main(["train-svi", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "p_noise_error" in err and len(err.splitlines()) == 1
    assert main(["train-svi", str(tmp_path / "missing.yaml")]) == 2
    path.write_text("steps: [1\n")
    assert main(["train-svi", str(path)]) == 2
    assert "malformed YAML" in capsys.readouterr().err


def test_gaussian_timestep_weights():
    from cliploom.train.loop import gaussian_weights

    t = schedule(1000, 5.0)[:-1] * 1000
    w = gaussian_weights(t)
    assert w.mean() == pytest.approx(1.0, abs=1e-5) and float(w.min()) == pytest.approx(0.0, abs=1e-6)
    mid = int(torch.argmin((t - 500).abs()))
    assert int(torch.argmax(w)) == mid
    raw = torch.exp(-2 * ((t - 500) / 1000) ** 2)
    expected = (raw - raw.min()) / (raw - raw.min()).mean()
    assert torch.allclose(w, expected, atol=1e-5)


# -- data --------------------------------------------------------------------------------------------


def test_shapesworld_clips_can_start_their_new_prompt_after_the_motion_memory():
    from cliploom.shapesworld import sample_sequence

    src = ShapesWorldClips(frames=9, size=32, segments=3, segment_frames=12, boundary_prob=1.0)
    g = torch.Generator().manual_seed(0)
    for motion in (5, 1):
        clip = src.clip(g, motion)
        assert clip.frames.shape == (9, 32, 32, 3) and clip.frames.dtype == np.uint8
        assert (clip.offset + motion) % 12 == 0  # the prompt changes right after the motion frames
        seed = int(clip.source.split(":")[1].split("@")[0])
        seq = sample_sequence(seed, 3, 12, size=32)
        assert clip.prompt == seq.prompts[(clip.offset + motion) // 12]
        assert np.array_equal(clip.frames, seq.frames(clip.offset, clip.offset + 9))
    with pytest.raises(CliploomError):
        ShapesWorldClips(frames=33, size=32, segments=1, segment_frames=20)


def test_shapesworld_clips_take_their_sequences_with_wall_stops_when_asked():
    from cliploom.shapesworld import sample_sequence

    assert config_from_dict({"wall_prob": 0.25}).wall_prob == 0.25 and config_from_dict({}).wall_prob == 0.0
    assert config_from_dict({"wall_move": "nearest"}).wall_move == "nearest"
    for move in ("any", "nearest"):
        src = ShapesWorldClips(frames=9, size=32, segments=3, segment_frames=12, boundary_prob=1.0, wall_prob=1.0,
                               wall_move=move)
        g = torch.Generator().manual_seed(0)
        walls = 0
        for _ in range(12):
            clip = src.clip(g, 1)
            seed = int(clip.source.split(":")[1].split("@")[0])
            seq = sample_sequence(seed, 3, 12, size=32, wall_prob=1.0, wall_move=move)
            assert np.array_equal(clip.frames, seq.frames(clip.offset, clip.offset + 9))
            walls += seq.motions != sample_sequence(seed, 3, 12, size=32).motions
        assert walls > 0


def _write_mp4(path: Path, frames: np.ndarray, fps: int = 16):
    import av

    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "0", "tune": "zerolatency"}
        for f in frames:
            for packet in stream.encode(__import__("av").VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def test_video_folder_clips_with_captions_offsets_stride_and_crop(tmp_path):
    n = 30
    ramp = np.stack([np.full((40, 48, 3), 6 * i, np.uint8) for i in range(n)])  # frame i is grey 6*i
    _write_mp4(tmp_path / "ramp.mp4", ramp)
    (tmp_path / "ramp.txt").write_text("a grey ramp\n")
    sub = tmp_path / "more"
    sub.mkdir()
    _write_mp4(sub / "short.mp4", ramp[:4])
    with pytest.warns(UserWarning, match="short.mp4"):
        src = VideoFolderClips(tmp_path, frames=5, width=32, height=16, stride=2, default_caption="none")
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(6):
        clip = src.clip(g)
        assert clip.frames.shape == (5, 16, 32, 3) and clip.prompt == "a grey ramp"
        means = clip.frames.reshape(5, -1).mean(1)
        assert np.allclose(means, 6 * (clip.offset + 2 * np.arange(5)), atol=3)
        starts.add(clip.offset)
    assert len(starts) > 1 and max(starts) <= n - 9
    # anchors: "motion" is the clip's last motion frame (frame 2 of the clip with 3 motion frames),
    # "past" never later than it
    for _ in range(4):
        clip = src.clip(g, 3, far_anchor="motion")
        assert abs(float(clip.anchor.mean()) - 6 * (clip.offset + 2 * 2)) <= 3
        clip = src.clip(g, 3, far_anchor="past")
        assert float(clip.anchor.mean()) <= 6 * (clip.offset + 2 * 2) + 3
    with pytest.raises(CliploomError, match="no video"):
        VideoFolderClips(sub, frames=5, width=32, height=16)


# -- conditioning is the engine's --------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan21(tiny_dirs):
    """A private copy of the tiny wan21 model (the trainer attaches a LoRA to its transformer)."""
    from cliploom.models import load_model

    return load_model(tiny_dirs["wan21"], device="cpu")


def _clip(frames=9, seed=0):
    src = ShapesWorldClips(frames=frames, size=32, segments=2, segment_frames=frames, boundary_prob=0.0)
    return src.clip(torch.Generator().manual_seed(seed), 1)


def test_latent_mode_sample_is_built_by_the_engine_function(wan21, monkeypatch):
    calls = []
    real = C.latent_condition
    monkeypatch.setattr(C, "latent_condition", lambda *a, **k: calls.append(a) or real(*a, **k))
    clip = _clip()
    sample = build_sample(wan21, clip, Choice("latent", motion=1, ref_index=6))
    assert len(calls) == 1
    video = frames_to_tensor(clip.frames)
    latents = wan21.encode_video(video)
    y = sample.cond.y[:, 4:]
    assert torch.allclose(sample.latents, latents)
    assert torch.allclose(y[:, :, :1], wan21.encode_video(video[:, :, 6:7]), atol=1e-5)  # anchor: frame 6
    assert torch.equal(y[:, :, 1:2], latents[:, :, 1:2])  # motion: the clip's first 4-frame latent
    assert y[:, :, 2:].abs().sum() == 0
    assert torch.equal(sample.cond.y[:, :4], C.pixel_frame_mask(9, 4, 4))
    assert sample.error_start == 1 and sample.cond.image_embeds is not None
    first = build_sample(wan21, clip, Choice("latent", motion=0, ref_index=6))
    assert torch.equal(first.cond.y[:, 4:, :1], latents[:, :, :1]) and first.error_start is None
    assert first.cond.y[:, 4:, 1:].abs().sum() == 0


def test_y_error_on_anchor_starts_the_errors_at_the_anchor_latent(wan21):
    clip = _clip()
    cfg = TrainConfig(y_error_on_anchor=True, latent_mode_prob=1.0, no_motion_prob=0.0, motion_latents=[1])
    choice = draw_choice(cfg, 9, torch.Generator().manual_seed(0))
    assert choice.anchor_error and choice.mode == "latent" and choice.motion == 1
    sample = build_sample(wan21, clip, choice)
    assert sample.error_start == 0
    before = sample.cond.y.clone()
    error = torch.ones(sample.latents.shape[1:]) * torch.arange(1.0, 4.0).view(1, 3, 1, 1)
    _recycler(y_error_frames=2).inject_y(sample.cond, error, sample.error_start, torch.Generator().manual_seed(0))
    added = (sample.cond.y - before)[:, 4:]
    assert added[:, :, 0].abs().sum() > 0 and added[:, :, 1].abs().sum() > 0  # anchor and motion latent
    # the mask channels are not computed on, only carried: an exact copy
    assert added[:, :, 2:].abs().sum() == 0 and torch.equal(sample.cond.y[:, :4], before[:, :4])
    plain = build_sample(wan21, clip, draw_choice(TrainConfig(latent_mode_prob=1.0, no_motion_prob=0.0, motion_latents=[1]),
                                                  9, torch.Generator().manual_seed(0)))
    assert plain.error_start == 1  # the default keeps the anchor clean
    with pytest.raises(CliploomError, match="y_error_on_anchor"):
        config_from_dict({"y_error_on_anchor": True, "error_recycling": False})
    with pytest.raises(CliploomError, match="y_error_on_anchor"):
        config_from_dict({"y_error_on_anchor": True, "latent_mode_prob": 0.0})


def test_pixel_mode_sample_is_built_by_the_engine_functions(wan21, monkeypatch):
    calls = []
    real_video, real_cond = C.pixel_motion_video, C.pixel_condition
    monkeypatch.setattr(C, "pixel_motion_video", lambda *a, **k: calls.append("video") or real_video(*a, **k))
    monkeypatch.setattr(C, "pixel_condition", lambda *a, **k: calls.append("cond") or real_cond(*a, **k))
    clip = _clip(seed=3)
    sample = build_sample(wan21, clip, Choice("pixel", motion=5, ref_pad=0, ref_index=7))
    assert calls == ["video", "cond"]
    video = frames_to_tensor(clip.frames)
    expected = torch.cat([video[:, :, :5], torch.zeros(1, 3, 4, 32, 32)], dim=2)
    assert torch.allclose(sample.cond.y[:, 4:], wan21.encode_video(expected), atol=1e-5)
    assert sample.error_start == 0


# -- training steps ----------------------------------------------------------------------------------

ZERO = dict(p_latent_error=0.0, p_y_error=0.0, p_noise_error=0.0, p_clean=0.0)


def _cfg(tmp_path, model_dir, **kw):
    values = dict(model=str(model_dir), out_dir=str(tmp_path / "run"), rank=4, alpha=8, frames=9, steps=3,
                  replay_capacity=4, replay_dtype="float32", latent_mode_prob=0.5, checkpoint_every=2, lr=0.02,
                  text_cache=4)
    values.update(kw)
    return config_from_dict(values)


def _prefill(trainer, scale=0.5):
    """Put large errors in every bin, so any injection changes the step."""
    g = torch.Generator().manual_seed(9)
    shape = (16, 3, 4, 4)
    for t in trainer.recycler.clean_memory.grid.tolist():
        trainer.recycler.clean_memory.add(scale * torch.randn(shape, generator=g), t)
        trainer.recycler.noise_memory.add(scale * torch.randn(shape, generator=g), t)


def _lora_params(transformer):
    return {n: p.detach().clone() for n, p in transformer.named_parameters() if "lora_" in n}


def test_with_every_injection_off_a_step_is_plain_lora_fine_tuning(tmp_path, tiny_dirs):
    from cliploom.models import load_model
    from cliploom.train.adapter import attach_lora
    from cliploom.train.loop import SVITrainer

    def trainer(**kw):
        cfg = _cfg(tmp_path, tiny_dirs["wan21"], timestep_weighting="none", **kw)
        t = SVITrainer(cfg, model=load_model(tiny_dirs["wan21"], device="cpu"), progress=False)
        _prefill(t)
        return t, cfg

    plain, cfg = trainer(**ZERO)
    before = _lora_params(plain.transformer)
    info = plain.train_step()
    assert info.injections == ["-"] and info.banked == 1
    after = _lora_params(plain.transformer)

    # The same step written out by hand: x_t = (1 - s) x0 + s n, target n - x0, MSE, clip, AdamW.
    ref_model = load_model(tiny_dirs["wan21"], device="cpu")
    params = attach_lora(ref_model.transformer, cfg, seed=cfg.seed)
    ref = ref_model.transformer
    assert all(torch.equal(p, before[n]) for n, p in _lora_params(ref).items())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    s = info.samples[0]
    sigma = float(info.sigmas[0])
    x0, noise = s.latents, info.noise
    x_t = (1 - sigma) * x0 + sigma * noise
    out = ref(hidden_states=s.cond.model_input(x_t), timestep=torch.tensor([sigma * 1000]),
              encoder_hidden_states=ref_model.encode_text([s.prompt]),
              encoder_hidden_states_image=s.cond.image_embeds, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(out, noise - x0)
    assert loss.item() == pytest.approx(info.loss, rel=1e-5)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    expected = _lora_params(ref)
    assert all(torch.allclose(after[n], expected[n], atol=1e-6) for n in expected)
    assert any(not torch.equal(after[n], before[n]) for n in before)

    # With injections on, the same draws give another step.
    noisy, _ = trainer(p_latent_error=1.0, p_y_error=1.0, p_noise_error=1.0, p_clean=0.0)
    info2 = noisy.train_step()
    assert info2.injections[0] in ("LYN", "LN")  # y only when the sample has motion memory
    assert torch.equal(info2.noise, info.noise) and info2.loss != pytest.approx(info.loss, rel=1e-3)
    changed = _lora_params(noisy.transformer)
    assert any(not torch.allclose(changed[n], after[n], atol=1e-6) for n in after)


def test_movement_map_marks_where_the_clip_moves_per_latent_cell():
    from cliploom.train.samples import movement_map

    video = torch.full((1, 3, 9, 16, 16), -0.5)  # a still background, 9 frames -> 3 latent frames
    assert movement_map(video, 3, 4).abs().max() == 0  # nothing moves: no weight anywhere
    for f in range(9):  # a 2x2 square moving right along row 1 of 4x4 cells
        video[0, :, f, 4:6, 2 * f - 1 if f else 0:2 * f + 1 if f else 2] = 0.8
    m = movement_map(video, 3, 4)
    assert m.shape == (1, 1, 3, 4, 4) and float(m.max()) == pytest.approx(1.0)
    assert float(m[..., 1, :].sum()) > 0 and float(m[..., [0, 2, 3], :].abs().max()) == 0  # only the square's row


def _weighted_step(tmp_path, tiny_dirs, **kw):
    """One training step with ``motion_weight: 3`` (and ``kw``), and the same first sample's velocity
    predicted again by a fresh copy of the LoRA: ``(info, sample, sigma, x_t, prediction, squared error)``."""
    from cliploom.models import load_model
    from cliploom.train.adapter import attach_lora
    from cliploom.train.loop import SVITrainer

    cfg = _cfg(tmp_path, tiny_dirs["wan21"], timestep_weighting="none", motion_weight=3.0, **kw, **ZERO)
    t = SVITrainer(cfg, model=load_model(tiny_dirs["wan21"], device="cpu"), progress=False)
    info = t.train_step()
    ref_model = load_model(tiny_dirs["wan21"], device="cpu")
    attach_lora(ref_model.transformer, cfg, seed=cfg.seed)
    s, sigma = info.samples[0], float(info.sigmas[0])
    x_t = (1 - sigma) * s.latents + sigma * info.noise
    with torch.no_grad():
        out = ref_model.transformer(hidden_states=s.cond.model_input(x_t), timestep=torch.tensor([sigma * 1000]),
                                    encoder_hidden_states=ref_model.encode_text([s.prompt]),
                                    encoder_hidden_states_image=s.cond.image_embeds, return_dict=False)[0]
    return info, s, sigma, x_t, out, (out - (info.noise - s.latents)) ** 2


def test_motion_weight_weighs_the_loss_where_the_clip_moves(tmp_path, tiny_dirs):
    """The step's loss is the per-cell MSE weighted by 1 + motion_weight x the clip's movement map."""
    info, s, sigma, x_t, out, sq = _weighted_step(tmp_path, tiny_dirs)
    w = (1 + 3.0 * s.motion_map).expand_as(sq)
    assert float(s.motion_map.max()) == pytest.approx(1.0)  # a ShapesWorld clip moves somewhere
    weighted = float((sq * w).sum() / w.sum())
    assert weighted == pytest.approx(info.loss, rel=1e-5)
    assert float(sq.mean()) != pytest.approx(info.loss, rel=1e-3)  # and the weighting changed it
    with pytest.raises(CliploomError, match="motion_weight must not be negative"):
        _cfg(tmp_path, tiny_dirs["wan21"], motion_weight=-1)


def test_invented_movement_marks_motion_the_prediction_adds_to_the_clip():
    from cliploom.train.samples import invented_movement

    x0 = torch.randn(2, 4, 5, 4, 4) * 0.1
    x0[1, :, :, 1, 1] += torch.arange(5.0).view(1, 5)  # sample 1 moves in one cell (its own scale)
    assert invented_movement(x0, x0).abs().max() == 0  # the clip predicted as it is: nothing invented
    still = x0[:, :, :1].expand(-1, -1, 5, -1, -1).clone()  # a clip that stops (every frame its first)
    hat = still.clone()
    hat[:, :, 3:, 2, 3] += 3.0  # the prediction moves something into cell (2, 3) for the last two latent frames
    m = invented_movement(hat, still)
    assert m.shape == (2, 1, 5, 4, 4) and float(m.max()) == 1.0 and float(m.min()) == 0.0
    assert float(m[:, :, 3:, 2, 3].min()) == 1.0  # the invented motion at full weight (the cap)
    assert float(m[:, :, :, :2].abs().max()) == 0  # nothing where prediction and clip agree
    moving = x0.clone()
    hat = moving.clone()
    hat[1, :, :, 1, 1] = moving[1, :, 2:3, 1, 1].expand(-1, 5)  # the prediction freezes the moving cell
    assert invented_movement(hat, moving).abs().max() == 0  # moving less than the clip is the target map's job


def test_motion_weight_on_both_also_weighs_motion_the_prediction_invents(tmp_path, tiny_dirs):
    """``motion_weight_on: both``: the weights are 1 + motion_weight x the larger of the clip's movement
    map and the movement the model's predicted clip adds to it."""
    from cliploom.train.samples import invented_movement

    info, s, sigma, x_t, out, sq = _weighted_step(tmp_path, tiny_dirs, motion_weight_on="both")
    invented = invented_movement(x_t - sigma * out, s.latents)
    assert float(invented.max()) > 0  # an untrained LoRA's prediction moves where the clip does not
    w = (1 + 3.0 * torch.maximum(s.motion_map, invented)).expand_as(sq)
    assert float((sq * w).sum() / w.sum()) == pytest.approx(info.loss, rel=1e-4)
    target_only = (1 + 3.0 * s.motion_map).expand_as(sq)
    assert float((sq * target_only).sum() / target_only.sum()) != pytest.approx(info.loss, rel=1e-4)
    with pytest.raises(CliploomError, match="motion_weight_on: both .* motion_weight is 0"):
        _cfg(tmp_path, tiny_dirs["wan21"], motion_weight_on="both")
    with pytest.raises(CliploomError, match="motion_weight_on"):
        _cfg(tmp_path, tiny_dirs["wan21"], motion_weight=1.0, motion_weight_on="prediction")
    with pytest.raises(CliploomError, match="route df"):
        _cfg(tmp_path, tiny_dirs["wan21"], motion_weight=1.0, motion_weight_on="both", route="df", latent_mode_prob=1.0)


@pytest.mark.parametrize("variant, extra", [("wan22", {"expert": "low"}), ("ti2v", {})])
def test_other_families_train(tmp_path, tiny_dirs, variant, extra):
    from cliploom.models import load_model
    from cliploom.train.loop import SVITrainer

    cfg = _cfg(tmp_path, tiny_dirs[variant], checkpoint_every=10, **extra)
    model = load_model(tiny_dirs[variant], device="cpu")
    t = SVITrainer(cfg, model=model, progress=False)
    for _ in range(2):
        info = t.train_step()
        assert np.isfinite(info.loss)
    if variant == "wan22":
        assert t.transformer is model.transformer_2 and all(ts < 875 for ts in info.timesteps)
        with pytest.raises(CliploomError, match="two experts"):
            SVITrainer(_cfg(tmp_path, tiny_dirs[variant]), model=load_model(tiny_dirs[variant], device="cpu"))
    else:
        assert info.samples[0].loss_mask is not None  # TI2V: the known frames are not in the loss


def _checkpoint_tensors(folder: Path):
    from safetensors.torch import load_file

    return {name: load_file(str(folder / name)) for name in ("lora.safetensors", "optimizer.safetensors",
                                                             "replay-rank0.safetensors")}


def test_three_step_run_saves_resumes_and_exports_loras_that_load(tmp_path, tiny_dirs, capsys, reference_png):
    model_dir = tiny_dirs["wan21"]
    straight = tmp_path / "straight.yaml"
    straight.write_text(yaml.safe_dump(_cfg(tmp_path, model_dir, out_dir=str(tmp_path / "a")).to_dict()))
    assert main(["train-svi", str(straight), "-q"]) == 0
    run_a = tmp_path / "a"
    assert sorted(p.name for p in (run_a / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    rows = (run_a / "train.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]
    state = json.loads((run_a / "checkpoints" / "step-0000003" / "state.json").read_text())
    assert state["step"] == 3 and state["config"]["rank"] == 4

    # Interrupted after 2 steps, then resumed: the very same LoRA, optimizer and replay memory.
    split = tmp_path / "split.yaml"
    split.write_text(yaml.safe_dump(_cfg(tmp_path, model_dir, out_dir=str(tmp_path / "b")).to_dict()))
    assert main(["train-svi", str(split), "--max-steps", "2", "-q"]) == 0
    assert "stopped at step 2/3" in capsys.readouterr().out
    assert not (tmp_path / "b" / "lora_svi.safetensors").exists()
    assert main(["train-svi", str(split), "-q"]) == 2  # checkpoints there: --resume is needed
    assert "--resume" in capsys.readouterr().err
    assert main(["train-svi", str(split), "--resume", "-q"]) == 0
    # A product claim, exact on one machine: a resumed run ends where an uninterrupted one does.
    a = _checkpoint_tensors(run_a / "checkpoints" / "step-0000003")
    b = _checkpoint_tensors(tmp_path / "b" / "checkpoints" / "step-0000003")
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
    assert [r.split(",")[0] for r in (tmp_path / "b" / "train.csv").read_text().splitlines()[1:]] == ["1", "2", "3"]
    changed = yaml.safe_load(split.read_text()) | {"rank": 8}
    split.write_text(yaml.safe_dump(changed))
    assert main(["train-svi", str(split), "--resume", "-q"]) == 2
    assert "rank" in capsys.readouterr().err

    # Both export layouts load through the engine's LoRA stack and give the frames the
    # trained adapter gives in memory.
    from safetensors import safe_open

    svi, dif = run_a / "lora_svi.safetensors", run_a / "lora_diffusers.safetensors"
    with safe_open(str(svi), "pt") as f:
        keys = list(f.keys())
        assert "blocks.0.self_attn.q.lora_A.default.weight" in keys and "blocks.1.ffn.2.lora_B.default.weight" in keys
        assert f.metadata()["cliploom_layout"] == "svi"
    with safe_open(str(dif), "pt") as f:
        assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in f.keys()
    assert main(["export-lora", str(run_a), "-o", str(tmp_path / "again.safetensors"), "--layout", "svi"]) == 0
    with safe_open(str(tmp_path / "again.safetensors"), "pt") as f, safe_open(str(svi), "pt") as g:
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in keys)

    # A later stage from the command line: another seed, continuing the exported LoRA.
    assert main(["train-svi", str(straight), "--seed", "7", "--init-lora", str(svi), "--out-dir",
                 str(tmp_path / "c"), "--max-steps", "1", "-q"]) == 0
    state = json.loads((tmp_path / "c" / "checkpoints" / "step-0000001" / "state.json").read_text())
    assert state["config"]["seed"] == 7 and state["config"]["init_lora"] == str(svi)

    frames = {name: _render(model_dir, reference_png, lora) for name, lora in
              [("base", None), ("svi", svi), ("diffusers", dif)]}
    frames["memory"] = _render_with_checkpoint(model_dir, reference_png, run_a / "checkpoints" / "step-0000003")
    diff = lambda x, y: (frames[x].int() - frames[y].int()).abs()  # noqa: E731
    assert diff("memory", "base").float().mean() > 1.0  # the LoRA matters
    for name in ("diffusers", "svi"):
        assert diff(name, "memory").max() <= 1 and diff(name, "memory").float().mean() < 0.05, name


def _story(reference_png, lora=None):
    from cliploom.story import ClipSpec, LoraSpec, make_story

    return make_story(clips=[ClipSpec("a red circle"), ClipSpec("a blue square")], reference=reference_png,
                      frames=9, steps=2, seed=5, width=32, height=32, loras=[LoraSpec(lora)] if lora else [])


def _render(model_dir, reference_png, lora):
    from cliploom.engine import Engine

    engine = Engine.load(model_dir, device="cpu")
    return torch.cat([c.frames for c in engine.generate(_story(reference_png, lora), progress=False)])


def _render_with_checkpoint(model_dir, reference_png, folder):
    """The trained adapter in memory (peft, unfused), through the same clip loop."""
    from cliploom.loom import weave
    from cliploom.models import load_model
    from cliploom.train.adapter import attach_lora, load_lora_state
    from cliploom.train.checkpoint import read_checkpoint_lora

    model = load_model(model_dir, device="cpu")
    state, meta = read_checkpoint_lora(folder)
    attach_lora(model.transformer, config_from_dict(meta["config"]))
    load_lora_state(model.transformer, state)
    model.transformer.eval()
    return torch.cat([c.frames for c in weave(model, _story(reference_png), progress=False)])


def test_module_documents_every_knob():
    doc = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    missing = [f.name for f in config_mod.dataclasses.fields(TrainConfig) if f"`{f.name}`" not in doc]
    assert not missing, f"docs/training.md does not describe {missing}"


def test_data_clip_roundtrip_type():
    clip = DataClip(np.zeros((5, 8, 8, 3), np.uint8), "p", "x")
    assert clip.offset == 0


def test_far_anchor_comes_from_the_source_and_leaves_other_streams_alone(wan21):
    src = ShapesWorldClips(frames=9, size=32, segments=3, segment_frames=12, boundary_prob=0.0)
    near = src.clip(torch.Generator().manual_seed(5), 5)
    far = src.clip(torch.Generator().manual_seed(5), 5, far_anchor="any")
    assert near.anchor is None and np.array_equal(near.frames, far.frames)  # the same clip either way
    assert far.anchor.shape == (1, 32, 32, 3)
    sample = build_sample(wan21, far, Choice("latent", motion=1, ref_index=2, far_anchor=True))
    anchor = wan21.encode_video(frames_to_tensor(far.anchor))
    assert torch.allclose(sample.cond.y[:, 4:, :1], anchor, atol=1e-5)  # y's anchor is the far frame
    pixel = build_sample(wan21, far, Choice("pixel", motion=5, ref_pad=-1, ref_index=2, far_anchor=True))
    video = frames_to_tensor(far.frames)
    expected = torch.cat([video[:, :, :5], frames_to_tensor(far.anchor).expand(-1, -1, 4, -1, -1)], dim=2)
    assert torch.allclose(pixel.cond.y[:, 4:], wan21.encode_video(expected), atol=1e-5)
    # The far draw comes last and only when asked for: the other draws are the same either way.
    from cliploom.train.samples import draw_choice

    never, always = TrainConfig(anchor_far_prob=0.0), TrainConfig(anchor_far_prob=1.0)
    for seed in range(20):
        a = draw_choice(never, 9, torch.Generator().manual_seed(seed))
        b = draw_choice(always, 9, torch.Generator().manual_seed(seed))
        assert (a.mode, a.motion, a.ref_pad, a.ref_index) == (b.mode, b.motion, b.ref_pad, b.ref_index)
        assert not a.far_anchor and b.far_anchor == (b.motion > 0)


def test_anchor_from_past_never_shows_a_frame_the_clip_has_yet_to_reach():
    """`anchor_from: past`: the anchor is a frame of the source at or before the clip's last motion
    frame (as at inference); "any" (far anchors) also draws later frames -- the leak it removes."""
    from cliploom.shapesworld import sample_sequence
    from cliploom.train.config import validate
    from cliploom.train.samples import draw_choice

    src = ShapesWorldClips(frames=9, size=32, segments=3, segment_frames=12, boundary_prob=0.0)

    def anchor_index(clip):
        seed = int(clip.source.split(":")[1].split("@")[0])
        frames = sample_sequence(seed, 3, 12, size=32).frames(0, 36)
        return [k for k in range(36) if np.array_equal(frames[k], clip.anchor[0])]

    later = 0
    for seed in range(30):
        past = src.clip(torch.Generator().manual_seed(seed), 5, far_anchor="past")
        last_motion = past.offset + 5 - 1
        assert min(anchor_index(past)) <= last_motion
        anywhere = src.clip(torch.Generator().manual_seed(seed), 5, far_anchor="any")
        later += min(anchor_index(anywhere)) > anywhere.offset + 5 - 1
    assert later >= 5  # anywhere-anchors do come from ahead of the clip (30 draws, about half expected)
    # `motion`: always the clip's last motion frame, what `anchor: last_frame` hands on at inference
    for seed in range(10):
        clip = src.clip(torch.Generator().manual_seed(seed), 5, far_anchor="motion")
        assert np.array_equal(clip.anchor[0], clip.frames[4])
    motion_cfg = TrainConfig(anchor_from="motion")
    assert all(draw_choice(motion_cfg, 9, torch.Generator().manual_seed(s)).far_anchor ==
               (draw_choice(motion_cfg, 9, torch.Generator().manual_seed(s)).motion > 0) for s in range(20))
    # Every sample with motion takes the past anchor; the other draws are the official config's.
    official, past_cfg = TrainConfig(), TrainConfig(anchor_from="past")
    for seed in range(20):
        a = draw_choice(official, 9, torch.Generator().manual_seed(seed))
        b = draw_choice(past_cfg, 9, torch.Generator().manual_seed(seed))
        assert (a.mode, a.motion, a.ref_index) == (b.mode, b.motion, b.ref_index)
        assert not a.far_anchor and b.far_anchor == (b.motion > 0)
    with pytest.raises(CliploomError, match="anchor_from"):
        validate(TrainConfig(anchor_from="future"))
    with pytest.raises(CliploomError, match="far anchors"):
        validate(TrainConfig(route="causal", anchor_from="past", error_recycling=False))


def test_previous_clip_motion_is_the_last_latent_of_the_clip_that_ends_there(wan21):
    from cliploom.shapesworld import sample_sequence

    src = ShapesWorldClips(frames=9, size=32, segments=3, segment_frames=12, boundary_prob=0.5)
    clip = src.clip(torch.Generator().manual_seed(4), 5, history=4)
    seed, offset = clip.source.split(":")[1].split("@")
    full = sample_sequence(int(seed), 3, 12, size=32).frames()
    assert clip.history.shape == (4, 32, 32, 3) and int(offset) >= 4
    assert np.array_equal(clip.history, full[int(offset) - 4 : int(offset)])
    sample = build_sample(wan21, clip, Choice("latent", motion=1, ref_index=2))
    previous = wan21.encode_video(frames_to_tensor(np.concatenate([clip.history, clip.frames[:5]])))  # 9 frames
    assert torch.allclose(sample.cond.y[:, 4:, 1:2], previous[:, :, -1:], atol=1e-5)
    own = wan21.encode_video(frames_to_tensor(clip.frames))[:, :, 1:2]
    assert not torch.allclose(sample.cond.y[:, 4:, 1:2], own, atol=1e-3)  # not the clip's own latent 1
    with pytest.raises(CliploomError, match="history"):
        ShapesWorldClips(frames=9, size=32, segments=1, segment_frames=12).clip(torch.Generator(), 5, history=8)


def _deltas(transformer, scale):
    """Each adapted module's update ``scale * B @ A`` (what the LoRA adds to the weight)."""
    from cliploom.train.adapter import lora_state

    st = lora_state(transformer)
    def flat(b, a):  # a convolution's pair as matrices (out x rank) @ (rank x in·kernel)
        return b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)

    return {k[: -len(".lora_A.weight")]: scale * flat(st[k.replace("lora_A", "lora_B")], st[k])
            for k in st if k.endswith(".lora_A.weight")}


def _trained_lora(tmp_path, tiny_dirs, seed: int, **cfg):
    """The tiny Wan 2.1 model with a LoRA attached whose B matrices are random (a nonzero update)."""
    from cliploom.models import load_model
    from cliploom.train.adapter import attach_lora

    model = load_model(tiny_dirs["wan21"], device="cpu")
    attach_lora(model.transformer, _cfg(tmp_path, tiny_dirs["wan21"], **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def test_init_lora_starts_from_a_file_in_either_layout_with_the_same_update(tmp_path, tiny_dirs):
    from cliploom.models import load_model
    from cliploom.train.adapter import attach_lora, init_from_file, lora_state
    from cliploom.train.export import export_lora

    source = _trained_lora(tmp_path, tiny_dirs, 3)  # rank 4, alpha 8
    want = _deltas(source.transformer, 8 / 4)
    for layout in ("svi", "diffusers"):
        old = os.umask(0o022)
        try:
            path = export_lora(lora_state(source.transformer), tmp_path / f"{layout}.safetensors", layout, rank=4, alpha=8)
        finally:
            os.umask(old)
        assert path.stat().st_mode & 0o777 == 0o644  # readable by others, like any file the user writes
        for alpha in (8, 4):  # another alpha: the file's update is kept, A absorbs the difference
            model = load_model(tiny_dirs["wan21"], device="cpu")
            c = _cfg(tmp_path, tiny_dirs["wan21"], alpha=alpha, init_lora=str(path))
            attach_lora(model.transformer, c)
            init_from_file(model.transformer, c)
            got = _deltas(model.transformer, alpha / 4)
            assert got.keys() == want.keys()
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)

    # A file that does not fit is a one-line error naming the mismatch.
    for kw, fragment in [({"rank": 8}, "rank [4], the config trains rank 8"),
                         ({"targets": ["q", "k"]}, "does not touch the modules the config targets")]:
        model = load_model(tiny_dirs["wan21"], device="cpu")
        c = _cfg(tmp_path, tiny_dirs["wan21"], init_lora=str(tmp_path / "svi.safetensors"), **kw)
        attach_lora(model.transformer, c)
        with pytest.raises(CliploomError) as err:
            init_from_file(model.transformer, c)
        assert fragment in str(err.value) and "\n" not in str(err.value)


def test_init_lora_can_widen_a_lora_to_more_modules(tmp_path, tiny_dirs):
    """A file on some of the targeted modules: those start from it exactly, the others from the
    adapter's fresh init (zero update), so training widens the LoRA (e.g. to the patch embedding)."""
    from cliploom.models import load_model
    from cliploom.train.adapter import attach_lora, init_from_file, lora_state
    from cliploom.train.export import export_lora

    source = _trained_lora(tmp_path, tiny_dirs, 5, targets=["q", "k"])
    want = _deltas(source.transformer, 8 / 4)
    path = export_lora(lora_state(source.transformer), tmp_path / "qk.safetensors", "svi", rank=4, alpha=8)
    model = load_model(tiny_dirs["wan21"], device="cpu")
    c = _cfg(tmp_path, tiny_dirs["wan21"], targets=["q", "k", "v", "o", "patch_embedding"], init_lora=str(path))
    attach_lora(model.transformer, c)
    init_from_file(model.transformer, c)
    got = _deltas(model.transformer, 8 / 4)
    assert set(want) < set(got) and any("patch_embedding" in k for k in got)
    for k in got:
        if k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)
        else:
            assert not got[k].any(), k  # a module the file does not hold starts with no update


def test_cosine_schedule_warms_up_then_decays_to_lr_min(tmp_path, tiny_dirs):
    from cliploom.train.loop import SVITrainer

    t = SVITrainer(_cfg(tmp_path, tiny_dirs["wan21"], steps=100, warmup_steps=10, lr=1e-3, lr_schedule="cosine",
                        lr_min=1e-4), progress=False)
    lrs = [t.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(1e-4, rel=0.01)
    assert SVITrainer(_cfg(tmp_path, tiny_dirs["wan21"], out_dir=str(tmp_path / "c"), steps=100),
                      progress=False).lr_at(99) == pytest.approx(0.02)
    with pytest.raises(CliploomError, match="lr_min"):
        config_from_dict({"lr": 1e-4, "lr_min": 1e-3})


def test_a_lora_state_of_the_wrong_shape_is_a_one_line_error(tiny_dirs, tmp_path):
    from cliploom.models import load_model
    from cliploom.train.adapter import attach_lora, load_lora_state, lora_state

    model = load_model(tiny_dirs["wan21"], device="cpu")
    attach_lora(model.transformer, _cfg(tmp_path, tiny_dirs["wan21"]))
    state = lora_state(model.transformer)
    key = next(k for k in state if k.endswith("lora_A.weight"))
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    with pytest.raises(CliploomError) as err:
        load_lora_state(model.transformer, state, "init_lora x.safetensors", "start from a LoRA trained for this model")
    msg = str(err.value)
    assert "init_lora x.safetensors does not fit this model (1 tensors do not match" in msg and key in msg
    assert "\n" not in msg


def test_closed_loop_sample_continues_from_where_the_rollout_ended(tmp_path):
    """The motion memory is what the LoRA's own rollout handed on, the anchor the story's first frame,
    and the target the world's clip from where the generated subject ended, under a switched prompt."""
    from cliploom.evaluate import subject_centroids
    from cliploom.loom import weave
    from cliploom.models import load_model
    from cliploom.shapesworld import parse_prompt, world
    from cliploom.story import ClipSpec, make_story
    from cliploom.train.closed_loop import closed_loop_clip
    from PIL import Image

    model = load_model("builtin", device="cpu")
    clip = None
    for seed in range(4):  # a rollout that loses its subject gives None; the built-in model rarely does
        clip = closed_loop_clip(model, torch.Generator().manual_seed(seed), 17, 1, 1)
        if clip is not None:
            break
    assert clip is not None, "four rollouts of the built-in model all lost their subject"
    story_seed = int(clip.source.split(":")[1].split("x")[0])
    seq = world.sample_sequence(story_seed, 1, [17], size=32)
    assert np.array_equal(clip.anchor[0], seq.frames(0, 1)[0])  # the anchor: the story's first frame
    Image.fromarray(seq.frames(0, 1)[0]).save(tmp_path / "ref.png")
    story = make_story(clips=[ClipSpec(p) for p in seq.prompts], reference=tmp_path / "ref.png", mode="pro",
                       seed=story_seed, motion_latents=1, frames=17, first_clip="pro")
    # the same path in the same process: exact. The rollout runs pro's first clip whatever the model's
    # first_clip default (the LoRA in training is on for every clip it generates)
    rollout = list(weave(model, story, progress=False))[-1]
    assert torch.equal(clip.motion, rollout.memory)
    spec = seq.appearance
    ended = subject_centroids(np.stack([seq.frames(0, 1)[0], rollout.frames[-1].numpy()]), spec)[-1]
    target = subject_centroids(clip.frames, spec)
    # The target's last lead frame (4K = 4) stands where the generated subject ended: within 0.75 px
    # (the world renders anti-aliased shapes; the tracker's centroid of one is within a fraction of a pixel).
    assert np.abs(target[4] - ended).max() < 0.75, (target[4], ended)
    assert parse_prompt(clip.prompt).motion != seq.motions[-1]  # the prompt switches, as in the dev set
    assert clip.frames.shape == (17, 32, 32, 3)
    sample = build_sample(model, clip, Choice("latent", motion=1, far_anchor=True, closed_loop=1))
    assert torch.allclose(sample.cond.y[:, 4:, 1:2], clip.motion, atol=1e-6)  # y holds the generated memory
    anchor = model.encode_video(frames_to_tensor(clip.anchor))
    assert torch.allclose(sample.cond.y[:, 4:, :1], anchor, atol=1e-5)
    assert sample.choice.describe() == "latent K=1 after 1 generated"


def test_closed_loop_training_steps_and_its_settings(tmp_path):
    from cliploom.train.loop import SVITrainer

    cfg = config_from_dict(dict(model="builtin", out_dir=str(tmp_path / "run"), rank=4, alpha=4, steps=2, batch_size=2,
                                closed_loop_prob=1.0, closed_loop_clips=[1], error_recycling=False,
                                checkpoint_every=10))
    trainer = SVITrainer(cfg, progress=False)
    info = trainer.train_step()
    assert np.isfinite(info.loss) and trainer.closed_loop_samples >= 1
    assert any(s.choice.closed_loop == 1 for s in info.samples)
    # "memory" lead: the target's lead latent is what the rollout handed on (as in y), not the world's
    cfg.closed_loop_lead = "memory"
    trainer = SVITrainer(cfg, progress=False)
    looped = [s for s in trainer.train_step().samples if s.choice.closed_loop]
    assert looped
    for s in looped:
        assert torch.equal(s.latents[:, :, 1:2], s.cond.y[:, 4:, 1:2].to(s.latents))  # both copies of the memory
    for bad, message in (({"closed_loop_prob": 0.5, "closed_loop_lead": "pixels"}, "closed_loop_lead 'pixels' is not one of"),
                         ({"closed_loop_prob": 0.5, "data": "videos", "videos": str(tmp_path)}, "closed_loop_prob needs"),
                         ({"closed_loop_prob": 0.5, "route": "df"}, "closed_loop_prob needs"),
                         ({"closed_loop_prob": 0.5, "closed_loop_clips": [0]}, "must list clip counts"),
                         ({"closed_loop_prob": 1.5}, "not a probability")):
        with pytest.raises(CliploomError, match=message):
            config_from_dict(dict(model="builtin", **bad))
