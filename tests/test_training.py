import pytest
import torch

from ddpm_core.config import TrainConfig
from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.presets import get_preset
from ddpm_core.training import build_ema, build_optimizer, learning_rate, train_step
from ddpm_core.unet import UNet


def test_warm_up_is_linear_from_zero_then_constant():
    config = TrainConfig(lr=2e-4, warmup_steps=5000)
    assert learning_rate(0, config) == 0.0
    assert learning_rate(2500, config) == 1e-4
    assert learning_rate(5000, config) == learning_rate(10**6, config) == 2e-4


def simple_images(n, generator):
    """A simple image distribution: a bright square at a random position on a dark background."""
    x = torch.full((n, 3, 16, 16), -0.8)
    corners = torch.randint(0, 10, (n, 2), generator=generator)
    for i, (r, c) in enumerate(corners.tolist()):
        x[i, :, r:r + 6, c:c + 6] = 0.8
    return x


def test_tiny_model_trained_150_steps_lowers_its_loss_clearly():
    config = get_preset("tiny")
    torch.manual_seed(0)
    model = UNet(config.model)
    diffusion = GaussianDiffusion.from_config(config.diffusion)
    optimizer, ema = build_optimizer(model, config.train), build_ema(model, config.train)
    g = torch.Generator().manual_seed(0)
    eval_x0 = simple_images(64, torch.Generator().manual_seed(99))
    eval_t = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(98))
    eval_noise = torch.randn(eval_x0.shape, generator=torch.Generator().manual_seed(97))

    def eval_loss():
        model.eval()
        with torch.no_grad():
            loss = diffusion.training_loss(model, eval_x0, eval_t, eval_noise).mean().item()
        model.train()
        return loss

    before = eval_loss()
    results = [train_step(model, diffusion, optimizer, ema, simple_images(16, g), step, config.train, g)
               for step in range(150)]
    after = eval_loss()
    assert before > 0.95  # zero-init: the untrained model predicts ε = 0
    assert after < 0.2 * before
    assert all(r.applied for r in results)
    assert results[0].lr == 0.0 and results[-1].lr == config.train.lr
    assert all(r.grad_norm > 0 for r in results)
    # The EMA model has moved away from the initial copy towards the trained weights.
    assert not torch.equal(ema.model.conv_out.weight, torch.zeros_like(model.conv_out.weight))


def test_a_non_finite_loss_skips_the_update():
    config = get_preset("tiny")
    model = UNet(config.model)
    diffusion = GaussianDiffusion.from_config(config.diffusion)
    optimizer, ema = build_optimizer(model, config.train), build_ema(model, config.train)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        model.conv_out.bias.fill_(float("inf"))
    result = train_step(model, diffusion, optimizer, ema, torch.zeros(2, 3, 16, 16), 50, config.train)
    assert not result.applied
    after = list(model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before[:-1], after[:-1]))


def test_micro_batches_accumulate_to_the_same_gradient_as_the_whole_batch():
    import dataclasses

    config = get_preset("tiny")
    diffusion = GaussianDiffusion.from_config(config.diffusion)
    x0 = simple_images(8, torch.Generator().manual_seed(4))
    grads = []
    for micro in (0, 3):
        torch.manual_seed(0)
        model = UNet(config.model)
        train = dataclasses.replace(config.train, micro_batch=micro, warmup_steps=0)
        optimizer, ema = build_optimizer(model, train), build_ema(model, train)
        t = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(1))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
        chunks = iter(zip(t.split(micro or 8), noise.split(micro or 8)))

        def fixed_loss(model_, chunk, generator=None):
            t_chunk, noise_chunk = next(chunks)
            return GaussianDiffusion.training_loss(diffusion, model_, chunk, t_chunk, noise_chunk)

        diffusion.training_loss = fixed_loss
        result = train_step(model, diffusion, optimizer, ema, x0, 1, train)
        del diffusion.training_loss
        grads.append((result, [p.grad.detach().clone() for p in model.parameters()]))  # kept until the next step
    (whole, grads_whole), (micro, grads_micro) = grads
    assert micro.loss == pytest.approx(whole.loss, rel=1e-5)
    assert micro.grad_norm == pytest.approx(whole.grad_norm, rel=1e-4)
    # The gradients, not the weights: Adam's first step (about lr·sign(g)) turns last-bit differences of
    # near-zero gradient entries into lr-sized weight differences.
    # Entries that are zero but for rounding (a bias before a GroupNorm) differ by ~1e-9 (the largest are ~6e-2).
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grads_whole, grads_micro))
