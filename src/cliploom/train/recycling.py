"""Error recycling (SVI section 4): bank the DiT's own errors, inject them into new inputs.

Flow matching here is Wan's: ``x_sigma = (1 - sigma) x0 + sigma noise`` and the model predicts
``v = noise - x0``. With a prediction ``v_hat`` at ``sigma``, one Euler step *without gradient*
integrates to either end of the trajectory, and the residual against the same step taken with the
true velocity ``v`` is the error the model would leave there:

* clean end (``sigma -> 0``):  ``x0_hat - x0 = -sigma (v_hat - v)``
* noise end (``sigma -> 1``):  ``x1_hat - x1 = (1 - sigma) (v_hat - v)``

Clean-end errors are what a finished clip carries into the next one, so they are injected into
the clean latents and into the motion latents of ``y``; noise-end errors are injected into the
noise. Each injection has its own probability; a *clean step* (probability ``p_clean``) injects
nothing and updates the memories only with probability ``clean_update_prob``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..conditioning import ClipCondition
from .config import TrainConfig
from .replay import ReplayMemory


def _per_sample(sigma, like: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    return sigma.reshape(-1, *([1] * (like.ndim - 1))) if sigma.ndim else sigma


def clean_end_error(v_hat: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """``x0_hat - x0`` after one Euler step from ``sigma`` to 0: ``-sigma (v_hat - v)``.

    ``sigma`` is a number or one value per sample (``[B]``)."""
    return -_per_sample(sigma, v) * (v_hat - v)


def noise_end_error(v_hat: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """``x1_hat - x1`` after one Euler step from ``sigma`` to 1: ``(1 - sigma) (v_hat - v)``."""
    return (1 - _per_sample(sigma, v)) * (v_hat - v)


@dataclass
class Injection:
    """What one sample receives this step."""

    clean: bool = False  # a clean step: nothing injected
    latent: bool = False  # clean-end error into the clean latents
    y: bool = False  # clean-end error into y's motion latents
    noise: bool = False  # noise-end error into the noise

    def flags(self) -> str:
        return "".join(c for c, on in zip("CLYN", (self.clean, self.latent, self.y, self.noise)) if on) or "-"


class ErrorRecycler:
    """Two replay memories (clean-end and noise-end errors) and the injection rules of a config."""

    def __init__(self, cfg: TrainConfig, grid: torch.Tensor):
        self.cfg = cfg
        make = lambda: ReplayMemory(grid, cfg.replay_capacity, cfg.replay_replace, cfg.replay_dtype)  # noqa: E731
        self.clean_memory = make()  # x0_hat - x0: injected into latents and y
        self.noise_memory = make()  # x1_hat - x1: injected into the noise

    # -- injection --------------------------------------------------------------------------------
    def draw(self, generator: torch.Generator) -> Injection:
        """Independent draws for each injection; a clean step overrides them all."""
        cfg = self.cfg
        if not cfg.error_recycling:
            return Injection()
        u = torch.rand(4, generator=generator).tolist()
        if u[3] < cfg.p_clean:
            return Injection(clean=True)
        return Injection(latent=u[0] < cfg.p_latent_error, y=u[1] < cfg.p_y_error, noise=u[2] < cfg.p_noise_error)

    def _modulate(self, error: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        m = self.cfg.error_modulate
        if m > 0:
            error = error * (1 - m + 2 * m * float(torch.rand((), generator=generator)))
        return error

    def latent_error(self, timestep: float, generator: torch.Generator) -> torch.Tensor | None:
        e = self.clean_memory.sample(timestep, generator)
        return None if e is None else self._modulate(e, generator)

    def noise_error(self, timestep: float, generator: torch.Generator) -> torch.Tensor | None:
        e = self.noise_memory.sample(timestep, generator)
        return None if e is None else self._modulate(e, generator)

    def y_error(self, timestep: float, generator: torch.Generator) -> torch.Tensor | None:
        e = self.clean_memory.sample(timestep, generator, all_bins=self.cfg.y_error_from_all_bins)
        return None if e is None else self._modulate(e, generator)

    def inject_y(
        self, cond: ClipCondition, error: torch.Tensor, start: int, generator: torch.Generator
    ) -> tuple[int, int]:
        """Add ``y_error_frames`` latent frames of ``error`` (``[C, T, h, w]``, taken from a random
        start) to the conditioning latents from frame ``start`` on. Returns ``(src, dst)`` starts."""
        # the motion latents: in y (SVI on a y-channel model), or clean frames of x (TI2V, diffusion forcing)
        target = cond.clean if cond.known is not None else cond.y[:, 4:]
        T = target.shape[2]
        n = min(self.cfg.y_error_frames, T - start, error.shape[1])
        if n <= 0:
            return -1, -1
        src = int(torch.randint(error.shape[1] - n + 1, (1,), generator=generator))
        target[:, :, start : start + n] += error[None, :, src : src + n].to(target)
        return src, start

    # -- banking ----------------------------------------------------------------------------------
    @torch.no_grad()
    def bank(
        self,
        v_hat: torch.Tensor,
        v: torch.Tensor,
        sigmas: torch.Tensor,
        clean_steps: list[bool],
        generator: torch.Generator,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> int:
        """File this step's one-step errors (``[B, C, T, h, w]``) under their timesteps.

        A sample of a clean step is banked only with probability ``clean_update_prob``.
        ``gather`` (multi-GPU warm-up) collects every process's errors so each memory banks
        them all. Returns the number of errors banked per memory.
        """
        if not self.cfg.error_recycling:
            return 0
        v_hat, v = v_hat.detach().float(), v.detach().float()
        e_clean = clean_end_error(v_hat, v, sigmas)
        e_noise = noise_end_error(v_hat, v, sigmas)
        keep = torch.tensor(
            [not c or float(torch.rand((), generator=generator)) < self.cfg.clean_update_prob for c in clean_steps]
        )
        t = sigmas.detach().float().cpu() * 1000
        if gather is not None:
            e_clean, e_noise = gather(e_clean.contiguous()), gather(e_noise.contiguous())
            t = gather(t.to(v.device)).cpu()
            keep = gather(keep.to(v.device)).cpu()
        banked = 0
        for i in range(e_clean.shape[0]):
            if keep[i]:
                self.clean_memory.add(e_clean[i], float(t[i]), generator)
                self.noise_memory.add(e_noise[i], float(t[i]), generator)
                banked += 1
        return banked

    # -- persistence ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.clean_memory.state_dict("clean."), **self.noise_memory.state_dict("noise.")}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.clean_memory.load_state_dict(tensors, "clean.")
        self.noise_memory.load_state_dict(tensors, "noise.")
