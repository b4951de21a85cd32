"""Error-Recycling Fine-Tuning: the training loop of the SVI LoRA.

One optimizer step, read top-down in :meth:`SVITrainer.micro_step`:

1. draw how each sample is conditioned (latent / pixel mode, K or N, the reference frame), cut a
   clip to match, encode it and condition it with the engine's own functions (``samples``);
2. draw a timestep from the shifted training grid and the sample's injections (``recycling``);
3. ``x_t = (1 - s)(x0 + E_latent) + s (noise + E_noise)`` with ``y``'s motion latents plus
   ``E_y``; target ``v = (noise + E_noise) - x0`` (``velocity_target: clean``, the official code)
   or ``- (x0 + E_latent)`` (``injected``);
4. loss ``w(t) * mse(v_hat, v)``, backward, clip, AdamW on the LoRA only;
5. without gradient, the one-step errors of ``v_hat`` at both ends go into the replay memories.

Every random draw of step ``s`` on process ``r`` comes from a generator seeded by
``(seed, r, s)``, so a resumed run makes exactly the draws the uninterrupted run would have made.
Devices, multi-GPU and bf16 autocast are accelerate's (``accelerate launch -m cliploom.cli
train-svi ...``); gradient checkpointing is on by default on GPUs.
"""

from __future__ import annotations

import csv
import math
import signal
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import CliploomError
from ..sampling import NUM_TRAIN_TIMESTEPS, schedule
from ..shapesworld.trainutil import cosine_lr
from . import checkpoint as ckpt
from .adapter import attach_lora, init_from_file, load_lora_state, lora_state
from .config import TrainConfig
from .data import ShapesWorldClips, VideoFolderClips
from .export import export_lora
from .recycling import ErrorRecycler, Injection
from .closed_loop import closed_loop_clip
from .samples import Choice, TrainSample, build_sample, draw_choice, invented_movement

# Settings a resumed run must share with the run it continues (they shape the saved state).
STRUCTURAL = (
    "model", "expert", "rank", "alpha", "targets", "frames", "width", "height", "replay_bins", "replay_capacity",
    "shift", "train_timesteps", "batch_size", "grad_accum", "seed", "error_recycling",
)
CSV_COLUMNS = [
    "step", "loss", "lr", "grad_norm", "timestep", "weight", "mode", "injected", "replay_clean", "replay_noise",
    "seconds", "critic_loss",
]


def gaussian_weights(timesteps: torch.Tensor) -> torch.Tensor:
    """DiffSynth's Wan loss weight over the training grid: ``exp(-2 ((t - 500) / 1000)^2)``,
    shifted to start at 0 and scaled to mean 1 over the grid."""
    n = NUM_TRAIN_TIMESTEPS
    y = torch.exp(-2 * ((timesteps - n / 2) / n) ** 2)
    y = y - y.min()
    return y * (len(timesteps) / y.sum())


def _batch_timesteps(parts: list[torch.Tensor]) -> torch.Tensor:
    """One batch of timesteps from per-sample ones: ``[B]`` when every sample has one timestep,
    else ``[B, tokens]`` with a one-timestep sample spread over its tokens (a diffusion-forcing
    batch mixes first clips, which have no context frames, with clips that have them)."""
    if all(p.ndim == 1 for p in parts):
        return torch.cat(parts)
    tokens = next(p.shape[1] for p in parts if p.ndim == 2)
    return torch.cat([p if p.ndim == 2 else p[:, None].expand(-1, tokens) for p in parts])


@dataclass
class StepInfo:
    step: int
    loss: float
    lr: float
    grad_norm: float
    timesteps: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)
    injections: list[str] = field(default_factory=list)
    banked: int = 0
    critic_loss: float | None = None  # self-forcing: the critic's mean loss over the step
    # the last micro-step's inputs, for tests and debugging
    samples: list[TrainSample] = field(default_factory=list, repr=False)
    noise: torch.Tensor | None = field(default=None, repr=False)
    sigmas: torch.Tensor | None = field(default=None, repr=False)


class SVITrainer:
    """Holds the model with its LoRA, the optimizer, the replay memories and the data source."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, model=None, progress: bool = True):
        from accelerate import Accelerator

        self.cfg = cfg
        self.progress = progress
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        cuda = device.startswith("cuda")
        mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if cuda else "no")
        self.accelerator = Accelerator(mixed_precision=mp, cpu=not cuda, gradient_accumulation_steps=cfg.grad_accum)
        acc = self.accelerator
        self.out_dir = Path(cfg.out_dir)

        # 1. The model, its settings filled into the config, and the expert being trained.
        if model is None:
            from ..models.builtin import SHIPPED
            from ..models.loading import load_model

            if cfg.model == "builtin" and not (SHIPPED / "model_index.json").is_file():
                raise CliploomError(f"the built-in ShapesWorld model is not in this install ({SHIPPED})",
                                    "set `model:` to a diffusers-layout Wan I2V folder")

            dtype = torch.bfloat16 if mp == "bf16" else torch.float32
            model = load_model(cfg.model, device=acc.device, dtype=dtype)
        self.model = model
        s = model.settings
        cfg.frames = cfg.frames or s.frames
        cfg.width, cfg.height = cfg.width or s.width, cfg.height or s.height
        cfg.shift = cfg.shift or s.shift
        self._check_geometry()
        self.transformer, self.t_range = self._pick_expert()

        # 2. The LoRA and its optimizer.
        params = attach_lora(self.transformer, cfg, seed=cfg.seed) + self.extra_params()
        if cfg.init_lora and not resume:
            init_from_file(self.transformer, cfg)
        if cfg.gradient_checkpointing == "on" or (cfg.gradient_checkpointing == "auto" and cuda):
            self.transformer.enable_gradient_checkpointing()
        self.transformer.train()
        self.params = params
        optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
        )
        self.net, self.optimizer = acc.prepare(self.transformer, optimizer)

        # 3. Timesteps: the shifted training grid, its loss weights, the replay bins' grid.
        sigmas = schedule(cfg.train_timesteps, cfg.shift)[:-1]
        self.train_sigmas = sigmas
        self.train_weights = gaussian_weights(sigmas * NUM_TRAIN_TIMESTEPS)
        if cfg.timestep_weighting == "none":
            self.train_weights = torch.ones_like(self.train_weights)
        t = sigmas * NUM_TRAIN_TIMESTEPS
        self.allowed = torch.nonzero((t >= self.t_range[0]) & (t < self.t_range[1])).flatten()
        if len(self.allowed) == 0:
            raise CliploomError(f"no training timestep falls in the expert's range {self.t_range}", "check `expert`")
        grid = schedule(cfg.replay_bins, cfg.shift)[:-1] * NUM_TRAIN_TIMESTEPS
        self.recycler = ErrorRecycler(cfg, grid)

        # 4. Data and prompts.
        self.data = self._data_source()
        self._text: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.step = 0
        self.started_from = 0
        self.closed_loop_samples = 0
        if resume:
            self._resume()
        elif ckpt.list_checkpoints(self.out_dir):
            raise CliploomError(
                f"{self.out_dir} already holds checkpoints",
                "pass --resume to continue that run, or set another out_dir",
            )

    # -- setup ------------------------------------------------------------------------------------
    def _check_geometry(self) -> None:
        cfg, m = self.cfg, self.model
        if (cfg.frames - 1) % m.scale_temporal:
            raise CliploomError(f"frames {cfg.frames} does not fit the VAE's {m.scale_temporal}x time stride",
                                f"use {m.scale_temporal}k+1 frames")
        for name in ("width", "height"):
            v = getattr(cfg, name)
            if v % m.size_multiple:
                raise CliploomError(f"{name} {v} is not a multiple of {m.size_multiple} for this model",
                                    f"use e.g. {max(1, round(v / m.size_multiple)) * m.size_multiple}")
        if cfg.data == "shapesworld" and cfg.width != cfg.height:
            raise CliploomError(f"ShapesWorld frames are square, got {cfg.width}x{cfg.height}",
                                "set width and height to the same value")

    def _pick_expert(self):
        """The transformer to train and the timestep range ``[lo, hi)`` it serves."""
        cfg, m = self.cfg, self.model
        boundary = m.settings.boundary_ratio
        if m.transformer_2 is None or boundary is None:
            if cfg.expert is not None:
                raise CliploomError(f"expert: {cfg.expert} is set but {m.path} has a single transformer",
                                    "remove `expert:` from the config")
            return m.transformer, (0.0, math.inf)
        if cfg.expert is None:
            raise CliploomError(f"{m.path} has two experts (boundary {boundary}); they are trained apart",
                                "set `expert: high` or `expert: low` (one run each)")
        cut = boundary * NUM_TRAIN_TIMESTEPS
        if cfg.expert == "high":
            return m.transformer, (cut, math.inf)
        return m.transformer_2, (0.0, cut)

    def _data_source(self):
        cfg = self.cfg
        if cfg.data == "videos":
            return VideoFolderClips(cfg.videos, cfg.frames, cfg.width, cfg.height, cfg.frame_stride,
                                    cfg.default_caption)
        return ShapesWorldClips(cfg.frames, cfg.width, cfg.segments, cfg.segment_frames, cfg.boundary_prob,
                                cfg.wall_prob, cfg.wall_move)

    def generator(self, step: int, micro: int = 0) -> torch.Generator:
        """The generator of every random draw of (step, micro-step) on this process."""
        seq = np.random.SeedSequence([self.cfg.seed, self.accelerator.process_index, step, micro])
        return torch.Generator().manual_seed(int(seq.generate_state(1, dtype=np.uint64)[0] >> 1))

    def text(self, prompt: str) -> torch.Tensor:
        emb = self._text.get(prompt)
        if emb is None:
            emb = self.model.encode_text([prompt])[0:1]
            self._text[prompt] = emb
            if len(self._text) > self.cfg.text_cache:
                self._text.popitem(last=False)
        else:
            self._text.move_to_end(prompt)
        return emb

    # -- one step ---------------------------------------------------------------------------------
    def make_samples(self, generator: torch.Generator) -> list[TrainSample]:
        out = []
        for _ in range(self.cfg.batch_size):
            if self.cfg.closed_loop_prob > 0 and (sample := self.closed_loop_sample(generator)) is not None:
                out.append(sample)
                continue
            choice = draw_choice(self.cfg, self.cfg.frames, generator)
            history = 0
            if self.cfg.motion_source == "previous_clip" and choice.mode == "latent" and choice.motion > 0:
                history = self.cfg.frames - choice.motion_pixels  # the previous clip = history + the motion frames
            far = choice.far_anchor and (self.cfg.anchor_from if self.cfg.anchor_from != "clip" else "any")
            clip = self.data.clip(generator, choice.motion_pixels, far or None, history)
            out.append(build_sample(self.model, clip, choice, self.cfg.route, self.cfg.motion_weight > 0))
        return out

    def closed_loop_sample(self, generator: torch.Generator) -> TrainSample | None:
        """With chance ``closed_loop_prob``, the clip after a rollout of the LoRA being trained
        (cliploom.train.closed_loop); ``None`` otherwise or when the rollout lost its subject."""
        cfg = self.cfg
        if float(torch.rand((), generator=generator)) >= cfg.closed_loop_prob:
            return None
        K = cfg.motion_latents[int(torch.randint(len(cfg.motion_latents), (1,), generator=generator))]
        n = cfg.closed_loop_clips[int(torch.randint(len(cfg.closed_loop_clips), (1,), generator=generator))]
        clip = closed_loop_clip(self.model, generator, cfg.frames, K, n)
        if clip is None:
            return None
        choice = Choice("latent", K, far_anchor=True, closed_loop=n, anchor_error=cfg.y_error_on_anchor)
        self.closed_loop_samples += 1
        sample = build_sample(self.model, clip, choice, cfg.route, cfg.motion_weight > 0)
        if cfg.closed_loop_lead == "memory":  # the lead latents are what the rollout handed on
            sample.latents = sample.latents.clone()
            sample.latents[:, :, 1 : 1 + K] = clip.motion.to(sample.latents)
        return sample

    def micro_step(self, samples: list[TrainSample], generator: torch.Generator) -> dict:
        """Forward and backward of one micro-batch with error injection; banks the new errors."""
        cfg, acc, device = self.cfg, self.accelerator, self.accelerator.device
        B = len(samples)
        x0 = torch.cat([s.latents for s in samples]).float()
        pick = self.allowed[torch.randint(len(self.allowed), (B,), generator=generator)]
        sigmas = self.train_sigmas[pick]
        weights = self.train_weights[pick]
        noise = torch.randn(x0.shape, generator=generator).to(device)
        ts = (sigmas * NUM_TRAIN_TIMESTEPS).tolist()

        # Error injection from the replay memories (per sample).
        rec = self.recycler
        x0_in, noise_in = x0.clone(), noise.clone()
        injections: list[Injection] = []
        for i, s in enumerate(samples):
            drawn = rec.draw(generator)
            done = Injection(clean=drawn.clean)
            if drawn.latent and (e := rec.latent_error(ts[i], generator)) is not None:
                x0_in[i] += e.to(device)
                done.latent = True
            if drawn.noise and (e := rec.noise_error(ts[i], generator)) is not None:
                noise_in[i] += e.to(device)
                done.noise = True
            if drawn.y and s.error_start is not None and (e := rec.y_error(ts[i], generator)) is not None:
                s.cond.y = None if s.cond.y is None else s.cond.y.clone()
                s.cond.clean = None if s.cond.clean is None else s.cond.clean.clone()
                done.y = rec.inject_y(s.cond, e.to(device), s.error_start, generator)[0] >= 0
            injections.append(done)

        sig = sigmas.to(device).view(B, 1, 1, 1, 1)
        x_t = (1 - sig) * x0_in + sig * noise_in
        v = noise_in - (x0 if cfg.velocity_target == "clean" else x0_in)

        # The model sees exactly what the sampler gives it (ClipCondition.model_input / timestep).
        inputs = torch.cat([s.cond.model_input(x_t[i : i + 1]) for i, s in enumerate(samples)])
        timestep = _batch_timesteps([s.cond.timestep(ts[i], x_t[i : i + 1]) for i, s in enumerate(samples)])
        text = torch.cat([self.text(s.prompt) for s in samples])
        image = [s.cond.image_embeds for s in samples]
        image = None if image[0] is None else torch.cat(image)
        dtype = self.model.dtype
        with acc.autocast():
            out = self.net(
                hidden_states=inputs.to(dtype),
                timestep=timestep,
                encoder_hidden_states=text.to(dtype),
                encoder_hidden_states_image=None if image is None else image.to(dtype),
                return_dict=False,
            )[0]
        v_hat = out.float()
        sq = (v_hat - v) ** 2
        masks = [s.loss_mask for s in samples]
        m = None
        if any(m is not None for m in masks):  # frames the condition gives are not predicted
            ones = torch.ones(1, 1, sq.shape[2], 1, 1, device=sq.device)
            m = torch.cat([ones if m is None else m for m in masks]).expand_as(sq)
        if cfg.motion_weight:  # where the clip moves counts 1 + motion_weight times (small subjects)
            where = torch.cat([s.motion_map for s in samples]).to(sq.device)
            if cfg.motion_weight_on == "both":  # and where the prediction invents motion the clip lacks
                where = torch.maximum(where, invented_movement((x_t - sig * v_hat).detach(), x0))
            w = 1 + cfg.motion_weight * where
            m = w.expand_as(sq) if m is None else m * w
        if m is not None:
            per_sample = (sq * m).flatten(1).sum(1) / m.flatten(1).sum(1)
        else:
            per_sample = sq.flatten(1).mean(1)
        loss = (per_sample * weights.to(device)).mean()
        acc.backward(loss)

        gather = acc.gather if acc.num_processes > 1 and self.step < cfg.replay_warmup_steps else None
        banked = rec.bank(v_hat, v, sigmas, [j.clean for j in injections], generator, gather)
        return dict(loss=float(loss.detach()), ts=ts, weights=weights.tolist(), injections=injections,
                    samples=samples, noise=noise, sigmas=sigmas, banked=banked)

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then constant (a cosine whose floor is 1) or a cosine decay to ``lr_min``."""
        cfg = self.cfg
        floor = cfg.lr_min / cfg.lr if cfg.lr_schedule == "cosine" else 1.0
        return cosine_lr(cfg.lr, step, cfg.steps, cfg.warmup_steps, floor=floor)

    def train_step(self) -> StepInfo:
        """One optimizer step (``grad_accum`` micro-steps); advances ``self.step``."""
        cfg, acc = self.cfg, self.accelerator
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        info = StepInfo(self.step + 1, 0.0, lr, 0.0)
        for micro in range(cfg.grad_accum):
            generator = self.generator(self.step, micro)
            samples = self.make_samples(generator)
            with acc.accumulate(self.net):
                r = self.micro_step(samples, generator)
                if acc.sync_gradients:
                    norm = acc.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                    info.grad_norm = float(norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            loss = r["loss"]
            if acc.num_processes > 1:  # the logged loss is the mean over processes
                loss = float(acc.gather(torch.tensor([loss], device=acc.device)).mean())
            info.loss += loss / cfg.grad_accum
            info.timesteps += r["ts"]
            info.weights += r["weights"]
            info.modes += [s.choice.describe() for s in r["samples"]]
            info.injections += [j.flags() for j in r["injections"]]
            info.banked += r["banked"]
            info.samples, info.noise, info.sigmas = r["samples"], r["noise"], r["sigmas"]
        self.step += 1
        return info

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        acc, cfg = self.accelerator, self.cfg
        stage = ckpt.staging_dir(self.out_dir, self.step)
        if acc.is_main_process:
            if stage.exists():
                import shutil

                shutil.rmtree(stage)
            stage.mkdir(parents=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            extra = {"num_processes": acc.num_processes, "replay_sizes": [len(self.recycler.clean_memory),
                                                                          len(self.recycler.noise_memory)]}
            ckpt.write_main(stage, self.step, self.lora_state(), self.optimizer.state_dict(), cfg.to_dict(), extra)
            self._write_extra(stage)
        ckpt.write_process(stage, acc.process_index, self.recycler.state_dict())
        acc.wait_for_everyone()
        final = ckpt.checkpoint_dir(self.out_dir, self.step)
        if acc.is_main_process:
            ckpt.finish(self.out_dir, self.step, cfg.keep_checkpoints)
        acc.wait_for_everyone()
        return final

    def _resume(self) -> None:
        found = ckpt.list_checkpoints(self.out_dir)
        if not found:
            print(f"no checkpoint in {self.out_dir}: starting from step 0")
            return
        step, folder = found[-1]
        state = ckpt.read_state(folder)
        saved = state["config"]
        now = self.cfg.to_dict()
        changed = [k for k in STRUCTURAL if saved.get(k) != now.get(k)]
        if changed:
            raise CliploomError(
                f"{folder} was made with other {', '.join(changed)} "
                f"({', '.join(f'{k}: {saved.get(k)!r}' for k in changed)})",
                "resume with the config it was trained with, or set another out_dir",
            )
        if state.get("num_processes", 1) != self.accelerator.num_processes:
            raise CliploomError(
                f"{folder} was written by {state.get('num_processes')} processes, this run has "
                f"{self.accelerator.num_processes}",
                "resume with the same number of processes (each keeps its own replay memory)",
            )
        lora, _ = ckpt.read_checkpoint_lora(folder)
        load_lora_state(self.transformer, lora)
        self.optimizer.load_state_dict(ckpt.read_optimizer(folder, state))
        self._read_extra(folder)
        replay, rng = ckpt.read_process(folder, self.accelerator.process_index)
        self.recycler.load_state_dict(replay)
        ckpt.restore_rng(rng)
        ckpt.restore_python_rng(state["python_rng"])
        self.step = self.started_from = step

    def extra_params(self) -> list[torch.nn.Parameter]:
        """Parameters a subclass trains beside the LoRA (the Helios route's patch layers)."""
        return []

    def export_extra(self) -> dict[str, torch.Tensor]:
        """Tensors a subclass exports beside the LoRA pairs (full deltas, diffusers names)."""
        return {}

    def _write_extra(self, stage: Path) -> None:
        """More state a subclass keeps in each checkpoint (the self-forcing critic)."""

    def _read_extra(self, folder: Path) -> None:
        """Read back what :meth:`_write_extra` wrote."""

    def lora_state(self) -> dict[str, torch.Tensor]:
        return lora_state(self.accelerator.unwrap_model(self.net))

    def export(self, layouts=None) -> list[Path]:
        cfg = self.cfg
        state = self.lora_state()
        stem = "lora" if cfg.expert is None else f"lora_{cfg.expert}"
        info = {"step": self.step, "model": cfg.model, "targets": cfg.targets, "expert": cfg.expert,
                "error_recycling": cfg.error_recycling, "route": cfg.route}
        paths = []
        for layout in layouts or cfg.export:
            path = self.out_dir / f"{stem}_{layout}.safetensors"
            paths.append(export_lora(state, path, layout, rank=cfg.rank, alpha=cfg.alpha, info=info,
                                     route=cfg.route, extra=self.export_extra()))
        return paths

    # -- the run ----------------------------------------------------------------------------------
    def run(self, max_steps: int | None = None) -> dict:
        """Train to ``cfg.steps`` (or ``max_steps`` more steps first), checkpointing and logging."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        target = cfg.steps if max_steps is None else min(cfg.steps, self.step + max_steps)
        log = _CsvLog(self.out_dir / "train.csv", self.step) if acc.is_main_process else None
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            ckpt.write_json(self.out_dir / "config.json", cfg.to_dict())
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train-svi", unit="step",
                   disable=not (self.progress and acc.is_main_process), dynamic_ncols=True,
                   mininterval=0.1 if sys.stderr.isatty() else 10.0)  # a log file gets a line every 10 s
        ema = None
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        started = time.perf_counter()
        last_saved = self.step
        try:
            while self.step < target:
                t0 = time.perf_counter()
                info = self.train_step()
                ema = info.loss if ema is None else 0.98 * ema + 0.02 * info.loss
                if log is not None and (self.step % cfg.log_every == 0 or self.step == target):
                    log.write(info, len(self.recycler.clean_memory), len(self.recycler.noise_memory),
                              time.perf_counter() - t0)
                bar.update()
                bar.set_postfix(loss=f"{ema:.4f}", replay=len(self.recycler.clean_memory), refresh=False)
                if self.step % cfg.checkpoint_every == 0 or self.step == target:
                    self.save_checkpoint()
                    last_saved = self.step
        except KeyboardInterrupt:
            if self.step > last_saved:
                self.save_checkpoint()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
            bar.close()
        exported = []
        if self.step >= cfg.steps and acc.is_main_process:
            exported = self.export()
        acc.wait_for_everyone()
        return {"step": self.step, "loss_ema": ema, "seconds": time.perf_counter() - started,
                "main_process": acc.is_main_process,
                "exported": [str(p) for p in exported],
                "checkpoint": str(ckpt.checkpoint_dir(self.out_dir, self.step))}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


class _CsvLog:
    """``train.csv``: one row per logged step; rows past ``step`` (a crash after the last
    checkpoint) are dropped so a resumed run's log has each step once."""

    def __init__(self, path: Path, step: int = 0):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if path.is_file() and step > 0:
            with path.open(newline="") as f:
                rows = [r for r in list(csv.reader(f))[1:] if r and r[0].isdigit() and int(r[0]) <= step]
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(rows)

    def write(self, info: StepInfo, replay_clean: int, replay_noise: int, seconds: float) -> None:
        row = [
            info.step, f"{info.loss:.6g}", f"{info.lr:.3g}", f"{info.grad_norm:.4g}",
            "|".join(f"{t:.1f}" for t in info.timesteps), "|".join(f"{w:.3f}" for w in info.weights),
            "|".join(info.modes), "|".join(info.injections), replay_clean, replay_noise, f"{seconds:.3f}",
            "" if info.critic_loss is None else f"{info.critic_loss:.6g}",
        ]
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow(row)


def train(cfg: TrainConfig, *, resume: bool = False, max_steps: int | None = None, progress: bool = True) -> dict:
    """``cliploom train-svi``: train (or continue) the SVI LoRA described by ``cfg``."""
    if cfg.route == "causal":
        from .causal import CausalTrainer

        trainer = CausalTrainer(cfg, resume=resume, progress=progress)
    elif cfg.route == "helios":
        from .helios import HeliosTrainer

        trainer = HeliosTrainer(cfg, resume=resume, progress=progress)
    elif cfg.route == "self-forcing":
        from .self_forcing import SelfForcingTrainer

        trainer = SelfForcingTrainer(cfg, resume=resume, progress=progress)
    else:
        trainer = SVITrainer(cfg, resume=resume, progress=progress)
    return trainer.run(max_steps)


