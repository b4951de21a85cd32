"""The ShapesWorld training scripts: time budgets, prefetching workers, batched encoding, and
continuing a DiT from trained weights (tiny sizes, CPU)."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
import yaml

from cliploom.shapesworld import train_dit, train_vae
from cliploom.shapesworld.trainutil import Prefetch, cosine_lr, time_progress, worker_pool


def test_cosine_lr_follows_the_time_budget_when_it_runs_out_first():
    assert cosine_lr(1.0, 0, 100, warmup=10) == pytest.approx(0.1)
    half = cosine_lr(1.0, 55, 100, warmup=10)
    assert half == pytest.approx(0.55)
    # No time budget: the step schedule alone.
    assert cosine_lr(1.0, 55, 100, warmup=10, time_progress=0.0) == half
    # Time nearly spent: the rate is near its floor although few steps ran.
    assert cosine_lr(1.0, 20, 100, warmup=10, time_progress=0.99) < 0.11
    assert time_progress(30.0, 1.0) == pytest.approx(0.5)
    assert time_progress(1e9, 0.0) == 0.0  # 0 = no budget


def _square(x):
    time.sleep(0.01 * (x % 3))  # finishing out of order must not reorder results
    return x * x


def test_prefetch_keeps_order_and_bounds_the_work_in_flight():
    assert list(Prefetch(None, _square, range(5))) == [0, 1, 4, 9, 16]
    pool = worker_pool(2)
    try:
        it = Prefetch(pool, _square, range(20), depth=3)
        first = next(it)
        assert first == 0 and len(it.pending) <= 3
        assert [first, *it] == [x * x for x in range(20)]
    finally:
        pool.terminate()


@pytest.fixture(scope="module")
def tiny_vae_run(tmp_path_factory):
    """A tiny VAE run: 3 joint steps, then a decoder-only stage cut by its time budget."""
    root = tmp_path_factory.mktemp("vae")
    cfg = {
        "out_dir": str(root / "run"), "device": "cpu", "workers": 1, "base_dim": 8, "threads": 1,
        "eval_every": 100, "log_every": 1, "eval_clips": 1, "eval_frames": 5, "stats_clips": 1, "final_eval_clips": 1,
        "stages": [
            {"name": "images", "steps": 3, "frames": 1, "batch": 2, "lr": 5e-4},
            {"name": "dec", "steps": 10_000, "frames": 5, "batch": 1, "lr": 2e-4, "decoder_only": True,
             "max_minutes": 0.02},
        ],
    }
    path = root / "vae.yaml"
    path.write_text(yaml.safe_dump(cfg))
    final = train_vae.train(train_vae.load_config(train_vae.VAEConfig, [str(path)]))
    return root, path, final


def test_vae_stage_ends_by_its_time_budget_and_the_run_finishes(tiny_vae_run):
    root, path, final = tiny_vae_run
    assert (final / "config.json").is_file()
    report = json.loads((final / "training_report.json").read_text())
    assert math.isfinite(report["heldout_psnr_17f_1clips"])
    # The stage stopped long before its 10,000 steps; the run counts as complete.
    rows = (root / "run" / "train.csv").read_text().splitlines()[1:]
    dec_steps = [int(r.split(",")[0]) for r in rows if ",dec," in r]
    assert dec_steps and max(dec_steps) < 3 + 10_000
    assert json.loads((root / "run" / "stages.json").read_text())["step"] == 3 + 10_000
    assert (root / "run" / "frozen" / "config.json").is_file()
    # Running the same command again resumes at the end and trains nothing more.
    before = len(rows)
    train_vae.train(train_vae.load_config(train_vae.VAEConfig, [str(path)]))
    assert len((root / "run" / "train.csv").read_text().splitlines()[1:]) == before


def test_batched_encoding_matches_one_clip_at_a_time(tiny_vae_run):
    root, _, _ = tiny_vae_run
    vae = train_dit.load_vae(root / "run" / "frozen")
    clips = [train_dit.render_clip(s, frames=5, size=32)[0] for s in (1, 2, 3)]
    z, y = train_dit.encode_clips(vae, clips)
    assert z.shape[0] == y.shape[0] == 3
    z1, y1 = train_dit.encode_clips(vae, clips[1:2])
    torch.testing.assert_close(z[1:2], z1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(y[1:2], y1, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(y[0], z[0])  # y is the first frame + grey, not the clip


def _dit_config(root, vae_dir, name, **extra):
    cfg = {
        "out_dir": str(root / name), "vae_dir": str(vae_dir), "device": "cpu", "workers": 1, "encode_batch": 3,
        "frames": 5, "data_clips": 6, "chunk": 4, "heldout_clips": 2, "layers": 1, "heads": 2, "head_dim": 16,
        "ffn_dim": 32, "batch": 2, "eval_every": 1000, "warmup": 1, **extra,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return train_dit.load_config(train_dit.DiTConfig, [str(path)])


def test_dit_time_budget_then_continue_from_its_weights(tiny_vae_run, tmp_path):
    root, _, _ = tiny_vae_run
    first = train_dit.train(_dit_config(tmp_path, root / "run" / "frozen", "a", steps=100_000, max_minutes=0.005))
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert 0 < config["steps"] < 100_000  # ended by time; the steps it made are recorded
    assert len(list((tmp_path / "a" / "data").glob("train_*.safetensors"))) == 2  # 6 clips in chunks of 4

    from diffusers import WanTransformer3DModel

    start = WanTransformer3DModel.from_pretrained(first / "transformer").state_dict()
    second = train_dit.train(_dit_config(tmp_path, root / "run" / "frozen", "b", steps=1,
                                         init_from=str(first / "transformer"), ema=0.999))
    after = WanTransformer3DModel.from_pretrained(second / "transformer").state_dict()
    # One step later the EMA is still (almost exactly) the weights it started from.
    worst = max(float((after[k] - start[k]).abs().max()) for k in start)
    assert worst < 1e-3
    assert any(not torch.equal(after[k], start[k]) for k in start)  # and it did take the step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the trainers' device path)")
def test_trainers_run_on_cuda(tmp_path):
    cfg = {
        "out_dir": str(tmp_path / "vae"), "device": "cuda", "workers": 1, "base_dim": 8, "eval_every": 100,
        "eval_clips": 1, "eval_frames": 5, "stats_clips": 1, "final_eval_clips": 1,
        "stages": [{"name": "images", "steps": 2, "frames": 1, "batch": 2, "lr": 5e-4},
                   {"name": "dec", "steps": 2, "frames": 5, "batch": 2, "lr": 2e-4, "decoder_only": True}],
    }
    (tmp_path / "vae.yaml").write_text(yaml.safe_dump(cfg))
    train_vae.train(train_vae.load_config(train_vae.VAEConfig, [str(tmp_path / "vae.yaml")]))
    final = train_dit.train(_dit_config(tmp_path, tmp_path / "vae" / "frozen", "dit", steps=3, device="cuda"))
    assert (final / "transformer" / "config.json").is_file()
    assert np.isfinite(json.loads((final / "training_report.json").read_text())["heldout_loss_ema"])
