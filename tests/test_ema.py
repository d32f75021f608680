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


def test_debiased_average_gives_the_starting_weights_no_share():
    model = torch.nn.Linear(1, 1, bias=False)
    ema, d = EMA(model, decay=0.9, debias=True), 0.9
    values = [5.0, 1.0, 2.0, 4.0]
    for step, value in enumerate(values):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model, step)
        # Kingma & Ba's bias-corrected average of the weights after updates 0..step.
        weights = [(1 - d) * d ** (step - k) for k in range(step + 1)]
        expected = sum(w * v for w, v in zip(weights, values)) / (1 - d ** (step + 1))
        assert abs(ema.model.weight.item() - expected) < 1e-6, step
    assert ema.decay_at(0) == 0.0 and abs(ema.decay_at(1) - 0.9 * 0.1 / 0.19) < 1e-12
    assert ema.decay_at(10_000) == 0.9 and EMA(model, 0.9).decay_at(1) == 0.9
