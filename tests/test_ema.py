"""The EMA copy against its definition, including the demo's decay 0 (a copy made when it is read)."""

import torch

from prx.ema import EMA


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))


def _set(model: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def _values(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_ema_follows_its_formula():
    model = _model(0)
    ema = EMA(model, decay=0.75, update_every=1)
    start = _values(ema.model)
    _set(model, 2.0)
    ema.update(model, 1)
    for e, s in zip(ema.model.parameters(), start):
        torch.testing.assert_close(e, 0.75 * s + 0.25 * 2.0)


def test_decay_zero_every_step_is_the_latest_weights_when_read():
    model = _model(0)
    ema = EMA(model, decay=0.0, update_every=1)
    for step, value in enumerate([1.0, 3.0, 5.0], start=1):
        _set(model, value)
        ema.update(model, step)
    assert all(bool((p == 5.0).all()) for p in ema.model.parameters())
    assert all(bool((v == 5.0).all()) for v in ema.state_dict()["model"].values() if v.dtype.is_floating_point)
    assert ema.num_updates == 3
    # the copy is a copy: later changes of the weights, without an update, do not reach it
    _set(model, 7.0)
    assert all(bool((p == 5.0).all()) for p in ema.model.parameters())


def test_decay_zero_with_update_every_keeps_the_update_steps_weights():
    model = _model(0)
    ema = EMA(model, decay=0.0, update_every=2)
    _set(model, 1.0)
    ema.update(model, 2)
    _set(model, 4.0)
    ema.update(model, 3)  # not an update step
    assert all(bool((p == 1.0).all()) for p in ema.model.parameters())


def test_loading_a_state_replaces_a_pending_copy():
    model, saved = _model(0), _model(1)
    ema = EMA(model, decay=0.0, update_every=1)
    _set(model, 9.0)
    ema.update(model, 1)  # a copy owed from the live weights ...
    ema.load_state_dict({"model": saved.state_dict(), "num_updates": 4})  # ... is superseded by the loaded ones
    for e, s in zip(ema.model.parameters(), saved.parameters()):
        torch.testing.assert_close(e, s)
    assert ema.num_updates == 4
