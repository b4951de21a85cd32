"""`cliploom eval`: exit 0 on a ground-truth video, 1 on drift, 2 with one clear line on bad input."""

import json

import numpy as np
import pytest
from PIL import Image

from cliploom.cli import main
from cliploom.shapesworld import Sequence, parse_prompt

PROMPT = "a big orange square {} on a teal background"
MOTIONS = ["right", "down", "still"]
F = 17  # frames per generated clip; latent mode (K = 1) keeps 17, 12, 12


def run(capsys, *args):
    rc = main(["eval", *[str(a) for a in args]])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def sequence(lengths=(F, F - 5, F - 5), motions=MOTIONS, size=32):
    spec = parse_prompt(PROMPT.format("moves right"))
    return Sequence(spec, list(motions), list(lengths), (9.0, 9.0), size=size)


def write_mp4(path, frames):
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p"
        stream.options = {"crf": "8"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def report_for(seq, frames_kept=None):
    kept = frames_kept or seq.lengths
    return {"story": {"mode": "pro", "frames": F},
            "clips": [{"index": i, "prompt": p, "frames_kept": n} for i, (p, n) in enumerate(zip(seq.prompts, kept))]}


@pytest.fixture
def gt_video(tmp_path):
    """A ground-truth ShapesWorld MP4 with its report beside it (as `cliploom generate` writes)."""
    seq = sequence()
    video = write_mp4(tmp_path / "gt.mp4", seq.frames())
    video.with_suffix(".json").write_text(json.dumps(report_for(seq)))
    return seq, video


def test_ground_truth_video_passes_and_writes_outputs(capsys, gt_video, tmp_path):
    seq, video = gt_video
    rc, out, err = run(capsys, video, "--out", tmp_path / "ev")
    assert rc == 0, out + err
    lines = out.strip().splitlines()
    assert [ln.split()[:3] for ln in lines[:3]] == [["clip", "0", "PASS"], ["clip", "1", "PASS"], ["clip", "2", "PASS"]]
    assert lines[3].startswith("PASS: 3/3 clips pass")
    saved = json.loads((tmp_path / "ev" / "gt.eval.json").read_text())
    assert saved["passed"] and [c["stop"] - c["start"] for c in saved["clips"]] == [17, 12, 12]
    assert saved["clip_source"].endswith("gt.json")
    sheet = Image.open(tmp_path / "ev" / "gt.eval_contact.png")
    assert sheet.size[1] > 3 * 96  # a row per clip
    assert (tmp_path / "ev" / "gt.eval_metrics.png").stat().st_size > 1000


def test_outputs_default_to_the_video_folder_and_json_flag(capsys, gt_video, tmp_path):
    _, video = gt_video
    rc, out, _ = run(capsys, video, "--json")
    assert rc == 0
    result = json.loads(out)
    assert result["clips_passed"] == 3 and result["outputs"]["contact_sheet"] == str(tmp_path / "gt.eval_contact.png")
    assert (tmp_path / "gt.eval.json").is_file()


def test_colour_drift_fails_with_exit_1(capsys, tmp_path):
    seq = sequence()
    frames = seq.frames().astype(np.float64)
    mask = np.abs(frames - seq.background_image()[None]).sum(-1) > 60  # subject pixels
    ramp = np.linspace(0, 1, len(frames))[:, None, None, None]
    drifted = np.where(mask[..., None], frames * (1 - 0.7 * ramp) + np.array([0, 0, 255.0]) * 0.7 * ramp, frames)
    video = write_mp4(tmp_path / "drift.mp4", drifted.round().astype(np.uint8))
    video.with_suffix(".json").write_text(json.dumps(report_for(seq)))
    rc, out, _ = run(capsys, video)
    assert rc == 1
    assert "FAIL" in out.splitlines()[-2] and "color" in out.splitlines()[-2]
    assert out.splitlines()[0].split()[2] == "PASS"  # the first clip is still fine
    assert "failed: color" in out.splitlines()[2]


def test_clips_from_a_story_file(capsys, tmp_path):
    """With --story the frames per clip come from the story, or from the video length when unset."""
    seq = sequence()
    video = write_mp4(tmp_path / "v.mp4", seq.frames())
    clips = "".join(f"  - {p}\n" for p in seq.prompts)
    for extra in ("frames: 17\n", ""):
        story = tmp_path / "s.yaml"
        story.write_text(f"reference: ref.png\nmode: pro\n{extra}clips:\n{clips}")
        rc, out, err = run(capsys, video, "--story", story)
        assert rc == 0, out + err
    # pixel mode keeps F - N frames of every clip but the last: 12, 12, 17
    pixel = sequence(lengths=(F - 5, F - 5, F))
    write_mp4(tmp_path / "p.mp4", pixel.frames())
    story.write_text(f"reference: ref.png\nmode: svi2\nclips:\n{clips}")
    rc, out, _ = run(capsys, tmp_path / "p.mp4", "--story", story)
    assert rc == 0 and "PASS: 3/3" in out


def test_png_folder_with_report(capsys, tmp_path):
    seq = sequence()
    folder = tmp_path / "pngs"
    folder.mkdir()
    for k, f in enumerate(seq.frames()):
        Image.fromarray(f).save(folder / f"frame_{k:05d}.png")
    (folder / "report.json").write_text(json.dumps(report_for(seq)))
    rc, _, _ = run(capsys, folder)
    assert rc == 0 and (folder / "eval_contact.png").is_file()


def _bad_inputs(tmp_path, seq, video):
    """(arguments, the text the one-line error must contain) for each kind of bad input."""
    no_report = write_mp4(tmp_path / "alone.mp4", seq.frames())
    short = tmp_path / "short.json"
    short.write_text(json.dumps(report_for(seq, [F, F - 5, F - 6])))
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"clips": [{"prompt": "a cat walks in the rain", "frames_kept": n} for n in seq.lengths]}))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    not_report = tmp_path / "not_report.json"
    not_report.write_text(json.dumps({"story": {}}))
    odd_story = tmp_path / "odd.yaml"
    odd_story.write_text("mode: pro\nclips:\n" + "".join(f"  - {p}\n" for p in seq.prompts[:2]))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video")
    return [
        ((tmp_path / "missing.mp4",), "missing.mp4 not found"),
        ((no_report,), "no report beside"),
        ((video, "--report", tmp_path / "nope.json"), "nope.json does not exist"),
        ((video, "--report", short), "describes 40 frames in 3 clips but"),
        ((video, "--report", foreign, "--metrics", "shapesworld"), "clip 0: bad ShapesWorld prompt"),
        ((video, "--clip-frames", "0"), "--clip-frames 0 must be between 1"),
        ((video, "--report", broken), "broken.json: malformed JSON"),
        ((video, "--report", not_report), "no 'clips' list"),
        ((video, "--story", odd_story), "2-clip story in pro mode cannot make a 41-frame video"),
        ((video, "--story", tmp_path / "none.yaml"), "none.yaml does not exist"),
        ((junk, "--report", video.with_suffix(".json")), "cannot read video"),
    ]


def test_bad_input_exits_2_with_one_line(capsys, gt_video, tmp_path):
    seq, video = gt_video
    for args, message in _bad_inputs(tmp_path, seq, video):
        rc, out, err = run(capsys, *args)
        assert rc == 2, (args, out, err)
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert message in err, (message, err)
        assert "; " in err  # problem; fix


def test_video_without_a_subject_is_bad_input(capsys, tmp_path):
    seq = sequence()
    blank = np.broadcast_to(seq.background_image().astype(np.uint8), (seq.num_frames, 32, 32, 3)).copy()
    video = write_mp4(tmp_path / "blank.mp4", blank)
    video.with_suffix(".json").write_text(json.dumps(report_for(seq)))
    rc, _, err = run(capsys, video)
    assert rc == 2 and "no subject found in the video's first frame" in err


def test_story_and_report_are_exclusive(capsys, gt_video):
    _, video = gt_video
    with pytest.raises(SystemExit) as e:
        run(capsys, video, "--story", "s.yaml", "--report", "r.json")
    assert e.value.code == 2


def test_eval_of_a_generated_video(capsys, tiny_dirs, tmp_path):
    """`cliploom generate` then `cliploom eval` on its MP4 and report: clips line up with the video.

    The tiny model has random weights, so the verdict is a fail (exit 1), never bad input (2).
    """
    from cliploom.shapesworld import render_reference

    ref = tmp_path / "ref.png"
    render_reference(PROMPT.format("moves right"), size=32).save(ref)
    out = tmp_path / "gen.mp4"
    rc = main(["generate", "--image", str(ref), "--prompt", PROMPT.format("moves right"),
               "--prompt", PROMPT.format("stays still"), "--frames", "9", "--steps", "2",
               "--model", str(tiny_dirs["wan21"]), "--out", str(out), "--quiet"])
    capsys.readouterr()
    assert rc == 0
    rc, out_text, err = run(capsys, out)
    assert rc == 1, out_text + err
    result = json.loads((tmp_path / "gen.eval.json").read_text())
    assert [c["stop"] - c["start"] for c in result["clips"]] == [9, 4]
    assert result["num_frames"] == 13


def test_bounce_lines_show_the_hop_measured_and_the_worlds(capsys, tmp_path):
    seq = sequence(motions=["right", "bounce", "still"])  # starts 2 px under the top bound: the world's hop is cut
    video = write_mp4(tmp_path / "b.mp4", seq.frames())
    video.with_suffix(".json").write_text(json.dumps(report_for(seq)))
    rc, out, err = run(capsys, video, "--out", tmp_path / "ev")
    assert rc == 0, out + err
    lines = out.strip().splitlines()
    hop = lines[1].split("hop ")[1].split()[0]
    measured, expected = (float(v) for v in hop.split("/"))
    assert expected < 5.0 and measured >= 0.5 * expected  # the edge stops the hop, as in the world
    assert "hop" not in lines[0] and "hop" not in lines[2]
