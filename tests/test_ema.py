import pytest
import torch

from ddpm_core.ema import EMA


def test_first_update_copies_then_decays_at_a_constant_rate():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=0)
    assert torch.equal(ema.model.weight, model.weight)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(model, step=1)
    assert torch.allclose(ema.model.weight, torch.full((2, 3), 0.9 * 1.0 + 0.1 * 2.0))
    ema.update(model, step=2)
    assert torch.allclose(ema.model.weight, torch.full((2, 3), 0.9 * 1.1 + 0.1 * 2.0))
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_state_round_trip_and_bad_decay():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, 0.9999)
    other = EMA(torch.nn.Linear(2, 2), 0.9999)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.model.weight, ema.model.weight)
    with pytest.raises(ValueError, match=r"EMA decay must be in \[0, 1\), got 1.5"):
        EMA(model, 1.5)
