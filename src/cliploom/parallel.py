"""One video on several GPUs: sequence parallelism (diffusers' context parallelism, Ulysses) and
CFG parallelism, under ``torchrun``.

    torchrun --nproc_per_node 2 -m cliploom generate story.yaml --parallel ulysses=2
    torchrun --nproc_per_node 2 -m cliploom generate story.yaml --parallel cfg=2   # guidance > 1

* ``ulysses=N``: every transformer forward is split over N ranks along the token sequence;
  diffusers' ``enable_parallelism(ContextParallelConfig(ulysses_degree=N))`` does the all-to-alls
  around attention (``_cp_plan`` of ``WanTransformer3DModel``). The number of heads and the number
  of video tokens must divide by N.
* ``cfg=2``: with guidance > 1, rank 0 runs the conditional pass and rank 1 the unconditional one,
  and ``torch.distributed.all_gather`` brings both to both (steps with guidance 1 run whole on
  both ranks).

Every rank runs the same clip loop on the same inputs (the noise comes from the story's seeds, so
it is the same everywhere); rank 0 alone writes the video, the report and the run folder. On
CUDA the process group is NCCL, one GPU per rank (``LOCAL_RANK``); on the CPU it is gloo, which
runs the same code for tests (diffusers divides by ``torch.accelerator.device_count()``, 0 on a
CPU-only torch: :func:`enable` gives it 1 there). Ring attention (``ring_degree``) needs CUDA
kernels and is not offered. ``ulysses`` and ``cfg`` are not combined yet.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from unittest import mock

import torch

from .errors import CliploomError


@dataclass(frozen=True)
class Parallel:
    ulysses: int = 1
    cfg: int = 1

    @property
    def world(self) -> int:
        return self.ulysses * self.cfg


def parse(spec: str) -> Parallel:
    """``ulysses=2``, ``cfg=2`` -> :class:`Parallel` (a one-line error for anything else)."""
    values = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        key, _, value = part.partition("=")
        if key not in ("ulysses", "cfg") or not value.isdigit() or int(value) < 1:
            raise CliploomError(f"--parallel {spec!r}: {part!r} is not ulysses=N or cfg=2",
                                "use e.g. --parallel ulysses=2 or --parallel cfg=2 (ring attention needs CUDA kernels)")
        values[key] = int(value)
    p = Parallel(**values)
    if p.cfg not in (1, 2):
        raise CliploomError(f"--parallel cfg={p.cfg}: CFG has two passes", "use cfg=2")
    if p.cfg > 1 and p.ulysses > 1:
        raise CliploomError("--parallel: ulysses and cfg together are not supported yet", "use one of them")
    if p.world == 1:
        raise CliploomError(f"--parallel {spec!r} uses one process", "use e.g. ulysses=2")
    return p


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init(p: Parallel) -> torch.device:
    """Join ``torchrun``'s process group (NCCL on CUDA, gloo on the CPU); this rank's device."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != p.world:
        raise CliploomError(f"--parallel needs {p.world} processes, this run has {world}",
                            f"launch with torchrun --nproc_per_node {p.world} -m cliploom generate ...")
    cuda = torch.cuda.is_available()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def _cpu_device_count():
    """diffusers places rank r on device ``r % torch.accelerator.device_count()``: 0 on a CPU-only torch."""
    if torch.accelerator.is_available():
        return nullcontext()
    return mock.patch.object(torch.accelerator, "device_count", lambda: 1)


def enable(model, p: Parallel) -> None:
    """Make ``model``'s transformers run split over the ranks (call after loading, LoRAs and memory
    options are the engine's business as usual)."""
    from .models.acceleration import ATTENTION

    transformers = [t for t in (model.transformer, model.transformer_2) if t is not None]
    if p.ulysses > 1:
        from diffusers import ContextParallelConfig

        config = model.transformer.config
        if config.num_attention_heads % p.ulysses:
            raise CliploomError(f"ulysses={p.ulysses} does not divide the model's {config.num_attention_heads} heads",
                                "use a degree that divides the number of heads")
        backend = getattr(model, "_cliploom_attention", "sdpa")
        if ATTENTION.get(backend, "native") not in ("native", "flash", "_flash_3", "sage", "_native_cudnn"):
            raise CliploomError(f"attention backend {backend!r} does not support context parallelism", "use sdpa or flash")
        with _cpu_device_count():
            for t in transformers:
                t.enable_parallelism(config=ContextParallelConfig(ulysses_degree=p.ulysses))
    if p.cfg > 1:
        model._cliploom_cfg_split = CfgSplit()
    model._cliploom_parallel = p


class CfgSplit:
    """Rank 0 computes the conditional pass, rank 1 the unconditional one; both get both."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.rank = dist, dist.get_rank()

    def gather(self, mine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [torch.empty_like(mine) for _ in range(2)]
        self.dist.all_gather(parts, mine.contiguous())
        return parts[0], parts[1]


def check_tokens(model, story) -> None:
    """The video tokens of a clip must divide by the Ulysses degree (one line before anything runs)."""
    p = getattr(model, "_cliploom_parallel", None)
    if p is None or p.ulysses == 1:
        return
    T = (story.frames - 1) // model.scale_temporal + 1
    ph, pw = model.patch
    tokens = T * (story.height // model.scale_spatial // ph) * (story.width // model.scale_spatial // pw)
    if tokens % p.ulysses:
        raise CliploomError(f"a {story.frames}-frame {story.width}x{story.height} clip has {tokens} video tokens, "
                            f"which ulysses={p.ulysses} does not divide", "change the size or the frame count")
