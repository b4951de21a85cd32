"""Replay memory: timestep binning, per-bin capacity, nearest-L2 replacement, sampling, persistence."""

import pytest
import torch

from cliploom.sampling import schedule
from cliploom.train.replay import ReplayMemory


def grid(bins=50, shift=5.0):
    return schedule(bins, shift)[:-1] * 1000


def vec(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_bins_are_the_shifted_inference_grid_and_timesteps_go_to_the_nearest():
    g = grid()
    mem = ReplayMemory(g, capacity=4, dtype=torch.float32)
    assert mem.num_bins == 50
    assert g[0] == pytest.approx(1000.0) and bool((g[:-1] > g[1:]).all())  # high noise first, shifted
    assert [mem.bin_of(float(t)) for t in g] == list(range(50))
    # between two grid points: the nearer one wins
    a, b = float(g[10]), float(g[11])
    assert mem.bin_of(a - 0.3 * (a - b)) == 10
    assert mem.bin_of(a - 0.7 * (a - b)) == 11
    # outside the grid: the end bins
    assert mem.bin_of(5000.0) == 0 and mem.bin_of(-3.0) == 49


def test_capacity_is_per_bin():
    g = vec(900.0, 500.0, 100.0)
    mem = ReplayMemory(g, capacity=3, replace="random", dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    for i in range(7):
        mem.add(vec(float(i), 0.0), 880.0, gen)
    mem.add(vec(1.0, 1.0), 120.0, gen)
    assert mem.counts == [3, 0, 1] and len(mem) == 4
    assert mem.entries(0).shape == (3, 2)


def test_a_full_bin_replaces_its_nearest_resident():
    mem = ReplayMemory(vec(500.0), capacity=3, replace="nearest", dtype=torch.float32)
    for e in (vec(0.0, 0.0), vec(10.0, 0.0), vec(0.0, 10.0)):
        mem.add(e, 500.0)
    where = mem.add(vec(9.0, 1.0), 500.0)  # nearest to (10, 0)
    assert where == (0, 1)
    assert mem.entries(0).tolist() == [[0.0, 0.0], [9.0, 1.0], [0.0, 10.0]]
    assert mem.distances(0, vec(0.0, 0.0)).tolist() == pytest.approx([0.0, 82 ** 0.5, 10.0])
    mem.add(vec(1.0, 9.0), 500.0)  # now nearest to (0, 10)
    assert mem.entries(0).tolist() == [[0.0, 0.0], [9.0, 1.0], [1.0, 9.0]]
    assert mem.counts == [3]


def test_random_replacement_is_reproducible_and_keeps_the_capacity():
    def fill(seed):
        mem = ReplayMemory(vec(500.0), capacity=4, replace="random", dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed)
        for i in range(20):
            mem.add(vec(float(i)), 500.0, gen)
        return mem.entries(0).flatten().tolist()

    assert fill(1) == fill(1)
    assert len(fill(1)) == 4 and fill(1) != [0.0, 1.0, 2.0, 3.0]


def test_sampling_comes_from_the_timestep_bin_or_from_all_bins():
    g = vec(900.0, 500.0, 100.0)
    mem = ReplayMemory(g, capacity=10, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    for i in range(3):
        mem.add(vec(float(i)), 910.0)
    mem.add(vec(100.0), 95.0)
    assert mem.sample(500.0, gen) is None and not mem.has(500.0)
    assert mem.has(500.0, all_bins=True)
    seen = {float(mem.sample(880.0, gen)) for _ in range(200)}
    assert seen == {0.0, 1.0, 2.0}
    draws = [float(mem.sample(500.0, gen, all_bins=True)) for _ in range(2000)]
    assert set(draws) == {0.0, 1.0, 2.0, 100.0}
    assert 0.18 < draws.count(100.0) / len(draws) < 0.32  # uniform over the 4 errors, not over bins
    empty = ReplayMemory(g, capacity=2)
    assert empty.sample(500.0, gen, all_bins=True) is None


def test_storage_dtype_and_shape_checks():
    mem = ReplayMemory(vec(500.0), capacity=2, dtype="bfloat16")
    mem.add(torch.full((2, 3), 1.0 / 3.0), 500.0)
    assert mem.entries(0).dtype == torch.bfloat16
    out = mem.sample(500.0)
    assert out.dtype == torch.float32 and out[0, 0] == pytest.approx(1.0 / 3.0, abs=2e-3)
    with pytest.raises(ValueError, match="shape"):
        mem.add(torch.zeros(3, 2), 500.0)


def test_state_dict_round_trip():
    g = grid(10)
    mem = ReplayMemory(g, capacity=5, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    for _ in range(12):
        mem.add(torch.randn(2, 3, generator=gen), float(torch.rand((), generator=gen)) * 1000)
    state = mem.state_dict("clean.")
    assert all(k.startswith("clean.") for k in state)
    again = ReplayMemory(g, capacity=5, dtype=torch.float32)
    again.load_state_dict(state, "clean.")
    assert again.counts == mem.counts
    for b in range(10):
        assert torch.equal(again.entries(b), mem.entries(b))
    again.add(torch.zeros(2, 3), 500.0)  # still usable after loading
    with pytest.raises(ValueError, match="grid"):
        ReplayMemory(grid(20), capacity=5).load_state_dict(state, "clean.")
