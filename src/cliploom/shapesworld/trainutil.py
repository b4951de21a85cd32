"""Small pieces shared by the ShapesWorld training scripts.

Config loading (a dataclass, optionally overridden by a YAML file), atomic resumable
checkpoints, a CSV log, and a per-stage wall-clock ledger. Scripts run as
``python -m cliploom.shapesworld.train_X [CONFIG.yaml]``; all settings live in the config.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml


def load_config(cls, argv: list[str] | None = None):
    """Build config ``cls`` from its defaults, overridden by the YAML file named in argv[0].

    Unknown keys are an error (so a typo cannot silently do nothing). Nested dataclass fields
    (lists of stages) are given as lists of mappings.
    """
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        raise SystemExit(f"usage: python -m {cls.__module__} [CONFIG.yaml]  (all settings live in the config)")
    overrides: dict[str, Any] = {}
    if argv:
        path = Path(argv[0])
        if not path.is_file():
            raise SystemExit(f"error: config file {path} not found; pass a YAML file or nothing for the defaults")
        overrides = yaml.safe_load(path.read_text()) or {}
    return from_dict(cls, overrides)


def from_dict(cls, values: dict):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SystemExit(f"error: unknown config keys {unknown} for {cls.__name__}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        inner = getattr(cls, "_item_types", {}).get(name)
        if inner is not None:
            value = [from_dict(inner, v) if isinstance(v, dict) else v for v in value]
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` with torch.save atomically (a crash never leaves a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


class CsvLog:
    """Append rows to a CSV file, writing the header once."""

    def __init__(self, path: Path, columns: list[str]):
        self.path = path
        self.columns = columns
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.stat().st_size == 0:
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(columns)

    def write(self, **row) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c, "")) for c in self.columns])


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


class StageClock:
    """Accumulates training wall time per stage across restarts (saved in the checkpoint)."""

    def __init__(self, seconds: dict[str, float] | None = None):
        self.seconds = dict(seconds or {})
        self._stage: str | None = None
        self._t0 = 0.0

    def enter(self, stage: str) -> None:
        self.stop()
        self._stage, self._t0 = stage, time.monotonic()

    def stop(self) -> None:
        if self._stage is not None:
            self.seconds[self._stage] = self.seconds.get(self._stage, 0.0) + time.monotonic() - self._t0
            self._t0 = time.monotonic()

    def snapshot(self) -> dict[str, float]:
        self.stop()
        return dict(self.seconds)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def cosine_lr(base: float, step: int, total: int, warmup: int, floor: float = 0.1, time_progress: float = 0.0) -> float:
    """Linear warm-up to ``base`` then cosine decay to ``floor * base`` at ``total``.

    ``time_progress`` (the share of a time budget spent, see :func:`time_progress`) moves the
    decay on when time runs out before the steps do, so a run cut by its budget still ends at the
    low learning rate instead of mid-schedule.
    """
    import math

    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_progress))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def time_progress(seconds: float, max_minutes: float) -> float:
    """The share of a ``max_minutes`` budget that ``seconds`` spent (0 when there is no budget)."""
    return 0.0 if max_minutes <= 0 else seconds / (60.0 * max_minutes)


def pick_device(name: str) -> torch.device:
    """``"auto"``: the GPU when there is one, else the CPU; otherwise the named device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"error: device {name!r} asked for but torch sees no GPU; set device: cpu (or auto)")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def worker_pool(workers: int):
    """A process pool for CPU-side data rendering (``None`` for ``workers <= 0``: render inline).

    Made with ``fork`` before the caller touches CUDA; the workers only run numpy.
    """
    if workers <= 0:
        return None
    import multiprocessing

    return multiprocessing.get_context("fork").Pool(workers)


class Prefetch:
    """``fn(item)`` for each of ``items`` in order, computed up to ``depth`` items ahead in
    ``pool``'s workers (inline when ``pool`` is None). Bounded, unlike ``Pool.imap``, which
    queues the whole iterable and would hold every finished batch in memory."""

    def __init__(self, pool, fn, items, depth: int = 4):
        self.pool, self.fn, self.items, self.depth = pool, fn, iter(items), depth
        self.pending: collections.deque = collections.deque()

    def __iter__(self):
        return self

    def __next__(self):
        if self.pool is None:
            return self.fn(next(self.items))
        while len(self.pending) < self.depth:
            item = next(self.items, _END)
            if item is _END:
                break
            self.pending.append(self.pool.apply_async(self.fn, (item,)))
        if not self.pending:
            raise StopIteration
        return self.pending.popleft().get()


_END = object()
