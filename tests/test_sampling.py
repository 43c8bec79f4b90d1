import torch

from prx.sampling import guided_predictor, initial_noise, sample, sampling_schedule
from prx.text import TextBatch


def test_schedule_endpoints_and_monotone():
    s = sampling_schedule(10, 3.0)
    assert s[0] == 1 and s[-1] == 0 and bool((s[1:] < s[:-1]).all())


def test_oracle_predictor_lands_on_its_target():
    # With a predictor that always answers x0*, each step keeps x on the straight path to x0*.
    target = torch.rand(2, 3, 8, 8) * 2 - 1
    noise = initial_noise(2, 8, 8, seed=0)
    for sampler in ("euler", "heun"):
        out = sample(lambda x, t: target, noise, steps=10, sampler=sampler, shift=1.0, t_clamp=0.05)
        assert torch.allclose(out, target, atol=1e-5)


def test_same_seed_same_image_independent_of_batch():
    a = initial_noise(3, 8, 8, seed=5)
    b = initial_noise(1, 8, 8, seed=7)
    assert torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])


class FakeModel(torch.nn.Module):
    """x0 = mean of the text embedding, broadcast: the conditional and unconditional answers differ."""

    def forward(self, x, t, embeds, mask, route=None):
        from prx.model import PRXOutput

        value = (embeds * mask[..., None]).sum((1, 2)) / (mask.sum(1) * embeds.shape[-1])
        return PRXOutput(x0=value.view(-1, 1, 1, 1).expand_as(x).clone())


def test_cfg_formula_and_interval():
    cond = TextBatch(torch.full((2, 3, 4), 1.0), torch.ones(2, 3, dtype=torch.bool))
    uncond = TextBatch(torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool))
    x = torch.zeros(2, 3, 4, 4)
    predict = guided_predictor(FakeModel(), cond, uncond, guidance_scale=3.0)
    # uncond + w·(cond − uncond) with per-element means 1 and 0
    assert torch.allclose(predict(x, torch.tensor(0.5)), torch.full_like(x, 3.0))
    plain = guided_predictor(FakeModel(), cond, uncond, guidance_scale=1.0)
    assert torch.allclose(plain(x, torch.tensor(0.5)), torch.full_like(x, 1.0))
    interval = guided_predictor(FakeModel(), cond, uncond, guidance_scale=3.0, guidance_interval=(0.2, 0.6))
    assert torch.allclose(interval(x, torch.tensor(0.9)), torch.full_like(x, 1.0))  # outside: no guidance
    assert torch.allclose(interval(x, torch.tensor(0.4)), torch.full_like(x, 3.0))


def perturbed_tiny_model():
    """A tiny model moved off its zero-initialised output, so predictions depend on the input."""
    from conftest import tiny_model

    model = tiny_model().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    return model


def test_sampling_is_deterministic_with_a_real_model():

    model = perturbed_tiny_model()
    cond = TextBatch(torch.randn(2, 4, 24), torch.ones(2, 4, dtype=torch.bool))
    uncond = TextBatch(torch.randn(1, 2, 24), torch.ones(1, 2, dtype=torch.bool))
    runs = [sample(guided_predictor(model, cond, uncond, guidance_scale=2.0), initial_noise(2, 48, 48, seed=1), 5, "heun") for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = sample(guided_predictor(model, cond, uncond, guidance_scale=2.0), initial_noise(2, 48, 48, seed=2), 5, "heun")
    assert not torch.equal(runs[0], other)


def test_self_guidance():
    from prx.tread import TREADRouter

    model = perturbed_tiny_model()
    cond = TextBatch(torch.randn(2, 4, 24), torch.ones(2, 4, dtype=torch.bool))
    x, t = torch.randn(2, 3, 48, 48), torch.tensor(0.7)
    route = TREADRouter(0.5, 1, 2).fixed_route(9, 4, seeds=[1, 2])
    dense = model(x, t.expand(2), cond.embeds, cond.mask).x0
    routed = model(x, t.expand(2), cond.embeds, cond.mask, route=route).x0
    assert not torch.allclose(dense, routed)
    with torch.no_grad():
        w1 = guided_predictor(model, cond, None, "self", self_guidance_scale=1.0, route=route)(x, t)
        w3 = guided_predictor(model, cond, None, "self", self_guidance_scale=3.0, route=route)(x, t)
    assert torch.allclose(w1, dense, atol=1e-6)  # w = 1 is the dense prediction
    assert torch.allclose(w3, routed + 3.0 * (dense - routed), atol=1e-5)
    # both: the two guidance directions add up
    uncond = TextBatch(torch.randn(1, 2, 24), torch.ones(1, 2, dtype=torch.bool))
    with torch.no_grad():
        both = guided_predictor(model, cond, uncond, "both", 2.0, 3.0, route=route)(x, t)
        dense_u = model(x, t.expand(2), uncond.expand(2).pad_to(4).embeds, uncond.expand(2).pad_to(4).mask).x0
    assert torch.allclose(both, dense + (dense - dense_u) + 2.0 * (dense - routed), atol=1e-4)
