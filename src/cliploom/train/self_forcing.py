"""The Self-Forcing stage (``route: self-forcing``): the causal student trained on its own rollouts
by distribution matching (DMD) against the bidirectional teacher.

Causal stage 1 (:mod:`cliploom.train.causal`) learns each latent frame from *true* earlier frames;
at inference it continues from its own. Self-Forcing closes that gap by training on what the
student itself makes. One optimizer step of the student, read top-down in :meth:`train_step`:

1. ``critic_ratio - 1`` times: roll the student out without gradient and fit the critic to what
   it made (flow matching: the critic is the "fake" score, the teacher is the "real" one);
2. roll the student out once more, the way the causal route generates (the anchor given, then
   each clip's new latent frames block by block under the KV cache, few Euler steps, no guidance),
   keeping the gradient of one denoising step per block: the exit step, drawn once per rollout
   (Self-Forcing's random exit; every earlier step and every cache write is without gradient);
3. cut the rollout into clips as the ``pro`` timeline decodes them (``[anchor, previous clip's last
   K latents, new]``), noise each to a random level, and ask the teacher (the built-in DiT with
   the SVI LoRA, so later clips are judged with their motion memory, with guidance) and the critic
   for the clean clip; the DMD gradient ``(critic - teacher) / |clip - teacher|`` on the new
   frames is the student's loss gradient; one critic step on the same rollout;
4. AdamW on the student's LoRA (the generator) and on the critic's own LoRA.

The student starts from the causal stage-1 LoRA (``init_lora``); the teacher and the critic are
the built-in model with ``teacher_lora`` fused; the critic carries its own LoRA (``critic_rank``),
saved with every checkpoint so that a resumed run continues with the critic it had.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import conditioning as C
from ..models.causal import causal_attention, set_offset
from ..models.components import frames_to_tensor
from ..sampling import NUM_TRAIN_TIMESTEPS, Expert, euler_step, make_denoiser, schedule
from .loop import StepInfo, SVITrainer

CRITIC_FILE = "critic.safetensors"


@dataclass
class RolloutChoice:
    clips: int
    exit_step: int

    def describe(self) -> str:
        return f"self-forcing rollout of {self.clips} clips, exit step {self.exit_step}"


@dataclass
class Rollout:
    anchor: torch.Tensor  # [1, C, 1, h, w]
    features: torch.Tensor | None  # the anchor's image features (CLIP models)
    prompts: list[str]  # one per clip
    new: list[torch.Tensor] = field(default_factory=list)  # per clip [1, C, n, h, w]: the student's new latents
    choice: RolloutChoice | None = None

    def chunks(self, K: int) -> list[tuple[torch.Tensor, torch.Tensor | None, int]]:
        """Each clip as ``pro`` decodes it: ``(latents [anchor, memory, new], memory, first new
        frame)``; the memory (the previous clip's last ``K`` latents) is detached: a clip is judged
        on its own new frames."""
        out, memory = [], None
        for new in self.new:
            parts = [self.anchor] + ([] if memory is None else [memory]) + [new]
            chunk = torch.cat(parts, dim=2)
            out.append((chunk, memory, chunk.shape[2] - new.shape[2]))
            memory = chunk[:, :, -K:].detach()
        return out


class SelfForcingTrainer(SVITrainer):
    """The SVI trainer's student LoRA, optimizer, checkpoints and exports; a frozen teacher, a
    critic with its own LoRA, and the rollout + DMD step."""

    def __init__(self, cfg, *, resume: bool = False, model=None, progress: bool = True):
        self._critic_ready = False
        super().__init__(cfg, resume=resume, model=model, progress=progress)
        from ..errors import CliploomError
        from .adapter import attach_lora

        svi = self.model.settings.svi_lora
        teacher_lora = cfg.teacher_lora or (self.model.path / svi if svi else None)
        if teacher_lora is None:
            raise CliploomError(f"the model at {self.model.path} has no SVI LoRA (svi_lora in its cliploom.json) "
                                "to be the teacher", "set teacher_lora in the config")
        self.teacher = self._scorer(teacher_lora)
        self.critic = self._scorer(teacher_lora)
        critic_cfg = dataclasses.replace(cfg, rank=cfg.critic_rank, alpha=cfg.critic_rank, init="kaiming")
        self.critic_params = attach_lora(self.critic.transformer, critic_cfg, seed=cfg.seed + 1)
        self.critic.transformer.train()
        self.critic_optimizer = torch.optim.AdamW(self.critic_params, lr=cfg.critic_lr or cfg.lr,
                                                  betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.student_sigmas = schedule(cfg.student_steps, cfg.shift)
        # DMD's noise levels: the training grid without its ends (2 %..98 % of the timesteps).
        t = self.train_sigmas * NUM_TRAIN_TIMESTEPS
        self.dmd_sigmas = self.train_sigmas[(t >= 20) & (t <= 980)]
        self._critic_ready = True
        if resume:
            self._resume()

    def _scorer(self, lora_path):
        """The built-in model with ``lora_path`` fused, frozen (the teacher, and the critic's base)."""
        from ..models.loading import load_model
        from ..models.lora import LoraStack
        from ..story import LoraSpec

        scorer = load_model(self.cfg.model, device=self.accelerator.device, dtype=self.model.dtype)
        LoraStack(scorer).apply([LoraSpec(lora_path, 1.0)], fuse=True)
        scorer.transformer.requires_grad_(False)
        scorer.transformer.eval()
        return scorer

    # -- checkpoints carry the critic ------------------------------------------------------------
    def _write_extra(self, stage) -> None:
        from safetensors.torch import save_file

        from .adapter import lora_state

        save_file(lora_state(self.critic.transformer), str(stage / CRITIC_FILE))

    def _read_extra(self, folder) -> None:
        from safetensors.torch import load_file

        from ..errors import CliploomError
        from .adapter import load_lora_state

        path = folder / CRITIC_FILE
        if not path.is_file():
            raise CliploomError(f"{folder} has no {CRITIC_FILE} (not a self-forcing checkpoint)",
                                "resume with the config it was trained with, or set another out_dir")
        load_lora_state(self.critic.transformer, load_file(str(path)), f"{path}")

    def _resume(self) -> None:
        if self._critic_ready:
            super()._resume()

    # -- 1-2. the student's rollout ---------------------------------------------------------------
    def draw_rollout(self, generator: torch.Generator) -> Rollout:
        """A ShapesWorld story: its reference frame (the anchor) and one prompt per clip."""
        from ..shapesworld import sample_sequence

        cfg = self.cfg
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        clips = cfg.clips_per_sample
        seq = sample_sequence(seed, clips, [cfg.frames] * clips, size=cfg.width)
        reference = seq.frames(0, 1)
        anchor = self.model.encode_video(frames_to_tensor(reference).to(self.accelerator.device))
        features = self.model.encode_image_features(reference[0])
        exit_step = int(torch.randint(cfg.student_steps, (1,), generator=generator))
        return Rollout(anchor, features, list(seq.prompts), choice=RolloutChoice(clips, exit_step))

    def roll_out(self, r: Rollout, generator: torch.Generator, grad: bool,
                 noises: list[torch.Tensor] | None = None) -> Rollout:
        """The student generates ``r``'s clips as the causal route does (block 1, its default;
        each clip's new frames from one noise tensor, ``noises[i]`` or drawn), with the gradient of
        the exit step of each block when ``grad``."""
        from ..routes import CAUSAL_OPTIONS
        from ..routes.causal import cache_frames, stream_y, write_block

        cfg, model, device = self.cfg, self.model, self.accelerator.device
        T, K = C.latent_frame_count(cfg.frames, model.scale_temporal), cfg.motion_latents[0]
        h, w = cfg.height // model.scale_spatial, cfg.width // model.scale_spatial
        sigmas, exit_step = self.student_sigmas.tolist(), r.choice.exit_step
        tr = self.transformer
        r.new = []
        sink, window = cache_frames(CAUSAL_OPTIONS["sink"].default, CAUSAL_OPTIONS["window"].default, T, K)
        with causal_attention(tr, sink=sink, window=window) as session:
            session.reset()
            write_block(model, session, r.anchor, stream_y(model, r.anchor, known=True), self.text(r.prompts[0]),
                   r.features, 0)
            position = 1
            try:
                for i, prompt in enumerate(r.prompts):
                    text = self.text(prompt)
                    made, n = [], T - 1 if i == 0 else T - 1 - K
                    clip_noise = (noises[i] if noises is not None
                                  else torch.randn((1, model.z_dim, n, h, w), generator=generator)).to(device)
                    for b in range(n):
                        noise = clip_noise[:, :, b : b + 1]
                        cond = C.ClipCondition(y=stream_y(model, noise, known=False), image_embeds=r.features,
                                               patch=model.patch)
                        denoise = make_denoiser([Expert(self.net, 1.0)], cond, text, None)
                        set_offset(tr, position)
                        x = noise
                        for k in range(exit_step + 1):
                            with torch.set_grad_enabled(grad and k == exit_step):
                                v = denoise(x, sigmas[k])
                            if k < exit_step:
                                x = euler_step(x, v, sigmas[k], sigmas[k + 1])
                        x0 = x - sigmas[exit_step] * v  # the block's clean latents at the exit step
                        write_block(model, session, x0.detach(), cond.y, text, r.features, position)
                        made.append(x0)
                        position += 1
                    r.new.append(torch.cat(made, dim=2))
            finally:
                set_offset(tr, 0)
        return r

    # -- 3. scores ----------------------------------------------------------------------------------
    def _clip_condition(self, r: Rollout, memory, T: int) -> C.ClipCondition:
        cond = C.latent_condition(r.anchor, memory, T, self.model.settings.expand_timesteps, self.model.patch)
        cond.image_embeds = r.features
        return cond

    def dmd_loss(self, r: Rollout, generator: torch.Generator) -> torch.Tensor:
        """The DMD loss of the rollout's clips (its gradient on the new frames is DMD's)."""
        cfg = self.cfg
        K = cfg.motion_latents[0]
        losses = []
        negative = self.text(self.model.settings.negative_prompt or "")
        for (chunk, memory, first), prompt in zip(r.chunks(K), r.prompts):
            T = chunk.shape[2]
            cond = self._clip_condition(r, memory, T)
            sigma = float(self.dmd_sigmas[torch.randint(len(self.dmd_sigmas), (1,), generator=generator)])
            noise = torch.randn(chunk.shape, generator=generator).to(chunk)
            x0 = chunk.detach().float()
            x_t = (1 - sigma) * x0 + sigma * noise
            text = self.text(prompt)
            with torch.no_grad():
                teacher = make_denoiser(self._teacher_experts(), cond, text, negative)
                critic = make_denoiser([Expert(self.critic.transformer, 1.0)], cond, text, None)
                real = x_t - sigma * teacher(x_t, sigma)
                fake = x_t - sigma * critic(x_t, sigma)
                scale = (x0 - real).abs().mean().clamp_min(1e-6)
                step = ((fake - real) / scale)[:, :, first:]
            new = chunk[:, :, first:].float()
            losses.append(0.5 * torch.nn.functional.mse_loss(new, (new - step).detach()))
        return torch.stack(losses).mean()

    def _teacher_experts(self) -> list[Expert]:
        cfg, s = self.cfg, self.model.settings
        high = cfg.teacher_guidance if cfg.teacher_guidance is not None else s.guidance
        low = cfg.teacher_guidance if cfg.teacher_guidance is not None else (s.guidance_low or high)
        boundary = getattr(s, "guidance_boundary", None)
        if boundary is None or low == high:
            return [Expert(self.teacher.transformer, high)]
        return [Expert(self.teacher.transformer, high, boundary * NUM_TRAIN_TIMESTEPS),
                Expert(self.teacher.transformer, low)]

    def critic_step(self, r: Rollout, generator: torch.Generator) -> float:
        """One flow-matching step of the critic on the rollout's clips (what the student makes)."""
        K = self.cfg.motion_latents[0]
        losses = []
        for (chunk, memory, _), prompt in zip(r.chunks(K), r.prompts):
            x0 = chunk.detach().float()
            cond = self._clip_condition(r, memory, x0.shape[2])
            sigma = float(self.train_sigmas[torch.randint(len(self.train_sigmas), (1,), generator=generator)])
            noise = torch.randn(x0.shape, generator=generator).to(x0)
            x_t = (1 - sigma) * x0 + sigma * noise
            v = make_denoiser([Expert(self.critic.transformer, 1.0)], cond, self.text(prompt), None)(x_t, sigma)
            losses.append(torch.nn.functional.mse_loss(v, noise - x0))
        loss = torch.stack(losses).mean()
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.critic_params, self.cfg.grad_clip)
        self.critic_optimizer.step()
        self.critic_optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    # -- 4. one step ---------------------------------------------------------------------------------
    def train_step(self) -> StepInfo:
        cfg = self.cfg
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        generator = self.generator(self.step)
        critic_losses = []
        for _ in range(cfg.critic_ratio - 1):
            with torch.no_grad():
                r = self.roll_out(self.draw_rollout(generator), generator, grad=False)
            critic_losses.append(self.critic_step(r, generator))
        r = self.roll_out(self.draw_rollout(generator), generator, grad=True)
        loss = self.dmd_loss(r, generator)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        critic_losses.append(self.critic_step(r, generator))
        self.step += 1
        info = StepInfo(self.step, float(loss.detach()), lr, float(norm))
        info.modes = [r.choice.describe()]
        info.critic_loss = float(np.mean(critic_losses))
        info.samples = [r]
        return info

