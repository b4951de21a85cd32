"""Flow-matching sampling: schedules, the Euler step, CFG and expert switching.

Small functions of tensors in the k-diffusion manner. Wan's flow matching uses
``x_sigma = (1 - sigma) * x0 + sigma * noise``; the model predicts the velocity
``v = noise - x0`` at timestep ``t = 1000 * sigma``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from .conditioning import ClipCondition

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's time shift: ``shift * s / (1 + (shift - 1) * s)`` (more steps at high noise)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def schedule(steps: int | None = None, shift: float = 5.0, timesteps: Sequence[float] | None = None) -> torch.Tensor:
    """Sigmas from 1 to 0, ``len = steps + 1``.

    ``steps``: the same schedule as diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift)``.
    ``timesteps``: an explicit list (distilled few-step models, e.g. ``[1000, 750, 500, 250]``),
    given *before* the shift as LightX2V writes it; with ``shift=5`` that list becomes
    ``[1000, 937.5, 833.3, 625]``. Pass ``shift=1`` for a list that is already shifted.
    """
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
    if timesteps is not None:
        scheduler.set_timesteps(sigmas=[float(t) / NUM_TRAIN_TIMESTEPS for t in timesteps])
    else:
        scheduler.set_timesteps(steps)
    return scheduler.sigmas.to(torch.float32)


def frame_schedule(sigmas: torch.Tensor, frames: int, ar_step: int, ready: int = 0) -> torch.Tensor:
    """Diffusion forcing's asynchronous schedule (SkyReels-V2 ``ar_step``): sigmas per step *and*
    latent frame, ``[rows + 1, frames]``. Each frame runs the whole schedule ``sigmas``, starting
    ``ar_step`` steps after the frame before it, so earlier frames are always less noisy than later
    ones; ``ar_step`` 0 is ``sigmas`` on every frame. The first ``ready`` frames (a clean prefix) sit
    at 0. diffusers' ``SkyReelsV2DiffusionForcingPipeline.generate_timestep_matrix`` decides which
    step each frame takes on each row; a frame that does not move on a row keeps its sigma (its
    Euler step is zero)."""
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    n = len(sigmas) - 1
    template = sigmas[:-1] * NUM_TRAIN_TIMESTEPS
    _, index, moves, _ = SkyReelsV2DiffusionForcingPipeline.generate_timestep_matrix(
        None, frames, template, frames, ar_step, ready, 1)  # it reads no pipeline state
    rows = [torch.where(torch.arange(frames) < ready, torch.zeros(frames), sigmas[0].expand(frames))]
    for step, move in zip(index, moves):  # row r: a moving frame at step k goes sigmas[k - 1] -> sigmas[k]
        rows.append(torch.where(move, sigmas[step.clamp(max=n)], rows[-1]))
    return torch.stack(rows).to(torch.float32)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step; ``sigma`` may be one per latent frame (``[T]``, :func:`frame_schedule`)."""
    if isinstance(sigma, torch.Tensor) and sigma.ndim:
        return x + (sigma_next - sigma).to(x).view(1, 1, -1, 1, 1) * v
    return x + (sigma_next - sigma) * v


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance."""
    return uncond + scale * (cond - uncond)


def contrast(denoise: Callable[[torch.Tensor, float], torch.Tensor], without: Callable[[torch.Tensor, float], torch.Tensor],
             scale: float) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """Guidance between two conditions of the same clip (keyframe guidance: with its keyframes and
    without): ``without + scale * (denoise - without)``; ``scale`` 1 is ``denoise`` itself."""

    def guided(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return guide(denoise(x, sigma), without(x, sigma), scale)

    return guided


@dataclass
class Expert:
    """One denoiser of a (possibly two-expert) model and where it works.

    It handles timesteps ``t >= min_timestep`` (Wan 2.2 A14B: the high-noise expert from the
    boundary up, the low-noise expert below it), with its own guidance scale.
    """

    model: torch.nn.Module
    guidance: float
    min_timestep: float = 0.0


def pick_expert(experts: Sequence[Expert], t: float) -> Expert:
    """The first expert (ordered high noise first) whose range contains ``t``."""
    for expert in experts:
        if t >= expert.min_timestep:
            return expert
    return experts[-1]


def compute_dtype(model) -> torch.dtype:
    """The dtype a transformer computes in: cliploom's cast marker, else diffusers' ``model.dtype``
    (which skips the tables diffusers keeps in float32), else the first parameter's (plain modules)."""
    marked = getattr(model, "_cliploom_compute_dtype", None)
    if marked is not None:
        return marked
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next(model.parameters()).dtype


def make_denoiser(
    experts: Sequence[Expert],
    cond: ClipCondition,
    text: torch.Tensor,
    negative_text: torch.Tensor | None,
    attention_kwargs: dict | None = None,
    cfg_split=None,
) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """``v = denoiser(x, sigma)`` for one clip.

    With guidance > 1 the conditional and unconditional passes go through the model as one
    batch of two; with guidance = 1 there is a single forward per step. With ``cfg_split``
    (cliploom.parallel, two ranks) each rank runs one of the two passes and gathers the other.
    """
    guided_cond = cond.repeat(2)

    def forward(model, c: ClipCondition, x_in: torch.Tensor, hidden: torch.Tensor, t: float) -> torch.Tensor:
        dtype = compute_dtype(model)
        return model(
            hidden_states=c.model_input(x_in).to(dtype),
            timestep=c.timestep(t, x_in),
            encoder_hidden_states=hidden.to(dtype),
            encoder_hidden_states_image=None if c.image_embeds is None else c.image_embeds.to(dtype),
            attention_kwargs=attention_kwargs,
            return_dict=False,
        )[0].float()

    def denoise(x: torch.Tensor, sigma) -> torch.Tensor:
        t = sigma * NUM_TRAIN_TIMESTEPS  # per latent frame on an ar_step schedule: the noisiest picks the expert
        expert = pick_expert(experts, float(t.max()) if isinstance(t, torch.Tensor) else t)
        use_cfg = expert.guidance != 1.0 and negative_text is not None
        if not use_cfg:
            return forward(expert.model, cond, x, text, t)
        if cfg_split is not None:
            v_cond, v_uncond = cfg_split.gather(forward(expert.model, cond, x, (text, negative_text)[cfg_split.rank], t))
        else:
            v_cond, v_uncond = forward(expert.model, guided_cond, torch.cat([x, x]), torch.cat([text, negative_text]), t).chunk(2)
        return guide(v_cond, v_uncond, expert.guidance)

    return denoise


def sample_euler(
    denoise: Callable[[torch.Tensor, float], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    finish: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    callback: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Integrate the flow from ``sigmas[0]`` to ``sigmas[-1]`` with Euler steps.

    ``finish`` re-imposes what is known after each step (TI2V's clean leading frames). ``sigmas``
    may hold a row per step with one sigma per latent frame (:func:`frame_schedule`).
    """
    s = sigmas.tolist() if sigmas.ndim == 1 else list(sigmas)
    for i in range(len(s) - 1):
        v = denoise(x, s[i])
        x = finish(euler_step(x, v, s[i], s[i + 1]))
        if callback is not None:
            callback(i)
    return x


def sample_renoise(
    denoise: Callable[[torch.Tensor, float], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    finish: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    callback: Callable[[int], None] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The few-step sampler of DMD / consistency students (Self-Forcing, CausVid): at each sigma
    predict the clean latents ``x0 = x - sigma v``, then noise them afresh to the next sigma,
    ``x = (1 - sigma') x0 + sigma' eps``; the last step returns ``x0``. ``eps`` is drawn on the CPU
    from ``generator`` (the clip's, so a seed gives the same clip on every device)."""
    if sigmas.ndim != 1:
        raise ValueError("sample_renoise takes one sigma per step (no per-frame schedule)")
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        v = denoise(x, s[i])
        x0 = x - s[i] * v
        if s[i + 1] > 0:
            eps = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x)
            x0 = (1 - s[i + 1]) * x0 + s[i + 1] * eps
        x = finish(x0)
        if callback is not None:
            callback(i)
    return x


def sample_unipc(
    denoise: Callable[[torch.Tensor, float], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    finish: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    callback: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """UniPC (order 2, bh2, the last step first order): the multistep solver Wan's and SkyReels-V2's
    own pipelines sample with, diffusers' ``UniPCMultistepScheduler`` on the flow (``v`` predicts
    ``eps - x0``) driven through ``sigmas`` as given (already shifted: ``flow_shift`` 1). One model
    call per step, as Euler; the steps reuse the previous ones' predictions."""
    from diffusers import UniPCMultistepScheduler

    if sigmas.ndim != 1:
        raise ValueError("sample_unipc takes one sigma per step (no per-frame schedule)")
    if float(sigmas[-1]) != 0.0:
        raise ValueError("sample_unipc integrates to sigma 0")
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
                                        solver_order=2, solver_type="bh2", lower_order_final=True,
                                        final_sigmas_type="zero")
    scheduler.set_timesteps(sigmas=sigmas[:-1].double().cpu().numpy(), device=x.device)
    scheduler.set_begin_index(0)  # steps counted, not looked up by timestep (close sigmas may round alike)
    s = scheduler.sigmas.tolist()  # sigmas[0] = 1 moves by 1e-6 there (log 0 otherwise)
    for i, t in enumerate(scheduler.timesteps):
        v = denoise(x, s[i])
        x = finish(scheduler.step(v, t, x).prev_sample)
        if callback is not None:
            callback(i)
    return x


def sampler(name: str, generator: torch.Generator | None = None):
    """``sample(denoise, x, sigmas, finish, callback)`` for the story's ``sampler`` (``euler``,
    ``unipc`` or ``renoise``, cliploom.story.SAMPLERS); ``generator``
    draws renoise's fresh noise (the clip's own, after its starting noise)."""
    if name == "renoise":
        return lambda denoise, x, sigmas, finish=lambda x: x, callback=None: sample_renoise(
            denoise, x, sigmas, finish, callback, generator)
    return sample_unipc if name == "unipc" else sample_euler


def pyramid_stage_steps(steps: int, stages: int) -> list[int]:
    """The story's ``steps`` spread over ``stages`` pyramid stages, the earlier stages taking the
    remainder (Helios' ``pyramid_num_inference_steps_list``: 30 steps over 3 stages is its
    ``[10, 10, 10]``)."""
    if stages < 1 or steps < stages:
        raise ValueError(f"{steps} steps cannot fill {stages} pyramid stages")
    return [steps // stages + (1 if k < steps % stages else 0) for k in range(stages)]


def block_noise(shape, gamma: float, patch: tuple[int, int, int], generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise whose values within each ``patch[1] x patch[2]`` patch are correlated with
    covariance ``(1 + gamma) I - gamma`` (Pyramid Flow's renoising after an upsample; diffusers'
    ``HeliosPyramidPipeline.sample_block_noise``, drawn the same way). That matrix is singular at
    Helios' ``gamma = 1/3`` with 2 x 2 patches (eigenvalue ``1 - 3 gamma``): its float32 Cholesky
    fails on CPU, so the factor is computed in float64."""
    b, c, f, h, w = shape
    _, ph, pw = patch
    n = ph * pw
    cov = torch.eye(n, dtype=torch.float64) * (1 + gamma) - torch.ones(n, n, dtype=torch.float64) * gamma
    factor = torch.linalg.cholesky(cov + torch.eye(n, dtype=torch.float64) * 1e-8).float()
    z = torch.randn(b * c * f * (h // ph) * (w // pw), n, generator=generator)
    eps = (z @ factor.T).view(b, c, f, h // ph, w // pw, ph, pw)
    return eps.permute(0, 1, 2, 3, 5, 4, 6).reshape(b, c, f, h, w)


def sample_pyramid(
    denoise: Callable[[torch.Tensor, float], torch.Tensor],
    noise: torch.Tensor,
    scheduler,
    stage_steps: Sequence[int],
    patch: tuple[int, int, int],
    generator: torch.Generator | None = None,
    callback: Callable[[int], None] | None = None,
    zero: Callable[[int, int, float], bool] | None = None,
    amplify: bool = False,
) -> torch.Tensor:
    """Helios' pyramid sampling of one chunk, as diffusers' ``HeliosPyramidPipeline`` runs it: the
    full-resolution ``noise`` halved (bilinear, x2) once per stage after the first; each stage then
    denoised on its own window of timesteps by ``scheduler`` (``HeliosScheduler``: Euler or UniPC;
    ``HeliosDMDScheduler``: a distilled student's x0-and-renoise steps toward the stage's start
    point), and before each later stage the latents doubled (nearest) and renoised with noise
    correlated within each patch (Pyramid Flow's correction of block artefacts). The model is called
    at the integer timestep (``denoise(x, t / 1000)``), as the pipeline calls it; the latents stay
    float32 throughout (the pipeline rounds them to the transformer's dtype after each step). ``zero(stage, step,
    t)``: whether that step's velocity is zero instead (CFG-Zero*'s zero-init; the model is not called).
    ``generator`` draws the renoising noise (the clip's own, after its starting noise). ``amplify``:
    the distilled pipeline's ``is_amplify_first_chunk``, twice the DMD steps in each stage."""
    import torch.nn.functional as F
    from diffusers import HeliosDMDScheduler
    from diffusers.pipelines.helios.pipeline_helios_pyramid import calculate_shift

    def resize(x: torch.Tensor, scale: float, mode: str) -> torch.Tensor:
        b, c, f, h, w = x.shape
        flat = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        flat = F.interpolate(flat, size=(int(h * scale), int(w * scale)), mode=mode)
        return flat.reshape(b, f, c, flat.shape[-2], flat.shape[-1]).permute(0, 2, 1, 3, 4)

    dmd = isinstance(scheduler, HeliosDMDScheduler)
    config = scheduler.config
    x = noise.float()
    for _ in range(len(stage_steps) - 1):
        x = resize(x, 0.5, "bilinear") * 2
    starts = [x]
    done = 0
    for stage, n in enumerate(stage_steps):
        tokens = x.shape[-1] * x.shape[-2] * x.shape[-3] // (patch[0] * patch[1] * patch[2])
        mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        scheduler.set_timesteps(n, stage, device=x.device, mu=mu, is_amplify_first_chunk=amplify)
        if stage > 0:
            x = resize(x, 2, "nearest")
            signal = 1 - scheduler.ori_start_sigmas[stage]
            gamma = config.gamma
            alpha = 1 / (math.sqrt(1 + 1 / gamma) * (1 - signal) + signal)
            beta = alpha * (1 - signal) / math.sqrt(gamma)
            x = alpha * x + beta * block_noise(x.shape, gamma, patch, generator).to(x)
            starts.append(x)
        timesteps = scheduler.timesteps
        for i, t in enumerate(timesteps):
            if zero is not None and zero(stage, i, float(t)):
                v = torch.zeros_like(x)
            else:
                v = denoise(x, float(int(t)) / NUM_TRAIN_TIMESTEPS)
            extra = dict(cur_sampling_step=i, dmd_noisy_tensor=starts[stage], dmd_sigmas=scheduler.sigmas,
                         dmd_timesteps=scheduler.timesteps, all_timesteps=timesteps) if dmd else {}
            x = scheduler.step(v, t, x, generator=generator, return_dict=False, **extra)[0].float()
            if callback is not None:
                callback(done)
            done += 1
    return x
