"""Generic drift metrics (cliploom.drift, `cliploom eval --metrics generic`): clean videos pass, and
each injected fault (colour drift, brightness drift, a frozen clip, a seam jump) is found where it
was put; on ShapesWorld videos they agree in direction with the ground-truth evaluator."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cliploom.drift import drift_metrics

CLIPS, N, SIZE = 6, 16, 48


def clean_video(seed: int = 0) -> np.ndarray:
    """A textured background with a bright disc that keeps moving across every clip boundary."""
    rng = np.random.default_rng(seed)
    background = rng.integers(40, 120, (SIZE, SIZE, 3)).astype(np.float64)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    frames = []
    for t in range(CLIPS * N):
        cx, cy = 24 + 14 * np.cos(t / 9), 24 + 14 * np.sin(t / 9)
        f = background.copy()
        f[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = (230, 200, 60)
        frames.append(f)
    return np.stack(frames)


def as_video(frames: np.ndarray) -> np.ndarray:
    return np.clip(frames, 0, 255).round().astype(np.uint8)


def flagged(result: dict, flag: str) -> list[int]:
    return [c["index"] for c in result["clips"] if flag in c["flags"]]


def test_a_clean_video_passes():
    r = drift_metrics(as_video(clean_video()), [N] * CLIPS)
    assert r["passed"] and r["clips_passed"] == CLIPS
    assert r["start_end"]["color_delta_e"] < 1.0
    sim = r["similarity"]
    assert sim["gaps"][:3] == [1, 2, 4] and min(sim["histogram"]) > 0.9  # the same things, moving


def test_each_injected_fault_is_found_where_it_was_put():
    base = clean_video()
    tinted = base.copy()
    for i in range(CLIPS):  # a warm cast that grows clip after clip
        tinted[i * N:(i + 1) * N] *= (1 + 0.08 * i, 1, 1 - 0.06 * i)
    r = drift_metrics(as_video(tinted), [N] * CLIPS)
    colour = flagged(r, "color")
    assert colour and colour == list(range(colour[0], CLIPS)) and colour[0] >= 2  # once past the threshold, every clip
    drift = [c["color_delta_e_vs_first"] for c in r["clips"]]
    assert drift == sorted(drift) and r["start_end"]["color_delta_e"] > 6
    assert r["similarity"]["histogram"][-1] < drift_metrics(as_video(base), [N] * CLIPS)["similarity"]["histogram"][-1]

    dark = base.copy()
    dark[4 * N:] *= 0.6
    r = drift_metrics(as_video(dark), [N] * CLIPS)
    assert 4 in flagged(r, "brightness") and r["start_end"]["brightness_change"] < -10
    assert flagged(r, "seam") == [4]  # the brightness drops at one boundary: a seam too

    frozen = base.copy()
    frozen[3 * N:4 * N] = base[3 * N]
    r = drift_metrics(as_video(frozen), [N] * CLIPS)
    assert flagged(r, "frozen") == [3]

    jumped = base.copy()
    jumped[2 * N:] = np.roll(base[2 * N:], 10, axis=2)  # everything after clip 2's start shifts 10 px
    r = drift_metrics(as_video(jumped), [N] * CLIPS)
    assert flagged(r, "seam") == [2] and not flagged(r, "color") and not flagged(r, "frozen")


def test_it_agrees_in_direction_with_the_shapesworld_evaluator():
    """A ground-truth ShapesWorld video, and the same video whose subject's colour drifts: both
    evaluators see more colour drift in the second."""
    from cliploom.evaluate import evaluate_video
    from cliploom.shapesworld import scene_from_prompt

    prompt = "a big red circle moves right on a navy background"
    frames = scene_from_prompt(prompt, frames=48, size=32).frames(0, 48)
    lengths, prompts = [12] * 4, [prompt] * 4
    red = (frames[..., 0] > 150) & (frames[..., 2] < 100)
    drifted = frames.astype(np.float64)
    for i in range(4):
        part = drifted[i * 12:(i + 1) * 12]
        mask = red[i * 12:(i + 1) * 12]
        part[mask] = part[mask] * (1 - 0.12 * i) + np.array([0, 0, 200]) * 0.12 * i  # red turns violet
    drifted = as_video(drifted)
    truth = [evaluate_video(v, prompts=prompts, clip_lengths=lengths)["clips"][-1]["color_delta_e"] for v in (frames, drifted)]
    generic = [drift_metrics(v, lengths)["clips"][-1]["color_delta_e_vs_first"] for v in (frames, drifted)]
    assert truth[1] > truth[0] + 5 and generic[1] > generic[0] + 0.5


@pytest.mark.parametrize("faulty", [False, True])
def test_eval_command_on_any_video(tmp_path, capsys, faulty):
    from cliploom.cli import main
    from cliploom.video_io import write_mp4

    frames = clean_video()
    if faulty:
        frames[3 * N:4 * N] = frames[3 * N]
    path = tmp_path / "any.mp4"
    write_mp4(path, as_video(frames), 16)
    code = main(["eval", str(path), "--clip-frames", str(N)])
    out = capsys.readouterr().out
    assert code == (1 if faulty else 0), out
    assert ("FLAG" in out and "frozen" in out) == faulty and "start vs end" in out
    saved = json.loads((tmp_path / "any.eval.json").read_text())
    assert saved["metrics"] == "generic" and saved["num_clips"] == CLIPS
    assert (tmp_path / "any.eval_metrics.png").stat().st_size > 0 and (tmp_path / "any.eval_contact.png").stat().st_size > 0
