"""Train the built-in tiny Wan VAE (``AutoencoderKLWan``) on ShapesWorld, on CPU or a GPU.

    python -m cliploom.shapesworld.train_vae [CONFIG.yaml]

Stages run one after another (see :class:`VAEConfig`): single frames first (the Wan VAE
encodes a clip's first frame on its own, so images teach appearance cheaply), then short
clips to teach time. The run checkpoints to ``out_dir/checkpoint.pt`` every few minutes and
resumes from it when restarted; it logs every step to ``train.csv``, held-out PSNR to
``eval.csv`` and the wall time per stage to ``stages.json``. When all stages are done it
measures the per-channel mean/std of the encoder's mean latents, writes them into the config
(``latents_mean`` / ``latents_std``) and saves a diffusers folder to ``out_dir/final``.

``device: auto`` trains on the GPU when there is one; ``workers`` render the batches in
background processes (the GPU would otherwise wait on numpy); a stage's ``max_minutes`` ends it
when its time is spent, with its learning rate decayed on the time left (see
:func:`trainutil.cosine_lr`), so a recipe can say "this stage gets 6 minutes of a GPU".
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .trainutil import (
    CsvLog,
    Prefetch,
    StageClock,
    cosine_lr,
    load_checkpoint,
    load_config,
    pick_device,
    save_checkpoint,
    time_progress,
    to_dict,
    worker_pool,
    write_json,
)
from .world import CLIP_FRAMES, sample_clip, sample_sequence


@dataclass
class VAEStage:
    name: str
    steps: int
    frames: int  # pixel frames per sample: 1 (images) or 1 + 4k
    batch: int
    lr: float
    # Train only the decoder (the encoder, and so the latent space, is frozen). When the
    # first such stage starts, the frozen encoder is saved with its latent statistics to
    # ``out_dir/frozen`` so the DiT can be trained on final latents while the decoder improves.
    decoder_only: bool = False
    threads: int = 0  # torch threads for this stage (0: the config's ``threads``)
    max_minutes: float = 0.0  # wall-time budget of the stage (0: none); it ends at steps or time


@dataclass
class VAEConfig:
    out_dir: str = "runs/vae"
    seed: int = 0
    threads: int = 2
    device: str = "auto"  # "auto": the GPU when there is one
    workers: int = 0  # processes rendering training batches ahead (0: render inline)
    size: int = 32
    base_dim: int = 16
    z_dim: int = 16
    dim_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    temperal_downsample: list[bool] = field(default_factory=lambda: [True, True])
    kl_weight: float = 1e-6
    mse_weight: float = 1.0
    l1_weight: float = 1.0
    grad_clip: float = 1.0
    warmup: int = 100
    stages: list[VAEStage] = field(
        default_factory=lambda: [
            VAEStage("images", steps=1500, frames=1, batch=16, lr=5e-4),
            VAEStage("clips9", steps=1200, frames=9, batch=8, lr=3e-4),
            VAEStage("decoder17", steps=3000, frames=17, batch=4, lr=2e-4, decoder_only=True, threads=1),
        ]
    )
    checkpoint_every_s: float = 300.0
    eval_every: int = 250
    eval_clips: int = 8
    eval_frames: int = CLIP_FRAMES  # frames per held-out clip in eval.csv
    stats_clips: int = 64
    final_eval_clips: int = 32
    log_every: int = 10

    _item_types = {"stages": VAEStage}


def build_vae(cfg: VAEConfig):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=cfg.base_dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        attn_scales=[],
        temperal_downsample=list(cfg.temperal_downsample),
        latents_mean=[0.0] * cfg.z_dim,
        latents_std=[1.0] * cfg.z_dim,
        scale_factor_spatial=2 ** (len(cfg.dim_mult) - 1),
        scale_factor_temporal=2 ** sum(cfg.temperal_downsample),
    )


# ----- data --------------------------------------------------------------------------------
def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[F, H, W, 3]`` -> float ``[3, F, H, W]`` in -1..1 (the Wan VAE's input)."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def batch_to_tensor(frames: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 ``[B, F, H, W, 3]`` -> float ``[B, 3, F, H, W]`` in -1..1 on ``device``."""
    x = torch.from_numpy(frames).to(device, non_blocking=True)
    return x.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def training_batch(seed: int, step: int, stage: VAEStage, size: int) -> torch.Tensor:
    """A deterministic batch for ``step``: random frames (images) or windows of long sequences."""
    return batch_to_tensor(training_frames(step, seed=seed, stage=stage, size=size))


def training_frames(step: int, *, seed: int, stage: VAEStage, size: int) -> np.ndarray:
    """The frames of :func:`training_batch` as uint8 ``[B, F, H, W, 3]`` (what workers send)."""
    rng = np.random.default_rng([seed, step])
    items = []
    for _ in range(stage.batch):
        s = int(rng.integers(2**31))
        if stage.frames == 1:
            clip = sample_clip(s, frames=CLIP_FRAMES, size=size)
            k = int(rng.integers(clip.num_frames))
            items.append(clip.frames(k, k + 1))
        else:
            seq = sample_sequence(s, num_segments=3, segment_frames=max(stage.frames, 12), size=size)
            a = int(rng.integers(seq.num_frames - stage.frames + 1))
            items.append(seq.frames(a, a + stage.frames))
    return np.stack(items)


def heldout_clips(n: int, size: int, frames: int = CLIP_FRAMES) -> list[np.ndarray]:
    """Held-out evaluation clips (seeds far from the training stream): half single-prompt,
    half with a motion change mid-clip."""
    out = []
    for i in range(n):
        if i % 2 == 0:
            out.append(sample_clip(10_000_000 + i, frames=frames, size=size).frames())
        else:
            out.append(sample_sequence(10_000_000 + i, 2, [frames // 2, frames - frames // 2], size=size).frames())
    return out


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


@torch.no_grad()
def reconstruct(vae, frames: np.ndarray) -> np.ndarray:
    """Encode (mean latents) and decode one clip; returns uint8 frames like the input."""
    x = to_tensor(frames)[None].to(next(vae.parameters()).device)
    z = vae.encode(x).latent_dist.mode()
    y = vae.decode(z).sample[0]
    return ((y.permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()


def heldout_psnr(vae, clips: list[np.ndarray]) -> float:
    vae.eval()
    mse = []
    for frames in clips:
        rec = reconstruct(vae, frames)
        mse.append(np.mean((rec.astype(np.float64) - frames.astype(np.float64)) ** 2))
    vae.train()
    return 10.0 * math.log10(255.0**2 / max(float(np.mean(mse)), 1e-12))


@torch.no_grad()
def latent_stats(vae, n: int, size: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the encoder's mean latents over ``n`` 33-frame clips."""
    vae.eval()
    zs = []
    for i in range(n):
        frames = sample_sequence(20_000_000 + i, 2, [16, 17], size=size).frames()
        zs.append(vae.encode(to_tensor(frames)[None].to(next(vae.parameters()).device)).latent_dist.mode().cpu())
    z = torch.cat(zs).transpose(0, 1).reshape(zs[0].shape[1], -1)
    return z.mean(1).tolist(), z.std(1).tolist()


# ----- training ----------------------------------------------------------------------------
def stage_at(stages: list[VAEStage], step: int) -> tuple[int, VAEStage, int]:
    """(stage index, stage, step within stage) for global ``step``."""
    start = 0
    for i, st in enumerate(stages):
        if step < start + st.steps:
            return i, st, step - start
        start += st.steps
    return len(stages), stages[-1], stages[-1].steps


def train(cfg: VAEConfig) -> Path:
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", to_dict(cfg))
    pool = worker_pool(cfg.workers)  # forked before CUDA starts
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.stages[0].lr, weight_decay=0.0)
    ckpt_path = out / "checkpoint.pt"
    state = load_checkpoint(ckpt_path)
    step, clock = 0, StageClock()
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, clock = state["step"], StageClock(state["stage_seconds"])
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed from {ckpt_path} at step {step}", flush=True)
    total = sum(s.steps for s in cfg.stages)
    log = CsvLog(out / "train.csv", ["step", "stage", "lr", "loss", "l1", "mse", "kl", "psnr", "step_s", "wall_s"])
    eval_log = CsvLog(out / "eval.csv", ["step", "stage", "heldout_psnr", "wall_s"])
    eval_clips = heldout_clips(cfg.eval_clips, cfg.size, cfg.eval_frames)

    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))

    def checkpoint():
        save_checkpoint(
            ckpt_path,
            {
                "model": vae.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "stage_seconds": clock.snapshot(),
                "torch_rng": torch.get_rng_state(),
                "config": to_dict(cfg),
            },
        )
        write_json(out / "stages.json", {"step": step, "stage_seconds": clock.snapshot()})

    vae.train()
    last_ckpt = time.monotonic()
    bar = tqdm(total=total, initial=step, desc="vae", mininterval=10, dynamic_ncols=True)
    current, batches = None, None
    while step < total and not stop["now"]:
        si, stage, local = stage_at(cfg.stages, step)
        if stage.name != current:
            current = stage.name
            torch.set_num_threads(stage.threads or cfg.threads)
            vae.encoder.requires_grad_(not stage.decoder_only)
            vae.quant_conv.requires_grad_(not stage.decoder_only)
            if stage.decoder_only and not (out / "frozen" / "config.json").exists():
                clock.enter("freeze")  # its own line in stages.json, outside any stage's budget
                save_frozen(cfg, vae)
            clock.enter(stage.name)
            make = partial(training_frames, seed=cfg.seed, stage=stage, size=cfg.size)
            batches = Prefetch(pool, make, range(step, step - local + stage.steps), depth=2 * max(1, cfg.workers))
        spent = time_progress(clock.snapshot().get(stage.name, 0.0), stage.max_minutes)
        if spent >= 1.0:  # the stage's time is up: on to the next stage (or the end)
            tqdm.write(f"stage {stage.name} ended by its {stage.max_minutes} min budget after {local} steps")
            p = heldout_psnr(vae, eval_clips)
            eval_log.write(step=step, stage=stage.name, heldout_psnr=p, wall_s=sum(clock.snapshot().values()))
            step += stage.steps - local
            bar.update(stage.steps - local)
            checkpoint()
            last_ckpt = time.monotonic()
            current = None
            continue
        lr = cosine_lr(stage.lr, local, stage.steps, cfg.warmup, time_progress=spent)
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.monotonic()
        x = batch_to_tensor(next(batches), device)
        with torch.set_grad_enabled(not stage.decoder_only):
            posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample()).sample
        l1 = (y - x).abs().mean()
        mse = ((y - x) ** 2).mean()
        kl = posterior.kl().mean() / math.prod(posterior.mean.shape[1:])
        loss = cfg.l1_weight * l1 + cfg.mse_weight * mse + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == 1:
            psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-12))
            log.write(step=step, stage=stage.name, lr=lr, loss=loss.item(), l1=l1.item(), mse=mse.item(),
                      kl=kl.item(), psnr=psnr, step_s=time.monotonic() - t0, wall_s=sum(clock.snapshot().values()))
            bar.set_postfix(stage=stage.name, loss=f"{loss.item():.4f}", psnr=f"{psnr:.1f}")
        end_of_stage = stage_at(cfg.stages, step)[0] != si
        if step % cfg.eval_every == 0 or end_of_stage or step == total:
            p = heldout_psnr(vae, eval_clips)
            eval_log.write(step=step, stage=stage.name, heldout_psnr=p, wall_s=sum(clock.snapshot().values()))
            tqdm.write(f"step {step} [{stage.name}] held-out PSNR {p:.2f} dB")
        if end_of_stage or time.monotonic() - last_ckpt > cfg.checkpoint_every_s:
            checkpoint()
            last_ckpt = time.monotonic()
    bar.close()
    checkpoint()
    if pool is not None:
        pool.terminate()
    if step < total:
        print(f"stopped at step {step}/{total}; run the same command again to resume", flush=True)
        return ckpt_path
    return finalize(cfg, vae, clock)


def save_frozen(cfg: VAEConfig, vae) -> Path:
    """Save the VAE with latent statistics to ``out_dir/frozen`` (atomically); its encoder
    (and so every latent) stays what the later decoder-only stages see."""
    import shutil

    out = Path(cfg.out_dir)
    mean, std = latent_stats(vae, cfg.stats_clips, cfg.size)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    tmp = out / "frozen.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    write_json(tmp / "frozen_report.json", {"heldout_psnr_33f_8clips": heldout_psnr(vae, heldout_clips(8, cfg.size))})
    tmp.rename(out / "frozen")
    vae.train()
    tqdm.write(f"saved the frozen encoder to {out / 'frozen'}")
    return out / "frozen"


def finalize(cfg: VAEConfig, vae, clock: StageClock) -> Path:
    """Measure latent statistics, store them in the config, save the diffusers folder."""
    out = Path(cfg.out_dir)
    t0 = time.monotonic()
    mean, std = latent_stats(vae, cfg.stats_clips, cfg.size)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    final = out / "final"
    vae.save_pretrained(final, safe_serialization=True)
    n = cfg.final_eval_clips
    p17 = heldout_psnr(vae, heldout_clips(n, cfg.size, frames=17))
    p33 = heldout_psnr(vae, heldout_clips(n, cfg.size))
    p81 = heldout_psnr(vae, heldout_clips(max(1, n // 8), cfg.size, frames=81))
    seconds = clock.snapshot()
    seconds["finalize"] = time.monotonic() - t0
    report = {
        f"heldout_psnr_17f_{n}clips": p17,
        f"heldout_psnr_33f_{n}clips": p33,
        f"heldout_psnr_81f_{max(1, n // 8)}clips": p81,
        "latents_mean": mean,
        "latents_std": std,
        "stage_seconds": seconds,
        "total_hours": sum(seconds.values()) / 3600,
        "params": sum(p.numel() for p in vae.parameters()),
    }
    write_json(final / "training_report.json", report)
    print(f"saved {final}: held-out PSNR {p17:.2f} dB (17 frames), {p33:.2f} dB (33), {p81:.2f} dB (81)", flush=True)
    return final


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(VAEConfig, argv)
    train(cfg)


if __name__ == "__main__":
    main()
