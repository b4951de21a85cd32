"""Train the built-in tiny Wan image-to-video DiT (``WanTransformer3DModel``) on ShapesWorld, on CPU or a GPU.

    python -m cliploom.shapesworld.train_dit [CONFIG.yaml]

Like Wan 2.1 I2V, the DiT is a plain image-to-video model: its input per latent frame is
``cat(noisy latents[16], mask[4], y[16])`` where ``y`` is the VAE encoding of the first frame
followed by grey frames and the mask marks pixel frame 0. The ``y`` and mask are built by the
engine's own :mod:`cliploom.conditioning` functions, so training and inference agree. Motion
memory (SVI) is *not* taught here: that is the SVI LoRA's job (``cliploom train-svi``).

Two phases, both resumable:

1. **encode**: ``data_clips`` random ShapesWorld clips are encoded with the frozen VAE encoder
   (``vae_dir``, written by ``train_vae`` when its decoder-only stage starts) into chunks of
   safetensors under ``out_dir/data`` (clip latents, I2V ``y`` latents, prompts).
2. **train**: flow matching (``x_t = (1 - s) x0 + s noise``, target ``noise - x0``) with
   timesteps drawn uniformly and shifted by ``shift`` like the sampler's schedule, the prompt
   dropped to ``""`` with probability ``cfg_dropout`` (for classifier-free guidance), AdamW,
   an EMA of the weights; checkpoints every few minutes; ``train.csv`` per step and
   ``eval.csv`` (held-out loss at fixed timesteps). At the end the EMA weights are saved as a
   diffusers folder in ``out_dir/final/transformer`` and the frozen text encoder and tokenizer
   beside it.

``device: auto`` uses the GPU when there is one (the data then lives on it); ``workers``
render clips in background processes while the VAE encodes them ``encode_batch`` at a time;
``max_minutes`` bounds the training phase's wall time (the learning rate decays on whichever
of steps or time runs out first); ``init_from`` starts from a trained transformer folder
(a continuation: fresh optimiser and schedule, the EMA starts at those weights).
"""

from __future__ import annotations

import copy
import json
import math
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import conditioning as C
from .text import MAX_SEQUENCE_LENGTH, build_text_encoder, build_tokenizer, encode_prompts
from .train_vae import to_tensor
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
from .world import sample_clip


@dataclass
class DiTConfig:
    out_dir: str = "runs/dit"
    vae_dir: str = "runs/vae/frozen"
    seed: int = 0
    threads: int = 1
    device: str = "auto"  # "auto": the GPU when there is one
    workers: int = 0  # processes rendering clips for the encode phase (0: render inline)
    encode_batch: int = 1  # clips per VAE encode call
    size: int = 32
    frames: int = 17  # 5 latent frames, the clip length the VAE was trained on end to end
    # data
    data_clips: int = 3000
    chunk: int = 100
    heldout_clips: int = 64
    # model (WanTransformer3DModel)
    heads: int = 4
    head_dim: int = 64
    layers: int = 4
    ffn_dim: int = 768
    text_seed: int = 0
    init_from: str = ""  # a transformer folder to continue from ("": random init)
    # training
    steps: int = 8000
    batch: int = 8
    lr: float = 4e-4
    warmup: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.998
    shift: float = 5.0
    cfg_dropout: float = 0.1
    max_minutes: float = 0.0  # wall-time budget of the training phase (0: none)
    checkpoint_every_s: float = 300.0
    eval_every: int = 250
    log_every: int = 10


def build_transformer(cfg: DiTConfig, text_dim: int, z_dim: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(cfg.seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=cfg.heads,
        attention_head_dim=cfg.head_dim,
        in_channels=2 * z_dim + 4,
        out_channels=z_dim,
        text_dim=text_dim,
        freq_dim=64,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )


# ----- phase 1: encode the data ------------------------------------------------------------------
def load_vae(path: str | Path):
    from diffusers import AutoencoderKLWan

    if not (Path(path) / "config.json").is_file():
        raise SystemExit(f"error: no VAE at {path}; run `python -m cliploom.shapesworld.train_vae` first")
    return AutoencoderKLWan.from_pretrained(path).eval().requires_grad_(False)


def _normalise(vae, z: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(vae.config.latents_mean, device=z.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=z.device).view(1, -1, 1, 1, 1)
    return (z - mean) / std


@torch.no_grad()
def encode_clips(vae, clips: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips -> (normalised latents, normalised I2V ``y``), each ``[B, C, T, h, w]`` on the CPU.

    ``y`` is the encoding of the first frame followed by grey, exactly as the engine builds it
    for a plain image-to-video clip (:func:`cliploom.conditioning.pixel_motion_video`, ``ref_pad=0``).
    """
    device = next(vae.parameters()).device
    video = torch.stack([to_tensor(f) for f in clips]).to(device)
    cond_video = C.pixel_motion_video(video[:, :, 0], None, video.shape[2], ref_pad=0)
    z = _normalise(vae, vae.encode(torch.cat([video, cond_video])).latent_dist.mode()).cpu()
    return z[: len(clips)], z[len(clips) :]


def render_clip(seed: int, *, frames: int, size: int) -> tuple[np.ndarray, str]:
    """One training clip's frames and prompt (what the render workers send back)."""
    clip = sample_clip(seed, frames=frames, size=size)
    return clip.frames(), clip.segments[0].prompt


def encode_data(cfg: DiTConfig, vae, data_dir: Path, first_seed: int, count: int, name: str, pool=None) -> list[Path]:
    """Encode ``count`` clips (seeds ``first_seed...``) into chunk files, skipping chunks on disk."""
    from safetensors.torch import save_file

    data_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    chunks = math.ceil(count / cfg.chunk)
    render = partial(render_clip, frames=cfg.frames, size=cfg.size)
    todo = [c for c in range(chunks) if not (data_dir / f"{name}_{c:04d}.safetensors").is_file()]
    seeds = [first_seed + k for c in todo for k in range(c * cfg.chunk, min(count, (c + 1) * cfg.chunk))]
    rendered = Prefetch(pool, render, seeds, depth=4 * max(1, cfg.workers, cfg.encode_batch))
    for c in tqdm(range(chunks), desc=f"encode {name}", mininterval=10):
        path = data_dir / f"{name}_{c:04d}.safetensors"
        paths.append(path)
        if c not in todo:
            continue
        lat, ys, prompts = [], [], []
        n = min(count, (c + 1) * cfg.chunk) - c * cfg.chunk
        for start in range(0, n, cfg.encode_batch):
            batch = [next(rendered) for _ in range(min(cfg.encode_batch, n - start))]
            z, y = encode_clips(vae, [frames for frames, _ in batch])
            lat.append(z)
            ys.append(y)
            prompts += [prompt for _, prompt in batch]
        tmp = path.with_suffix(".partial")
        save_file({"latents": torch.cat(lat), "y": torch.cat(ys)}, tmp, metadata={"prompts": json.dumps(prompts)})
        tmp.rename(path)
    return paths


def load_data(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from safetensors import safe_open

    lat, ys, prompts = [], [], []
    for p in paths:
        with safe_open(p, "pt") as f:
            lat.append(f.get_tensor("latents"))
            ys.append(f.get_tensor("y"))
            prompts += json.loads(f.metadata()["prompts"])
    return torch.cat(lat), torch.cat(ys), prompts


# ----- phase 2: flow matching ---------------------------------------------------------------------
def shifted(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The sampler's sigma shift applied to uniform ``u`` in (0, 1)."""
    return shift * u / (1 + (shift - 1) * u)


def flow_loss(model, x0, y_latents, text, sigma, noise, frames: int) -> torch.Tensor:
    """Velocity-prediction loss for one batch, conditioned through :func:`conditioning.i2v_condition`."""
    cond = C.i2v_condition(y_latents, frames)
    s = sigma.view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    pred = model(
        hidden_states=cond.model_input(xt), timestep=sigma * 1000, encoder_hidden_states=text, return_dict=False
    )[0]
    return ((pred - (noise - x0)) ** 2).mean()


def train(cfg: DiTConfig) -> Path:
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", to_dict(cfg))
    pool = worker_pool(cfg.workers)  # forked before CUDA starts
    device = pick_device(cfg.device)
    clock = StageClock()

    # 1. Data: encode once with the frozen encoder.
    state = load_checkpoint(out / "checkpoint.pt")
    if state is not None:
        clock = StageClock(state["stage_seconds"])
    clock.enter("encode")
    vae = load_vae(cfg.vae_dir).to(device)
    train_paths = encode_data(cfg, vae, out / "data", 0, cfg.data_clips, "train", pool)
    held_paths = encode_data(cfg, vae, out / "data", 50_000_000, cfg.heldout_clips, "heldout", pool)
    del vae
    if pool is not None:
        pool.terminate()
    x_all, y_all, prompts = (t.to(device) if torch.is_tensor(t) else t for t in load_data(train_paths))
    x_held, y_held, prompts_held = (t.to(device) if torch.is_tensor(t) else t for t in load_data(held_paths))

    # 2. Text: the frozen tiny UMT5 embeds every distinct prompt once.
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer), seed=cfg.text_seed)
    distinct = sorted(set(prompts) | set(prompts_held) | {""})
    table = dict(zip(distinct, encode_prompts(tokenizer, text_encoder, distinct)))
    text_all = torch.stack([table[p] for p in prompts]).to(device)
    text_held = torch.stack([table[p] for p in prompts_held]).to(device)
    empty = table[""].to(device)

    # 3. Model, optimiser, EMA; resume.
    model = build_transformer(cfg, text_encoder.config.d_model, x_all.shape[1])
    if cfg.init_from and state is None:
        from diffusers import WanTransformer3DModel

        model.load_state_dict(WanTransformer3DModel.from_pretrained(cfg.init_from).state_dict())
        print(f"starting from {cfg.init_from}", flush=True)
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed at step {step}", flush=True)
    log = CsvLog(out / "train.csv", ["step", "lr", "loss", "step_s", "wall_s"])
    eval_log = CsvLog(out / "eval.csv", ["step", "heldout_loss", "heldout_loss_ema", "wall_s"])
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))

    def checkpoint():
        save_checkpoint(out / "checkpoint.pt", {
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "step": step, "stage_seconds": clock.snapshot(), "torch_rng": torch.get_rng_state(),
        })
        write_json(out / "stages.json", {"step": step, "stage_seconds": clock.snapshot()})

    g = torch.Generator().manual_seed(1234)
    held_sigma = torch.linspace(0.05, 0.95, len(x_held)).to(device)
    held_noise = torch.randn(x_held.shape, generator=g).to(device)

    @torch.no_grad()
    def heldout(m) -> float:
        m.eval()
        losses = [
            flow_loss(m, x_held[i : i + 16], y_held[i : i + 16], text_held[i : i + 16], held_sigma[i : i + 16],
                      held_noise[i : i + 16], cfg.frames).item()
            for i in range(0, len(x_held), 16)
        ]
        m.train()
        return float(np.mean(losses))

    clock.enter("train")
    model.train()
    last_ckpt = time.monotonic()
    bar = tqdm(total=cfg.steps, initial=step, desc="dit", mininterval=10, dynamic_ncols=True)
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    while step < cfg.steps and not stop["now"]:
        spent = time_progress(clock.snapshot().get("train", 0.0), cfg.max_minutes)
        if spent >= 1.0:
            tqdm.write(f"training ended by its {cfg.max_minutes} min budget at step {step}/{cfg.steps}")
            cfg.steps = step  # the run is complete at this step (recorded in config.json)
            write_json(out / "config.json", to_dict(cfg))
            break
        t0 = time.monotonic()
        lr = cosine_lr(cfg.lr, step, cfg.steps, cfg.warmup, time_progress=spent)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(x_all), (cfg.batch,)).to(device)
        text = text_all[idx].clone()
        text[torch.rand(cfg.batch, device=device) < cfg.cfg_dropout] = empty
        sigma = shifted(torch.rand(cfg.batch).clamp(1e-3, 1 - 1e-3), cfg.shift).to(device)
        loss = flow_loss(model, x_all[idx], y_all[idx], text, sigma, torch.randn_like(x_all[idx]), cfg.frames)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            if cfg.init_from:  # the EMA already holds trained weights: no short-memory warm-up
                decay = cfg.ema
            torch._foreach_lerp_(ema_params, model_params, 1 - decay)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == 1:
            log.write(step=step, lr=lr, loss=loss.item(), step_s=time.monotonic() - t0,
                      wall_s=sum(clock.snapshot().values()))
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            a, b = heldout(model), heldout(ema)
            eval_log.write(step=step, heldout_loss=a, heldout_loss_ema=b, wall_s=sum(clock.snapshot().values()))
            tqdm.write(f"step {step}: held-out loss {a:.4f} (EMA {b:.4f})")
        if time.monotonic() - last_ckpt > cfg.checkpoint_every_s:
            checkpoint()
            last_ckpt = time.monotonic()
    bar.close()
    checkpoint()
    if step < cfg.steps:
        print(f"stopped at step {step}/{cfg.steps}; run the same command again to resume", flush=True)
        return out / "checkpoint.pt"
    return finalize(cfg, ema, tokenizer, text_encoder, clock, heldout(ema))


def finalize(cfg: DiTConfig, ema, tokenizer, text_encoder, clock: StageClock, heldout_loss: float) -> Path:
    final = Path(cfg.out_dir) / "final"
    ema.save_pretrained(final / "transformer", safe_serialization=True)
    text_encoder.save_pretrained(final / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(final / "tokenizer")
    seconds = clock.snapshot()
    report = {
        "heldout_loss_ema": heldout_loss,
        "params": sum(p.numel() for p in ema.parameters()),
        "steps": cfg.steps,
        "batch": cfg.batch,
        "device": _device_name(next(ema.parameters()).device),
        "stage_seconds": seconds,
        "total_hours": sum(seconds.values()) / 3600,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
    }
    earlier = Path(cfg.init_from).parent / "training_report.json" if cfg.init_from else None
    if earlier is not None and earlier.is_file():  # a continuation: keep the run it continued
        report["continued_from"] = {"path": cfg.init_from, **json.loads(earlier.read_text())}
    write_json(final / "training_report.json", report)
    print(f"saved {final}: held-out loss {heldout_loss:.4f}", flush=True)
    return final


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def export_checkpoint(out_dir: str | Path, dest: str | Path) -> Path:
    """Save the EMA weights of a run's latest checkpoint like :func:`finalize` does (to look at
    or build a model from while training goes on)."""
    from .trainutil import from_dict

    out_dir = Path(out_dir)
    cfg = from_dict(DiTConfig, json.loads((out_dir / "config.json").read_text()))
    state = load_checkpoint(out_dir / "checkpoint.pt")
    if state is None:
        raise SystemExit(f"error: no checkpoint in {out_dir}")
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer), seed=cfg.text_seed)
    z_dim = (state["ema"]["patch_embedding.weight"].shape[1] - 4) // 2
    ema = build_transformer(cfg, text_encoder.config.d_model, z_dim)
    ema.load_state_dict(state["ema"])
    clock = StageClock(state["stage_seconds"])
    cfg.out_dir = str(dest)
    return finalize(cfg, ema, tokenizer, text_encoder, clock, float("nan"))


def main(argv: list[str] | None = None) -> None:
    train(load_config(DiTConfig, argv))


if __name__ == "__main__":
    main()
