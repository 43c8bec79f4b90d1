"""TREAD token routing, tested against its definition: a routed token comes back unchanged."""



import pytest
import torch

from conftest import tiny_model
from prx.errors import ConfigError
from prx.tread import TREADRouter


def test_router_subsets_are_uniform_deterministic_and_per_sample():
    router = TREADRouter(route_ratio=0.5, start_block=2, end_block=-2, seed=3)
    r = router.route(step=7, first=0, count=4, num_tokens=16, num_layers=24)
    assert (r.start, r.end) == (2, 22) and r.keep.shape == (4, 8)
    assert all(len(set(row.tolist())) == 8 for row in r.keep)  # a subset, no repeats
    assert not torch.equal(r.keep[0], r.keep[1])  # each sample its own
    assert torch.equal(r.keep, router.route(7, 0, 4, 16, 24).keep)  # same step, same samples → same tokens
    assert not torch.equal(r.keep, router.route(8, 0, 4, 16, 24).keep)
    # a sample's route depends on its place in the global batch, not on which rank or micro-batch draws it
    assert torch.equal(r.keep[2:], router.route(7, 2, 2, 16, 24).keep)
    counts = torch.zeros(16)
    for step in range(400):
        counts += torch.bincount(router.route(step, 0, 4, 16, 24).keep.flatten(), minlength=16)
    assert counts.min() / counts.max() > 0.85  # every token kept about equally often
    assert TREADRouter(route_ratio=0.0).route(0, 0, 4, 16, 24) is None  # ratio 0: no routing at all


def test_router_keeps_the_rest_of_each_buckets_tokens():
    from prx.data.buckets import make_buckets

    for ratio in (0.5, 0.3, 0.75):
        router = TREADRouter(route_ratio=ratio)
        for resolution in (512, 1024):
            for bucket in make_buckets(resolution, 32):
                n = bucket.tokens(32)  # 247–264 at 512 px, odd counts included
                keep = router.route(0, 0, 2, n, 24).keep
                assert keep.shape == (2, n - round(ratio * n)) and int(keep.max()) < n  # round(ratio × n) routed


def test_router_block_ranges():
    assert TREADRouter(0.5, 2, -2).blocks(16) == (2, 14)
    with pytest.raises(ValueError, match="comes after"):
        TREADRouter(0.5, 5, 2).blocks(8)
    with pytest.raises(ConfigError, match="outside"):
        TREADRouter(0.5, 2, 9).blocks(8)


def test_routed_tokens_come_back_unchanged_through_the_router():
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.2)
        model.blocks[3].modulation.weight.zero_()  # block 3 = identity: its output is the state after the route
        model.blocks[3].modulation.bias.zero_()
    x, t = torch.randn(2, 3, 48, 48), torch.rand(2)
    txt, mask = torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.bool)
    route = TREADRouter(0.5, start_block=1, end_block=-2).route(step=0, first=0, count=2, num_tokens=9, num_layers=4)
    before = model(x, t, txt, mask, capture_block=0).hidden
    after = model(x, t, txt, mask, route=route, capture_block=3).hidden
    for b in range(2):
        routed = sorted(set(range(9)) - set(route.keep[b].tolist()))
        assert torch.equal(after[b, routed], before[b, routed])
