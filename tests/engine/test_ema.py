"""ModelEMA arithmetic checked against the decay formula by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detr_kit.engine.ema import ModelEMA


def _model(value: float) -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
        model[1].running_mean.fill_(value)
    return model


def test_decay_warm_up_formula():
    ema = ModelEMA(_model(0.0), decay=0.9, warmup_steps=10)
    # after n updates the next uses decay * (1 - exp(-(n + 1) / tau))
    assert ema.current_decay() == pytest.approx(0.9 * (1 - math.exp(-1 / 10)))
    ema.updates = 99
    assert ema.current_decay() == pytest.approx(0.9 * (1 - math.exp(-100 / 10)))
    assert ModelEMA(_model(0.0), decay=0.9, warmup_steps=0).current_decay() == 0.9


def test_update_by_hand():
    model = _model(1.0)
    ema = ModelEMA(model, decay=0.5, warmup_steps=2)
    expected = 1.0
    for step, live in enumerate([3.0, -1.0, 7.0], start=1):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(live)
            model[1].running_mean.fill_(live)
            model[1].num_batches_tracked.fill_(step * 10)
        d = 0.5 * (1 - math.exp(-step / 2))
        expected = d * expected + (1 - d) * live
        ema.update(model)
        for name, value in ema.module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                assert int(value) == step * 10  # integer buffers are copied, not averaged
            elif name.endswith("running_var"):
                continue  # untouched: 1 in both models
            else:
                torch.testing.assert_close(value, torch.full_like(value, expected), msg=name)
    assert ema.updates == 3
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_state_dict_round_trip():
    ema = ModelEMA(_model(2.0), decay=0.99, warmup_steps=5)
    ema.update(_model(4.0))
    other = ModelEMA(_model(0.0), decay=0.99, warmup_steps=5)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    for a, b in zip(other.module.state_dict().values(), ema.module.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_invalid_decay():
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(_model(0.0), decay=1.0)
