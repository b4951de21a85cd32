"""The Helios route's trainer (``route: helios``): the flow-matching loss of a clip's new latents
given its multi-term history, with **history corruption** (Helios' answer to exposure bias: the
model learns to continue from a past that is not quite right, as its own past will not be).

A sample is a ShapesWorld sequence on the ``pro`` timeline, encoded as the route decodes it (as
:func:`cliploom.train.causal.stream_sample`): clip 0 is its ``F`` frames (``T`` latents, latent 0
the anchor); clip ``k`` adds the new latents of ``[anchor frame, the 4K frames before, the new
frames]``. One step, top-down (:meth:`HeliosTrainer.make_samples`, :func:`helios_sample`, then
:meth:`HeliosTrainer.micro_step`):

1. the target is one clip's new latents (clip ``k``, drawn once per micro-step in
   ``0 .. clips_per_sample - 1``, so the batch shares its shapes); its history is the anchor and the
   latents before the clip, cut as the route cuts them (:func:`cliploom.routes.helios.make_history`);
2. with chance ``history_corruption_prob`` the history is corrupted by one of: noise on its latents
   (a flow-matching noise level up to ``history_noise_max``), a Gaussian blur of its frames before
   encoding (sigma up to ``history_blur_max`` px) or an exposure change (a gain ``2^u``,
   ``|u| <= history_exposure_max``); the anchor and the target are never corrupted;
3. ``x_t = (1 - s) x0 + s noise``, target ``v = noise - x0``, loss ``w(t) mse``, on the Helios
   transformer with a LoRA (and, with ``train_history_patches``, its patch_short / patch_mid /
   patch_long in full: new layers the DiT never trained; exported as ``.diff`` / ``.diff_b`` deltas).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import conditioning as C
from ..errors import CliploomError
from ..models.components import frames_to_tensor
from ..models.helios import helios_of
from ..routes.helios import History, Sizes, make_history
from ..sampling import NUM_TRAIN_TIMESTEPS
from .loop import SVITrainer

PATCHES = ("patch_short", "patch_mid", "patch_long")
PATCH_FILE = "helios_patches.safetensors"  # a checkpoint's patch layers: values (resume), deltas (export-lora)
KINDS = ("noise", "blur", "exposure")


@dataclass
class HeliosChoice:
    clip: int  # the target clip's index in its stream
    corruption: str | None = None
    amount: float = 0.0

    def describe(self) -> str:
        bad = f", history {self.corruption} {self.amount:.2f}" if self.corruption else ""
        return f"helios clip {self.clip}{bad}"


@dataclass
class HeliosSample:
    target: torch.Tensor  # [1, C, n, h, w]: the clip's new latents
    history: History
    prompt: str  # the clip's own prompt
    choice: HeliosChoice


def sizes_of(cfg) -> Sizes:
    """History sizes: the config's, else the route's defaults (``ROUTES["helios"]``)."""
    from ..routes import ROUTES

    opts = ROUTES["helios"]
    return Sizes(*(getattr(cfg, f"history_{k}") if getattr(cfg, f"history_{k}") is not None else opts[k].default
                   for k in ("short", "mid", "long")))


def corrupt_frames(frames: np.ndarray, kind: str, amount: float) -> np.ndarray:
    """uint8 frames ``[n, H, W, 3]`` blurred (Gaussian, sigma ``amount`` px) or exposed (gain
    ``2^amount``)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().permute(0, 3, 1, 2)  # [n, 3, H, W]
    if kind == "exposure":
        x = x * 2.0**amount
    elif kind == "blur" and amount > 0:
        r = max(1, int(np.ceil(3 * amount)))
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / amount) ** 2)
        k = (k / k.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
        x = torch.nn.functional.pad(x, (r, r, r, r), mode="replicate")
        x = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, k, groups=3), k.transpose(2, 3), groups=3)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def draw_corruption(cfg, generator: torch.Generator) -> tuple[str | None, float]:
    """One corruption kind among those turned on (and its amount), with chance ``history_corruption_prob``."""
    if float(torch.rand((), generator=generator)) >= cfg.history_corruption_prob:
        return None, 0.0
    kinds = [k for k in KINDS if getattr(cfg, f"history_{k}_max") > 0]
    kind = kinds[int(torch.randint(len(kinds), (1,), generator=generator))]
    u = float(torch.rand((), generator=generator))
    top = getattr(cfg, f"history_{kind}_max")
    return kind, (2 * u - 1) * top if kind == "exposure" else u * top


@torch.no_grad()
def helios_sample(model, generator: torch.Generator, clip: int, frames: int, size: int, sizes: Sizes, cfg,
                  K: int = 1) -> HeliosSample:
    """Clip ``clip`` of a ShapesWorld sequence as a target, its history as the route gives it (corrupted
    per ``cfg``)."""
    from ..shapesworld import sample_sequence

    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    kind, amount = draw_corruption(cfg, generator) if clip > 0 else (None, 0.0)
    new = frames - 1 - C.TEMPORAL * K  # new pixel frames of every clip after the first
    seq = sample_sequence(seed, clip + 1, [frames] + [new] * clip, size=size)
    video = seq.frames()
    seen = video.copy()  # what the history is encoded from: frame 0 (the anchor) always clean
    if kind in ("blur", "exposure"):
        seen[1:] = corrupt_frames(video[1:], kind, amount)
    encode = lambda f: model.encode_video(frames_to_tensor(f).to(model.device))  # noqa: E731
    parts = []
    for k in range(clip + 1):
        source = video if k == clip else seen  # the target from the true frames
        if k == 0:
            parts.append(encode(source[:frames]))
        else:
            start = frames + new * (k - 1)
            window = np.concatenate([source[:1], source[start - C.TEMPORAL * K : start + new]])
            parts.append(encode(window)[:, :, 1 + K:])
    anchor, target = parts[0][:, :, :1], parts[-1][:, :, 1:] if clip == 0 else parts[-1]
    past = None
    if clip > 0:
        past = torch.cat([parts[0][:, :, 1:], *parts[1:-1]], dim=2)[:, :, -max(sizes.total, 1):]
        if kind == "noise":
            noise = torch.randn(past.shape, generator=generator).to(past)
            past = (1 - amount) * past + amount * noise
    return HeliosSample(target, make_history(anchor, past, sizes), seq.prompts[clip], HeliosChoice(clip, kind, amount))


class HeliosTrainer(SVITrainer):
    """The SVI trainer's LoRA, optimizer, checkpoints and exports, on the Helios transformer built
    from the model's DiT; samples and loss of the Helios route."""

    def _pick_expert(self):
        if self.model.transformer_2 is not None:
            raise CliploomError(f"route helios trains one transformer; {self.model.path} has two experts",
                                "use a single-transformer model (the built-in model, Wan 2.1)")
        if self.model.has_image_encoder or self.model.settings.expand_timesteps:
            raise CliploomError(f"route helios needs a Wan 2.1-style DiT without CLIP features; {self.model.path} "
                                "is not one", "train it on the built-in model")
        helios = helios_of(self.model).transformer
        self._patch_init = {n: getattr(helios, n).weight.detach().clone() for n in PATCHES}
        self._patch_init.update({f"{n}.bias": getattr(helios, n).bias.detach().clone() for n in PATCHES})
        return helios, (0.0, float("inf"))

    def extra_params(self) -> list[torch.nn.Parameter]:
        if not self.cfg.train_history_patches:
            return []
        out = []
        for name in PATCHES:
            for p in getattr(self.transformer, name).parameters():
                p.data = p.data.float()
                p.requires_grad_(True)
                out.append(p)
        return out

    # -- samples and loss -------------------------------------------------------------------------
    def make_samples(self, generator: torch.Generator) -> list[HeliosSample]:
        cfg = self.cfg
        clip = int(torch.randint(cfg.clips_per_sample, (1,), generator=generator))  # one per batch: one shape
        sizes = sizes_of(cfg)
        return [helios_sample(self.model, generator, clip, cfg.frames, cfg.width, sizes, cfg, cfg.motion_latents[0])
                for _ in range(cfg.batch_size)]

    def micro_step(self, samples: list[HeliosSample], generator: torch.Generator) -> dict:
        acc, device = self.accelerator, self.accelerator.device
        # 1. The targets (one clip index for the batch: one shape) and a noise level per sample.
        x0 = torch.cat([s.target for s in samples]).float().to(device)  # [B, C, n, h, w]
        B = x0.shape[0]
        pick = self.allowed[torch.randint(len(self.allowed), (B,), generator=generator)]
        sigmas, weights = self.train_sigmas[pick].to(device), self.train_weights[pick].to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        sig = sigmas.view(B, 1, 1, 1, 1)
        x_t = (1 - sig) * x0 + sig * noise
        v = noise - x0
        # 2. Their histories (corrupted or not when drawn), batched: the same slots for every sample.
        h0 = samples[0].history
        cat = lambda parts: None if parts[0] is None else torch.cat(parts).to(device)  # noqa: E731
        history = History(cat([s.history.short for s in samples]), cat([s.history.mid for s in samples]),
                          cat([s.history.long for s in samples]), h0.index_short, h0.index_mid, h0.index_long, h0.first)
        # 3. The Helios transformer on the noisy chunk, each its clip's own prompt; flow-matching loss.
        text = torch.cat([self.text(s.prompt) for s in samples])
        dtype = self.model.dtype
        with acc.autocast():
            out = self.net(hidden_states=x_t.to(dtype), timestep=sigmas * NUM_TRAIN_TIMESTEPS,
                           encoder_hidden_states=text.to(dtype), return_dict=False,
                           **history.inputs(x0.shape[2], dtype))[0]
        per_sample = ((out.float() - v) ** 2).flatten(1).mean(1)
        loss = (per_sample * weights).mean()
        acc.backward(loss)
        return dict(loss=float(loss.detach()), ts=(sigmas * NUM_TRAIN_TIMESTEPS).tolist(), weights=weights.tolist(),
                    injections=[], samples=samples, noise=noise, sigmas=sigmas, banked=0)

    # -- the patch layers: checkpointed and exported as deltas from their initial values ----------
    def patch_deltas(self) -> dict[str, torch.Tensor]:
        """``{patch_mid.diff: dW, patch_mid.diff_b: db, ...}`` against the layers built from the DiT."""
        if not self.cfg.train_history_patches:
            return {}
        tr = self.accelerator.unwrap_model(self.net)
        out = {}
        for n in PATCHES:
            layer = getattr(tr, n)
            for key, now, start in ((f"{n}.diff", layer.weight, self._patch_init[n]),
                                     (f"{n}.diff_b", layer.bias, self._patch_init[f"{n}.bias"])):
                out[key] = (now.detach().float() - start.float()).cpu().contiguous()
        return out

    def export_extra(self) -> dict[str, torch.Tensor]:
        return self.patch_deltas()

    def _write_extra(self, stage) -> None:
        from .checkpoint import _save

        if self.cfg.train_history_patches:  # the deltas (for export-lora) and the values (an exact resume)
            tr = self.accelerator.unwrap_model(self.net)
            values = {f"{n}.{k}": v.detach().float().cpu()
                      for n in PATCHES for k, v in getattr(tr, n).named_parameters()}
            _save({**self.patch_deltas(), **values}, stage / PATCH_FILE)

    def _read_extra(self, folder) -> None:
        from .checkpoint import _load

        if not self.cfg.train_history_patches:
            return
        if not (folder / PATCH_FILE).is_file():
            raise CliploomError(f"{folder} has no {PATCH_FILE} (the trained patch layers)",
                                "resume from a checkpoint of this route: helios run")
        saved = _load(folder / PATCH_FILE)
        tr = self.accelerator.unwrap_model(self.net)
        with torch.no_grad():
            for n in PATCHES:
                for k, v in getattr(tr, n).named_parameters():
                    v.copy_(saved[f"{n}.{k}"])
