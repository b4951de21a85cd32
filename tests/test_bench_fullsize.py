"""The real-size benchmark (benchmarks/bench_fullsize.py) rehearsed at toy size: the files it
writes are what the loaders read as ComfyUI fp8_scaled checkpoints, the CLI loads them with
--weights fp8 in a watched child process, and the GPU mode's code runs on the CPU. Nothing is timed."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_fullsize as B  # noqa: E402

from cliploom.models import formats  # noqa: E402


def test_written_dit_is_a_comfy_fp8_scaled_file_with_the_family_shapes(tmp_path):
    family = B.family_config("wan21-i2v-14b-480p", tiny=True)
    path = tmp_path / "dit.safetensors"
    size = B.write_fp8_scaled_dit(path, family["transformer"])
    header = formats.read_header(path)
    assert formats.detect_dit_layout(header.keys) == "comfy"
    assert "scaled_fp8" in header.keys
    entries = B.dit_entries(family["transformer"])
    params = sum(math.prod(s) for _, s in entries)
    assert size > params  # >= one byte per weight, plus the header and bf16 tensors
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        q = f.get_tensor("model.diffusion_model.blocks.0.self_attn.q.weight")
        assert q.dtype == torch.float8_e4m3fn and torch.isfinite(q.float()).all()
        assert f.get_tensor("model.diffusion_model.blocks.0.self_attn.q.scale_weight").item() > 0
    # the same shapes the family's signature expects
    shapes = {formats.name_tables(1)[0][k]: s for k, s in entries}
    assert formats.signature_mismatches(formats.dit_signature(shapes), formats.config_signature(family["transformer"])) == []


def test_cpu_smoke_loads_fp8_through_the_cli_and_watches_memory(tmp_path):
    out = tmp_path / "cpu.json"
    assert B.main(["--cpu-smoke", "--tiny", "--families", "wan21-i2v-14b-480p", "--tmp", str(tmp_path),
                   "--out", str(out)]) == 0
    row, = json.loads(out.read_text())["rows"]
    assert row["returncode"] == 0, row["output"]
    assert row["weights"] == "fp8"  # the run report names the storage
    assert 0 < row["peak_anon"] <= row["peak_rss"] and row["seconds_generate"] > 0
    assert not list(tmp_path.glob("cliploom-fullsize-*"))  # the temp model is deleted


def test_gpu_mode_runs_its_option_sets_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    assert B.main(["--gpu", "--tiny", "--device", "cpu", "--sets", "bf16,fp8 storage,no decode overlap",
                   "--tmp", str(tmp_path), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["set"] for r in rows] == ["bf16", "no decode overlap", "fp8 storage"]
    assert rows[0]["seconds_load"] and rows[1]["seconds_load"] is None and rows[2]["seconds_load"]  # engine reused, then reloaded
    for r in rows:
        assert r["seconds_per_clip"] > 0 and r["dit_flop_per_clip"] > 0 and r["mfu"] is None  # no peak known for a CPU


def test_flop_count_matches_the_published_figure_for_wan21_14b():
    """The issue's compute floor for an 81-frame 480p clip, 4 steps, on Wan 2.1 14B: ~7.2 PFLOP
    (linear layers on 32,760 tokens plus attention); our count leaves out norms and softmax."""
    family = B.family_config("wan21-i2v-14b-480p", tiny=False)
    pflop = B.dit_flops(family["transformer"], 81, 480, 832) * 4 / 1e15
    assert 6.4 < pflop < 7.6


@pytest.mark.parametrize("name", ["wan22-i2v-a14b", "wan22-ti2v-5b"])
def test_other_families_write_and_describe(name, tmp_path):
    family = B.family_config(name, tiny=True)
    wrote = B.write_model(tmp_path / name, family)
    files = sorted(p.name for p in (tmp_path / name).glob("*.safetensors"))
    assert len(files) == family["experts"] and wrote["dit_bytes"] > 0
    assert json.loads(Path(wrote["family_file"]).read_text())["name"] == name


def test_a_failing_option_set_is_recorded_and_the_next_runs_on_a_fresh_engine(tmp_path, monkeypatch):
    """A backend that is not there (or torchao that does not run on the device) must not cost the
    sets after it: its row holds the error, the run exits 1, the results file holds every row."""
    sets = [{"name": "bf16", "weights": "bf16", "attention": "sdpa"},
            {"name": "attention flash3", "weights": "bf16", "attention": "flash3"},
            {"name": "fp8 storage", "weights": "fp8", "attention": "sdpa"}]
    monkeypatch.setattr(B, "option_sets", lambda device: sets)
    out = tmp_path / "gpu.json"
    assert B.main(["--gpu", "--tiny", "--device", "cpu", "--tmp", str(tmp_path), "--out", str(out)]) == 1
    rows = json.loads(out.read_text())["rows"]
    assert [r["set"] for r in rows] == ["bf16", "attention flash3", "fp8 storage"]
    assert "flash3" in rows[1]["error"] and rows[1]["returncode"] == 1
    assert "error" not in rows[0] and "error" not in rows[2] and rows[2]["seconds_per_clip"] > 0
    assert not list(tmp_path.glob("*.part"))
