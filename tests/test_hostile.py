"""Hostile input (a representative subset of ``make bench-hostile``): every case must end with one
``error:`` line and exit code 2 (Ctrl-C: 130), no traceback, and no output that looks finished."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cliploom.cli import main

PROMPT = "a big red circle moves right on a navy background"
GOOD = {"reference": "ref.png", "frames": 17, "steps": 2, "seed": 1, "clips": [PROMPT, PROMPT]}
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import hostile  # noqa: E402  (the probe's file builders: headers that lie, PNG bombs)


@pytest.fixture
def here(tmp_path, monkeypatch):
    from cliploom.shapesworld import render_reference

    render_reference(PROMPT, size=32).save(tmp_path / "ref.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(capsys, *argv, outputs=("o.mp4", "o.json"), during_run=False) -> str:
    """``during_run``: found while generating, after the run's own progress lines: the error is the
    last line."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors leave through SystemExit, as a process would
        code = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert (during_run or len(lines) == 1) and lines[-1].startswith("error: ") and "Traceback" not in err, err
    for name in outputs:
        assert not os.path.lexists(name), name
    return lines[-1]


def story(**changes) -> str:
    values = {**GOOD, **changes}
    Path("s.yaml").write_text(yaml.safe_dump(values))
    return "s.yaml"


def raw(text: str | bytes, name: str = "s.yaml") -> str:
    Path(name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return name


@pytest.mark.parametrize("key, value, message", [
    ("frames", ".nan", "frames must be a finite number"),
    ("frames", "1000000001", "frames 1000000001 is more than 1025"),
    ("steps", str(10**12), "steps 1000000000000 must be between 1 and 1000"),
    ("guidance", ".inf", "guidance must be a finite number"),
    ("shift", ".nan", "shift must be a finite number"),
    ("seed", str(2**70), "seed 1180591620717411303424 is out of range"),
    ("seed", "-1", "seed -1 must be in 0..2**63-1"),
    ("width", "100000", "width 100000 is more than 4096"),
    ("fps", "0", "fps 0 must be between 1 and 240"),
    ("timesteps", "[.nan]", "timesteps must be a finite number"),
])
def test_numbers_that_are_not_finite_or_bounded(here, capsys, key, value, message):
    lines = [f"{k}: {json.dumps(v)}" for k, v in GOOD.items() if k != key] + [f"{key}: {value}"]
    assert message in refused(capsys, "generate", raw("\n".join(lines)), "--out", "o.mp4")


@pytest.mark.parametrize("flags, message", [
    (["--clips", "0"], "--clips 0 must be between 1"),
    (["--guidance", "nan"], "guidance must be a finite number"),
    (["--lora", "x.safetensors:nan"], "weight nan is beyond"),
    (["--frames", "x"], "invalid int value"),
    (["--bogus"], "unrecognized arguments"),
])
def test_flags(here, capsys, flags, message):
    argv = ["generate", "--image", "ref.png", "--prompt", PROMPT, "--out", "o.mp4", *flags]
    assert message in refused(capsys, *argv)


def test_sizes_that_would_exhaust_the_machine(here, capsys):
    bomb = "a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']\n" + "".join(
        f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 9) + "]\n" for i in range(1, 10))
    assert "values (expanded)" in refused(capsys, "generate", raw(bomb + "clips: *j\n"))  # aliases counted as used
    assert "nested more than 64 levels deep" in refused(capsys, "generate", raw("clips: " + "[" * 10000 + "]" * 10000))
    assert "makes more than 10000 clips" in refused(capsys, "generate", raw(
        f"reference: ref.png\nclips: [{{prompt: a, repeat: 99999999}}]\n"))
    assert "10001 clips is more than 10000" in refused(capsys, "generate", story(clips=[PROMPT] * 10001))
    assert "needs at least" in refused(capsys, "generate", story(frames=1025, width=4096, height=4096))
    assert "--size 100000 must be between 8 and 4096" in refused(
        capsys, "shapesworld", "render", PROMPT, "--size", "100000", "-o", "r.png", outputs=("r.png",))


def test_files_that_are_not_what_they_say(here, capsys, tiny_dirs):
    Path("bomb.png").write_bytes(hostile.png_header(100_000, 100_000))
    assert "more than 64 megapixels" in refused(capsys, "generate", story(reference="bomb.png"))
    os.mkfifo("fifo.yaml")
    assert "is not a regular file" in refused(capsys, "generate", "fifo.yaml")
    assert "is UTF-16 text" in refused(capsys, "generate", raw("clips: [a]\n".encode("utf-16")))
    assert "is a binary file" in refused(capsys, "generate", raw(bytes(range(256))))
    # safetensors headers that lie: safetensors' own reader refuses them
    a = {"dtype": "F32", "shape": [4, 24], "data_offsets": [0, 384]}
    for header, data, message in [
        ({"blocks.0.self_attn.q.lora_A.weight": 5}, b"", "is damaged"),
        ({"blocks.0.self_attn.q.lora_A.weight": {**a, "data_offsets": [0, 10**9]}}, b"\x00" * 384, "is damaged"),
        ('{"a":' * 5000 + "1" + "}" * 5000, b"", "is damaged"),
    ]:
        Path("l.safetensors").write_bytes(hostile.safetensors_bytes(header, data))
        assert message in refused(capsys, "inspect", "l.safetensors")
    # a LoRA with integer tensors, or naming block 10**9, is refused before anything is built
    for header, message in [
        ({"blocks.0.self_attn.q.lora_A.weight": {**a, "dtype": "I32"}}, "LoRA weights are floating point"),
        ({"blocks.1000000000.self_attn.q.lora_A.weight": a}, "names block 1000000000"),
    ]:
        Path("l.safetensors").write_bytes(hostile.safetensors_bytes(header, b"\x00" * 384))
        assert message in refused(capsys, "generate", story(loras=[{"path": "l.safetensors"}]))
    # a model folder whose config lies about its size
    shutil.copytree(tiny_dirs["wan21"], "m")
    config = json.loads(Path("m/transformer/config.json").read_text())
    Path("m/transformer/config.json").write_text(json.dumps({**config, "num_layers": 999, "ffn_dim": 100000}))
    assert "describes about" in refused(capsys, "generate", story(frames=9), "--model", "m")
    Path("m/model_index.json").write_text("[1, 2]")
    assert "is not a JSON object" in refused(capsys, "generate", story(frames=9), "--model", "m")


def test_a_lora_that_overflows_or_holds_nan_is_refused(here, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    state = {k: v.float() for k, v in load_file(str(Path(__file__).parents[1] / "src/cliploom/shapesworld/model/svi_lora.safetensors")).items()}
    save_file({k: v * 1e19 for k, v in state.items()}, "big.safetensors")
    assert "beyond what float32 holds" in refused(capsys, "generate", story(loras=[{"path": "big.safetensors"}]))
    key = next(iter(state))
    state[key][0, 0] = float("nan")
    save_file(state, "nan.safetensors")
    assert "holds 1 NaN/Inf value" in refused(capsys, "generate", story(loras=[{"path": "nan.safetensors"}]))
    del torch


@pytest.mark.parametrize("out, message", [
    ("/proc/o.mp4", "cannot write into /proc"),
    ("o.avi", ".avi is a video format cliploom does not write"),
    ("a" * 300 + ".mp4", "more than the 255 a file name may have"),
    ("f.txt/o.mp4", "f.txt is a file, not a folder"),
])
def test_outputs_that_cannot_be_written(here, capsys, out, message):
    Path("f.txt").write_text("x")
    assert message in refused(capsys, "generate", story(), "--out", out, outputs=(out,))


def test_a_report_path_that_is_a_folder_is_refused_before_generating(here, capsys):
    Path("o.json").mkdir()
    assert "would replace a folder" in refused(capsys, "generate", story(), "--out", "o.mp4", outputs=("o.mp4",))


def test_non_finite_latents_fail_the_clip_and_write_nothing(here, capsys, monkeypatch):
    import torch

    from cliploom import sampling

    original = sampling.euler_step
    monkeypatch.setattr(sampling, "euler_step", lambda x, v, s, t: original(x, v, s, t) * float("nan"))
    message = refused(capsys, "generate", story(), "--out", "o.mp4", "-q", during_run=True)
    assert "clip 0: the latents hold NaN or Inf after denoising" in message
    del torch


def test_trainer_and_exporter(here, capsys):
    Path("t.yaml").write_text(yaml.safe_dump({"model": "builtin", "out_dir": "run", "frames": 1000000001}))
    assert "frames 1000000001 is not of the form 4k+1 between 5 and 1025" in refused(capsys, "train-svi", "t.yaml", outputs=("run",))
    Path("t.yaml").write_text("seed: .inf\n")
    assert "seed must be a finite number" in refused(capsys, "train-svi", "t.yaml", outputs=("runs",))
    Path("t.yaml").write_text(yaml.safe_dump({"out_dir": "/proc/run"}))
    assert "cannot write into /proc/run" in refused(capsys, "train-svi", "t.yaml")
    Path("ck").mkdir()
    Path("ck/state.json").write_text(json.dumps({"step": 1}))
    Path("ck/lora.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    assert "is a PyTorch pickle" in refused(capsys, "export-lora", "ck", "-o", "l.safetensors", outputs=("l.safetensors",))
    Path("ck/lora.safetensors").write_bytes(hostile.safetensors_bytes({}, b""))
    assert "lacks its step or config" in refused(capsys, "export-lora", "ck", "-o", "l.safetensors", outputs=("l.safetensors",))


def test_usage_errors_are_one_line(capsys):
    assert "invalid choice: 'wan9'" in refused(capsys, "make-tiny", "d", "--variant", "wan9")
    assert "the following arguments are required" in refused(capsys, "shapesworld", "render", PROMPT)


def test_ctrl_c_mid_run_exits_130_leaves_a_resumable_run_and_no_video(here):
    env = {**os.environ, "CLIPLOOM_THREADS": "1"}
    argv = [sys.executable, "-m", "cliploom.cli", "generate", "--image", "ref.png", "--prompt", PROMPT, "--clips", "40",
            "--steps", "2", "--out", "o.mp4", "-q"]
    # The child starts with Ctrl-C's default disposition whatever this process inherited or set (a
    # child inherits an ignored SIGINT, and Python then leaves it ignored).
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not Path("o.run/clips/000001.json").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # twice: the goodbye is not interrupted
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "Traceback" not in err and "continue with --resume" in err, \
        (proc.returncode, err, signal.getsignal(signal.SIGINT))
    assert not Path("o.mp4").exists() and not Path("o.json").exists()
    assert len(list(Path("o.run/clips").glob("*.json"))) >= 2
