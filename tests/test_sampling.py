"""Schedules, the Euler step, guidance and expert switching."""

import pytest
import torch

from cliploom.conditioning import latent_condition
from cliploom.sampling import (
    Expert,
    guide,
    make_denoiser,
    pick_expert,
    sample_euler,
    sample_renoise,
    sample_unipc,
    sampler,
    schedule,
    shift_sigmas,
)


def test_schedule_runs_from_one_to_zero():
    s = schedule(8, shift=5.0)
    assert len(s) == 9 and s[0] == pytest.approx(1.0) and s[-1] == 0
    assert torch.all(s[1:] < s[:-1])


def test_explicit_timesteps_are_shifted_like_lightx2v():
    s = schedule(timesteps=[1000, 750, 500, 250], shift=5.0)
    assert s.tolist() == pytest.approx([1.0, 0.9375, 0.8333333, 0.625, 0.0], abs=1e-6)
    # Wan 2.2 Lightning's list is already shifted: shift 1 keeps it as given
    s = schedule(timesteps=[1000, 937.5, 833.3, 625], shift=1.0)
    assert s.tolist() == pytest.approx([1.0, 0.9375, 0.8333, 0.625, 0.0], abs=1e-6)


def test_shift_moves_steps_towards_high_noise():
    s = torch.tensor([0.5])
    assert shift_sigmas(s, 5.0).item() == pytest.approx(2.5 / 3.0)
    assert shift_sigmas(s, 1.0).item() == 0.5


def test_euler_with_exact_velocity_lands_on_the_data():
    x0, noise = torch.randn(2, 3), torch.randn(2, 3)

    def oracle(x, sigma):  # x = (1 - s) x0 + s n  =>  v = n - x0 = (x - x0) / s
        return (x - x0) / sigma

    out = sample_euler(oracle, noise, schedule(5, shift=3.0))
    assert torch.allclose(out, x0, atol=1e-5)


def test_renoise_predicts_the_data_then_noises_it_afresh_to_each_next_level():
    """renoise: x0 = x - s v at each level, then (1 - s') x0 + s' eps with fresh eps from the clip's
    generator. An oracle that knows the data lands on it whatever the noise; with a denoiser that
    predicts x0 = 0 each step's input is s' eps (the generator's next draw; x - s (x / s) is zero
    only up to rounding, so compared within 1e-6)."""
    x0, noise = torch.randn(2, 3), torch.randn(2, 3)
    sigmas = schedule(4, shift=5.0)
    out = sample_renoise(lambda x, s: (x - x0) / s, noise, sigmas, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, x0, atol=1e-5)
    seen = []

    def zero(x, s):  # predicts x0 = 0: v = x / s
        seen.append(x.clone())
        return x / s

    g = torch.Generator().manual_seed(3)
    assert sample_renoise(zero, noise, sigmas, generator=g).abs().max() <= 1e-6
    again = torch.Generator().manual_seed(3)
    for k in range(1, 4):  # same generator, same draws
        assert torch.allclose(seen[k], sigmas[k].item() * torch.randn(2, 3, generator=again), atol=1e-6)
    # the euler name is the ODE sampler itself; renoise depends on its seed, euler on nothing more
    assert sampler("euler") is sample_euler and sampler(None) is sample_euler  # unset: the loops' Euler path
    a = sampler("renoise", torch.Generator().manual_seed(1))(lambda x, s: x, noise, sigmas)
    b = sampler("renoise", torch.Generator().manual_seed(1))(lambda x, s: x, noise, sigmas)
    c = sampler("renoise", torch.Generator().manual_seed(2))(lambda x, s: x, noise, sigmas)
    assert torch.equal(a, b) and not torch.allclose(a, c, atol=1e-3)  # same seed, same path: exact; another seed differs
    with pytest.raises(ValueError, match="one sigma per step"):
        sample_renoise(zero, noise, torch.ones(3, 2))


def test_unipc_integrates_the_flow_to_second_order():
    """For data x0 ~ N(mu, tau^2) the exact velocity is known and the flow ODE maps noise n to
    mu + tau n (it keeps (x - (1 - s) mu) / sqrt((1 - s)^2 tau^2 + s^2) fixed). Doubling Wan's
    shifted steps must cut UniPC's error by more than 3x (order 2; Euler's, order 1, by about 2x),
    with one model call per step at the sigmas given; an oracle that knows the data lands on it.
    (At 8 steps this toy ODE favours neither: which sampler suits a model is measured, not assumed.)"""
    mu = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    tau = torch.tensor([0.3, 1.5, 0.8], dtype=torch.float64)

    def exact(x, s):
        var = (1 - s) ** 2 * tau**2 + s**2
        centred = x - (1 - s) * mu
        return s / var * centred - (mu + (1 - s) * tau**2 / var * centred)  # E[n | x] - E[x0 | x]

    noise = torch.randn(4096, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = mu + tau * noise

    def error(sample, steps):
        return (sample(exact, noise, schedule(steps, shift=5.0).double()) - target).abs().mean().item()

    unipc, euler = [error(sample_unipc, n) for n in (64, 128)], [error(sample_euler, n) for n in (64, 128)]
    assert unipc[0] / unipc[1] > 3 and euler[0] / euler[1] < 2.5, (unipc, euler)
    assert unipc[1] < euler[1] / 4
    calls, sigmas = [], schedule(8, shift=5.0)
    sample_unipc(lambda x, s: calls.append(s) or exact(x, s), noise, sigmas.double())
    assert calls == pytest.approx(sigmas[:-1].tolist(), abs=1e-5)  # sigma 1 moves by 1e-6 (UniPC takes its log)
    x0 = torch.randn(2, 3)
    assert torch.allclose(sample_unipc(lambda x, s: (x - x0) / s, torch.randn(2, 3), sigmas), x0, atol=1e-4)
    assert sampler("unipc") is sample_unipc
    with pytest.raises(ValueError, match="one sigma per step"):
        sample_unipc(exact, noise, torch.ones(3, 2))


def test_guidance_formula():
    cond, uncond = torch.tensor([3.0]), torch.tensor([1.0])
    assert guide(cond, uncond, 1.0).item() == 3.0
    assert guide(cond, uncond, 5.0).item() == 11.0


class Recorder(torch.nn.Module):
    """Stands in for a transformer: records calls, returns zeros of the latent shape."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, hidden_states, timestep, encoder_hidden_states, **kw):
        self.calls.append((float(timestep.flatten()[0]), hidden_states.shape[0]))
        return (torch.zeros(hidden_states.shape[0], 2, *hidden_states.shape[2:]),)


def test_experts_switch_at_the_boundary():
    high, low = Recorder(), Recorder()
    experts = [Expert(high, 1.0, 875.0), Expert(low, 1.0)]
    assert pick_expert(experts, 900).model is high and pick_expert(experts, 875).model is high
    assert pick_expert(experts, 874.9).model is low
    cond = latent_condition(torch.zeros(1, 2, 1, 2, 2), None, 3)
    sigmas = schedule(10, shift=5.0)
    sample_euler(make_denoiser(experts, cond, torch.zeros(1, 4, 8), None), torch.randn(1, 2, 3, 2, 2), sigmas)
    ts = [t for t, _ in high.calls] + [t for t, _ in low.calls]
    assert len(ts) == 10 and high.calls and low.calls
    assert all(t >= 875 for t, _ in high.calls) and all(t < 875 for t, _ in low.calls)


@pytest.mark.parametrize("scale, batch", [(1.0, 1), (4.0, 2)])
def test_guidance_one_means_one_forward_of_batch_one(scale, batch):
    model = Recorder()
    cond = latent_condition(torch.zeros(1, 2, 1, 2, 2), None, 3)
    text, neg = torch.zeros(1, 4, 8), torch.ones(1, 4, 8)
    sample_euler(make_denoiser([Expert(model, scale)], cond, text, neg), torch.randn(1, 2, 3, 2, 2), schedule(4))
    assert len(model.calls) == 4 and all(b == batch for _, b in model.calls)
