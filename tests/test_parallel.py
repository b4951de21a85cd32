"""One video on several processes (issue 14): ``--parallel ulysses=2`` (diffusers' context
parallelism) and ``--parallel cfg=2`` under torchrun on gloo, two CPU processes, against one
process. The split changes how attention and the guidance passes are summed (all-to-all and
all-gather around the same kernels), so frames are compared with the suite's cross-path
tolerance (tests/compare.py); on this machine they came out equal or within 1 level."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compare import assert_frames_close

pytest.importorskip("torch.distributed.run")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("this torch has no gloo backend", allow_module_level=True)


def _frames(folder: Path) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(Image.open(f)) for f in sorted(folder.glob("frame_*.png"))]))


def _generate(model, reference, out, *extra, procs=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "-m", "cliploom"]
              if procs > 1 else [sys.executable, "-m", "cliploom"])
    cmd = [*launch, "generate", "--model", str(model), "--image", str(reference), "--prompt", "a", "--prompt", "b",
           "--frames", "9", "--steps", "2", "--out", f"{out}/", "--quiet", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("variant,spec,guidance", [("wan21", "ulysses=2", "1"), ("wan22", "ulysses=2", "1"),
                                                   ("wan21", "cfg=2", "3")])
def test_two_processes_give_the_frames_of_one(tiny_dirs, reference_png, tmp_path, variant, spec, guidance):
    one = _generate(tiny_dirs[variant], reference_png, tmp_path / "one", "--guidance", guidance)
    assert one.returncode == 0, one.stderr
    two = _generate(tiny_dirs[variant], reference_png, tmp_path / "two", "--guidance", guidance, "--parallel", spec,
                    procs=2)
    assert two.returncode == 0, two.stderr
    a, b = _frames(tmp_path / "two"), _frames(tmp_path / "one")
    assert a.shape == b.shape and len(a) == 9 + 4
    assert_frames_close(a, b)
    assert (tmp_path / "two" / "report.json").is_file()  # rank 0 wrote the report ...
    assert "wrote" in two.stdout and two.stdout.count("wrote") == 1  # ... and only rank 0 spoke


def test_parallel_errors_are_one_line(tiny_dirs, reference_png, tmp_path):
    for extra, procs, message in (
        (["--parallel", "ring=2"], 1, "is not ulysses=N or cfg=2"),
        (["--parallel", "ulysses=2"], 1, "--parallel needs 2 processes, this run has 1"),
        (["--parallel", "ulysses=2,cfg=2"], 1, "ulysses and cfg together are not supported"),
    ):
        r = _generate(tiny_dirs["wan21"], reference_png, tmp_path / "x", *extra, procs=procs)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1 and message in errors[0], r.stderr
    # TI2V at 96x32 (32 px per token): 3 x 1 tokens per latent frame, 9 per clip, which two ranks cannot share
    r = _generate(tiny_dirs["ti2v"], reference_png, tmp_path / "t", "--width", "96", "--height", "32",
                  "--parallel", "ulysses=2", procs=2)
    assert r.returncode != 0 and "which ulysses=2 does not divide" in r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "t" / "report.json").exists()
