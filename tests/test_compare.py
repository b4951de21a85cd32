"""The tolerance the suite compares computed clips with (tests/compare.py) passes rounding noise of
the size other CPUs produce and fails on real differences; thread counts stay inside it."""

import pytest
import torch
from compare import assert_same_clips

from cliploom.engine import Engine
from cliploom.models import load_model


def _clips(model, story):
    return list(Engine(model).generate(story, progress=False))


def _perturb(model, scale: float, seed: int = 0) -> None:
    """Multiply every weight by ``1 + k * scale`` with k a random integer in [-2, 2]."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in (model.transformer, model.transformer_2, model.vae):
            for p in part.parameters() if part is not None else ():
                p.mul_(1 + torch.randint(-2, 3, p.shape, generator=g).to(p.dtype) * scale)


def test_tolerance_is_neither_blind_nor_brittle(tiny_dirs, tiny_story):
    story = tiny_story(2, guidance=1.0)
    want = _clips(load_model(tiny_dirs["wan22"], device="cpu"), story)

    # Rounding: every weight off by up to 2 ulp of float32 (what another summation order costs).
    rounded = load_model(tiny_dirs["wan22"], device="cpu")
    _perturb(rounded, 2.0**-24)
    got = _clips(rounded, story)
    assert any(not torch.equal(a.latents, b.latents) for a, b in zip(got, want))  # it did perturb
    assert_same_clips(got, want)

    # A real difference: weights off by 0.1 % (a LoRA at a tiny weight, a lossy cast) must fail.
    wrong = load_model(tiny_dirs["wan22"], device="cpu")
    _perturb(wrong, 1e-3)
    with pytest.raises(AssertionError):
        assert_same_clips(_clips(wrong, story), want)


def test_thread_count_changes_clips_only_by_rounding(tiny_models, tiny_story):
    model = tiny_models("wan21")
    story = tiny_story(2, guidance=3.0)  # CFG: batch 2 through every layer
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _clips(model, story)
        torch.set_num_threads(2)
        two = _clips(model, story)
    finally:
        torch.set_num_threads(before)
    assert_same_clips(two, one)
