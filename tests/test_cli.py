"""The command line: generation from flags and stories, and every bad input as one clear line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cliploom.cli import main


def run(capsys, *args):
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_generate_from_flags_with_cycling_prompts(capsys, tiny_dirs, reference_png, tmp_path):
    out = tmp_path / "v.mp4"
    rc, stdout, _ = run(capsys, "generate", "--image", reference_png, "--prompt", "a", "--prompt", "b",
                        "--clips", "3", "--frames", "9", "--steps", "2", "--model", tiny_dirs["wan22"],
                        "--out", out, "--quiet")
    assert rc == 0 and "3 clips" in stdout
    report = json.loads(out.with_suffix(".json").read_text())
    assert [c["prompt"] for c in report["clips"]] == ["a", "b", "a"]
    assert report["totals"]["frames"] == 9 + 2 * 4


def test_generate_from_a_story_with_overrides(capsys, tiny_dirs, reference_png, tmp_path):
    story = tmp_path / "s.yaml"
    story.write_text(f"reference: {reference_png}\nmodel: {tiny_dirs['wan21']}\nframes: 9\nsteps: 2\n"
                     "mode: film\nclips: [one, two]\n")
    rc, _, _ = run(capsys, "generate", story, "--out", tmp_path / "pngs/", "--mode", "shot", "--seed", "3", "-q")
    assert rc == 0
    report = json.loads((tmp_path / "pngs" / "report.json").read_text())
    assert report["story"]["mode"] == "shot" and report["story"]["motion_frames"] == 1
    assert report["story"]["route"] == "svi" and report["story"]["route_options"] == {}
    assert len(list((tmp_path / "pngs").glob("frame_*.png"))) == 2 * (9 - 1) + 1


def _not_wan(tmp_path):
    d = tmp_path / "sd"
    d.mkdir()
    (d / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    return d


def _text_to_video(tmp_path, tiny_dirs):
    """A copy of a tiny model whose transformer takes 16 channels: a text-to-video Wan."""
    import shutil

    from cliploom.models.tiny import tiny_transformer

    d = tmp_path / "t2v"
    shutil.copytree(tiny_dirs["wan22"], d)
    shutil.rmtree(d / "transformer")
    tiny_transformer(16, 16, 32, None, 0).save_pretrained(d / "transformer")
    return d


BAD = {
    "missing image": (lambda t, m, r: ["--image", t / "nope.png"], "reference image"),
    "unreadable image": (lambda t, m, r: ["--image", _junk(t)], "cannot read reference image"),
    "frames not 4k+1": (lambda t, m, r: ["--image", r, "--frames", "10"], "not of the form 4k+1"),
    "K too large": (lambda t, m, r: ["--image", r, "--frames", "9", "--motion-latents", "2"], "motion_latents 2"),
    "N too large": (lambda t, m, r: ["--image", r, "--frames", "9", "--mode", "film", "--motion-frames", "9"],
                    "motion_frames 9"),
    "unknown mode": (lambda t, m, r: ["--image", r, "--mode", "warp"], "unknown mode"),
    "not a model folder": (lambda t, m, r: ["--image", r, "--model", t], "no model_index.json"),
    "missing model folder": (lambda t, m, r: ["--image", r, "--model", t / "absent"], "does not exist"),
    "not a Wan model": (lambda t, m, r: ["--image", r, "--model", _not_wan(t)], "not a Wan model"),
    "unwritable output": (lambda t, m, r: ["--image", r, "--out", _junk(t) / "v.mp4"], "cannot write"),
    "existing output": (lambda t, m, r: ["--image", r, "--out", _junk(t)], "already exists"),
}


def _junk(tmp_path) -> Path:
    p = tmp_path / "junk.mp4"
    p.write_text("not an image")
    return p


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(capsys, tiny_dirs, reference_png, tmp_path, case):
    make_args, message = BAD[case]
    args = make_args(tmp_path, tiny_dirs, reference_png)
    if "--prompt" not in args:
        args += ["--prompt", "a"]
    if "--model" not in args:
        args += ["--model", tiny_dirs["wan22"]]
    if "--out" not in args:
        args += ["--out", tmp_path / "out.mp4"]
    before = set(tmp_path.rglob("*"))
    rc, _, err = run(capsys, "generate", *args, "-q")
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert "Traceback" not in err
    assert set(tmp_path.rglob("*")) == before  # no output, finished or partial


def test_text_to_video_model_is_refused(capsys, tiny_dirs, reference_png, tmp_path):
    rc, _, err = run(capsys, "generate", "--image", reference_png, "--prompt", "a", "--model",
                     _text_to_video(tmp_path, tiny_dirs), "--out", tmp_path / "o.mp4", "-q")
    assert rc == 2 and "text-to-video" in err and not (tmp_path / "o.mp4").exists()


def test_no_prompts(capsys, reference_png, tmp_path):
    rc, _, err = run(capsys, "generate", "--image", reference_png, "--out", tmp_path / "o.mp4")
    assert rc == 2 and "no prompts" in err


def test_malformed_story(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("clips: [a\n  mode: : x")
    rc, _, err = run(capsys, "generate", bad)
    assert rc == 2 and "malformed YAML" in err and err.count("\n") == 1


def test_real_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cliploom.cli", "generate", "--image", str(tmp_path / "x.png"), "--prompt", "a"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: reference image") and "Traceback" not in proc.stderr


def test_make_tiny_command(capsys, tmp_path):
    rc, out, _ = run(capsys, "make-tiny", tmp_path / "m", "--variant", "wan22")
    assert rc == 0 and (tmp_path / "m" / "transformer_2" / "config.json").is_file()
    rc, _, err = run(capsys, "make-tiny", tmp_path / "m", "--variant", "wan22")
    assert rc == 2 and "not empty" in err


def test_python_api_is_as_quiet_as_the_cli(tmp_path, reference_png):
    """A fresh interpreter (library warnings fire once per process): loading a Wan 2.1 model with its
    CLIP encoder, generating and writing a tiny model print nothing, and the caller's own logging
    settings are left as they were."""
    script = f"""
import transformers, cliploom
transformers.utils.logging.set_verbosity_info()
cliploom.make_tiny({str(tmp_path / "m")!r}, "wan21")
engine = cliploom.Engine.load({str(tmp_path / "m")!r}, device="cpu")
story = cliploom.make_story(reference={str(reference_png)!r}, clips=["a prompt", "another"], frames=9, steps=1)
clips = list(engine.generate(story, progress=False))
assert transformers.utils.logging.get_verbosity() == transformers.logging.INFO
assert transformers.utils.logging.is_progress_bar_enabled()
print(len(clips))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "CI")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "2" and proc.stderr == ""
