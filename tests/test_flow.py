
import pytest
import torch

from prx.config import ObjectiveConfig
from prx.flow import add_noise, flow_loss, sample_timesteps, shift_time, velocity


def test_loss_matches_hand_computation():
    x0 = torch.tensor([[[[0.5]]], [[[-1.0]]]])  # two 1-pixel "images"
    pred = torch.tensor([[[[0.25]]], [[[0.0]]]])
    noise = torch.tensor([[[[1.0]]], [[[2.0]]]])
    t = torch.tensor([0.5, 0.02])  # the second is below the 0.05 clamp
    x_t = add_noise(x0, noise, t)
    assert x_t[0].item() == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)
    # v̂ − v = (x0 − x̂0) / max(t, 0.05)
    expected = (((0.5 - 0.25) / 0.5) ** 2 + ((-1.0 - 0.0) / 0.05) ** 2) / 2
    assert flow_loss(pred, x0, x_t, t, 0.05).item() == pytest.approx(expected, rel=1e-5)
    assert flow_loss(x0, x0, x_t, t, 0.05).item() == 0.0


def test_velocity_is_noise_minus_data_above_clamp():
    x0, noise = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    t = torch.tensor([0.05, 0.3, 0.9])
    v = velocity(add_noise(x0, noise, t), x0, t, 0.05)
    assert torch.allclose(v, noise - x0, atol=1e-5)


def test_shift():
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(shift_time(t, 1.0), t)
    s = shift_time(t, 3.0)
    assert s[0] == 0 and s[-1] == 1 and bool((s >= t).all())
    assert s[5].item() == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))


def test_timestep_distribution():
    cfg = ObjectiveConfig(t_mean=0.0, t_std=1.0, shift=1.0, uniform_fraction=0.0)
    t = sample_timesteps(200_000, cfg, torch.Generator().manual_seed(0))
    assert t.min() >= cfg.t_min and t.max() < 1
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.0, abs=0.01) and logit.std().item() == pytest.approx(1.0, abs=0.01)
    # shift 3 moves the median from 0.5 to 0.75
    shifted = sample_timesteps(200_000, ObjectiveConfig(shift=3.0, uniform_fraction=0.0), torch.Generator().manual_seed(0))
    assert shifted.median().item() == pytest.approx(0.75, abs=0.01)
    # the uniform share: with uniform_fraction=1, t is uniform on [t_min, 1)
    uni = sample_timesteps(200_000, ObjectiveConfig(uniform_fraction=1.0), torch.Generator().manual_seed(0))
    assert uni.mean().item() == pytest.approx(0.5, abs=0.01)
    assert (uni < 0.1).float().mean().item() == pytest.approx(0.1, abs=0.01)


def test_timesteps_deterministic_under_generator():
    cfg = ObjectiveConfig()
    a = sample_timesteps(16, cfg, torch.Generator().manual_seed(3))
    b = sample_timesteps(16, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
