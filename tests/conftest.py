"""Shared fixtures: tiny random models (built once per session) and a reference image."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Threads: OMP_NUM_THREADS when it is set (the portability runs use 1 and 2; torch reads it),
# else at most 2, the CI machine's cores. No test may depend on the count (tests/test_compare.py).
if not os.environ.get("OMP_NUM_THREADS"):
    torch.set_num_threads(min(2, os.cpu_count() or 1))
THREADS = torch.get_num_threads()


def _digests(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session", autouse=True)
def _shipped_model_untouched():
    """No test may write into the shipped model folder (a test's symlinked copy of it once wrote a
    trained LoRA through a link onto the shipped weights)."""
    from cliploom.models.builtin import SHIPPED

    before = _digests(SHIPPED)
    yield
    after = _digests(SHIPPED)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"the test run changed the shipped model folder: {changed}"


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """Benchmarks' main() set their own thread count; later tests run with the suite's."""
    yield
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """One tiny model folder per variant: wan21 (CLIP), wan22 (two experts), ti2v."""
    from cliploom.models.tiny import VARIANTS, make_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {v: make_tiny(root / v, v) for v in VARIANTS}


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs):
    """Loaded tiny models, cached for the session (loading is the slow part)."""
    from cliploom.models import load_model

    cache: dict = {}

    def get(variant: str):
        if variant not in cache:
            cache[variant] = load_model(tiny_dirs[variant], device="cpu")
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def reference_png(tmp_path_factory) -> Path:
    """A 64x64 picture: a red disc on a blue background."""
    yy, xx = np.mgrid[0:64, 0:64]
    img = np.zeros((64, 64, 3), np.uint8)
    img[...] = (30, 40, 160)
    img[(yy - 30) ** 2 + (xx - 24) ** 2 < 100] = (220, 30, 30)
    path = tmp_path_factory.mktemp("ref") / "ref.png"
    Image.fromarray(img).save(path)
    return path


@pytest.fixture
def tiny_story(reference_png):
    """``tiny_story(n_clips, **overrides)``: a small story over the reference image."""
    from cliploom.story import ClipSpec, make_story

    def build(n: int = 3, **kw):
        values = dict(
            clips=[ClipSpec(f"prompt {i % 2}") for i in range(n)],
            reference=reference_png,
            frames=9,
            steps=2,
            seed=11,
        )
        values.update(kw)
        return make_story(**values)

    return build
