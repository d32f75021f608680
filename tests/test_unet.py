import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from ddpm_core.model_stats import count_parameters, forward_flops
from ddpm_core.presets import PRESETS, get_preset
from ddpm_core.unet import AttnBlock, ResnetBlock, UNet, attention, timestep_embedding, timestep_frequencies


def meta_unet(preset: str) -> UNet:
    with torch.device("meta"):
        return UNet(get_preset(preset).model)


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("cifar10", 35_746_307),  # paper: 35.7M
        ("celebahq256", 113_673_219),  # paper: 114M
        ("lsun_bedroom256", 113_673_219),
        ("lsun_church256", 113_673_219),
        ("lsun_cat256", 113_673_219),
        ("lsun_bedroom256_large", 255_677_955),  # paper: ~256M
    ],
)
def test_parameter_counts_match_the_paper(preset, expected):
    assert count_parameters(meta_unet(preset)) == expected


def test_learned_variance_head_count():
    config = dataclasses.replace(get_preset("cifar10").model, out_channels=6)
    with torch.device("meta"):
        assert count_parameters(UNet(config)) == 35_749_766


def test_cifar_attention_placement():
    model = meta_unet("cifar10")
    # Attention after every res block at 16x16: 2 in the down path, 3 in the up path, plus the middle.
    assert [len(level.attn) for level in model.down] == [0, 2, 0, 0]
    assert [len(level.attn) for level in model.up] == [0, 3, 0, 0]
    assert sum(isinstance(m, AttnBlock) for m in model.modules()) == 6


def test_forward_flops_are_twice_the_multiply_adds():
    # conv_in alone at 32x32: 3*3*3*128 MACs per pixel; the whole model must exceed it by far.
    flops = forward_flops(get_preset("cifar10").model)
    assert flops > 2 * 32 * 32 * 27 * 128
    assert 11e9 < flops < 14e9  # ~6.1 GMACs is the published cost of this network


PAPER_TINY = dataclasses.replace(get_preset("tiny").model, init="paper")  # tiny keeps PyTorch's init (its notes)


def test_output_shape_and_zero_output_at_init():
    torch.manual_seed(0)
    model = UNet(PAPER_TINY)
    x = torch.randn(3, 3, 16, 16)
    out = model(x, torch.tensor([0, 500, 999]))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0


def test_official_initialisation():
    torch.manual_seed(0)
    model = UNet(PAPER_TINY)
    zero_init = set()
    for module in model.modules():
        if isinstance(module, ResnetBlock):
            zero_init.add(id(module.conv2.weight))
        if isinstance(module, AttnBlock):
            zero_init.add(id(module.proj_out.weight))
    zero_init.add(id(model.conv_out.weight))
    checked = 0
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            assert torch.count_nonzero(module.bias) == 0
            w = module.weight
            if id(w) in zero_init:
                assert torch.count_nonzero(w) == 0
                continue
            fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(w)
            bound = math.sqrt(6.0 / (fan_in + fan_out))  # Glorot-uniform, fan_avg
            assert w.abs().max() <= bound
            if w.numel() >= 4096:  # large enough for the empirical spread to show the bound
                assert w.abs().max() > 0.95 * bound
                assert w.var().item() == pytest.approx(bound**2 / 3, rel=0.1)
            checked += 1
    assert checked > 20


def test_pytorch_init_keeps_the_default_layer_init():
    config = get_preset("tiny").model
    assert config.init == "pytorch"
    torch.manual_seed(0)
    model = UNet(config)
    conv = model.conv_out.weight
    fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(conv)
    assert torch.count_nonzero(conv) == conv.numel() and conv.abs().max() <= 1 / math.sqrt(fan_in)  # kaiming(a=√5)
    assert torch.count_nonzero(model.conv_out.bias) == config.out_channels
    x = torch.randn(2, 3, 16, 16)
    assert torch.count_nonzero(model(x, torch.tensor([0, 999]))) > 0  # no zero branches: it outputs at once
    paper = [name for name, preset in PRESETS.items() if name not in ("tiny", "demo")]
    assert len(paper) >= 6 and all(PRESETS[name].model.init == "paper" for name in paper)


def test_timestep_embedding_is_sin_first_with_official_frequencies():
    freqs = timestep_frequencies(8)
    assert torch.allclose(freqs, torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3), 1e-4]))
    emb = timestep_embedding(torch.tensor([0, 7]), freqs)
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert torch.allclose(emb[1, :4], torch.sin(7 * freqs))
    assert torch.allclose(emb[1, 4:], torch.cos(7 * freqs))


def trained_like_tiny(seed=0):
    """A tiny U-Net whose zero-init weights are filled with noise, so every path contributes."""
    torch.manual_seed(seed)
    model = UNet(get_preset("tiny").model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def attention_block_and_input() -> tuple[AttnBlock, torch.Tensor]:
    block = AttnBlock(32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return block, torch.randn(2, 32, 8, 8)


def explicit_attention(block: AttnBlock, x: torch.Tensor) -> torch.Tensor:
    h = block.norm(x)
    q, k, v = (proj(h).reshape(2, 32, 64) for proj in (block.q, block.k, block.v))
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * 32**-0.5, dim=-1)
    return x + block.proj_out(torch.einsum("bij,bcj->bci", weights, v).reshape(2, 32, 8, 8))


def test_attention_equals_explicit_softmax():
    block, x = attention_block_and_input()
    assert torch.allclose(block(x), explicit_attention(block, x), atol=1e-5)


def test_bf16_attention_on_cpu_matches_fp32_values_and_gradients():
    # Under CPU bf16 autocast the block attends by two bmm instead of SDPA (ddpm_core.unet.attention).
    block, x = attention_block_and_input()
    with torch.no_grad():  # sharper attention, so that its scale and softmax weigh in the values
        block.q.weight.mul_(4)
        block.k.weight.mul_(4)
    outputs, grads = [], []
    for bf16 in (False, True):
        block.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            attended = (block(x) if bf16 else explicit_attention(block, x)) - x
        attended.float().square().sum().backward()
        outputs.append(attended.float())
        grads.append(torch.cat([p.grad.flatten() for p in block.parameters()]))
    assert (outputs[1] - outputs[0]).norm() / outputs[0].norm() < 0.01
    assert (grads[1] - grads[0]).norm() / grads[0].norm() < 0.01
    assert "aten::scaled_dot_product_attention" in attention_ops(block, x, bf16=False)
    bf16_ops = attention_ops(block, x, bf16=True)
    assert "aten::scaled_dot_product_attention" not in bf16_ops and "aten::bmm" in bf16_ops


@pytest.mark.parametrize("offset", [25, 100, 200])
def test_cpu_bf16_attention_survives_a_large_per_row_logit_offset(offset):
    # q and k share a component, so every logit of row i carries the offset q_i·mean(k) (≈ `offset`); stored as
    # bf16 logits that offset costs their last bits (5–23 % output error uncentred). The inputs are bf16 already,
    # so the error measured here is the attention's arithmetic alone.
    channels = 32
    shift = (offset / channels**0.5) ** 0.5
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(4, 64, channels, generator=g) for _ in range(3))
    q, k, v = (q + shift).bfloat16(), (k + shift).bfloat16(), v.bfloat16()
    row_offset = (q.double() @ k.double().mean(1).unsqueeze(-1)).squeeze(-1) * channels**-0.5
    assert offset * 0.9 < row_offset.mean().item() < offset * 1.1
    exact = attention(q.double(), k.double(), v.double())
    got = attention(q, k, v).double()
    assert (got - exact).norm() / exact.norm() < 0.02


def attention_ops(block: AttnBlock, x: torch.Tensor, bf16: bool) -> set[str]:
    """The aten ops one forward of the block runs (fp32, or under CPU bf16 autocast)."""
    with torch.profiler.profile() as profile, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        block(x)
    return {event.key for event in profile.key_averages()}


def test_downsample_pads_bottom_right_like_tf_same():
    model = trained_like_tiny()
    down = model.down[0].downsample
    x = torch.randn(1, 32, 16, 16)
    # TF 'SAME' with stride 2 on an even input: output 8x8, first window centred on pixel (1, 1)...
    ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    assert torch.equal(down(x), ref)
    # ...which differs from symmetric padding.
    symmetric = F.conv2d(x, down.conv.weight, down.conv.bias, stride=2, padding=1)
    assert not torch.allclose(ref, symmetric)


def test_channels_last_changes_no_numbers():
    model = trained_like_tiny().eval()
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([1, 10, 100, 999])
    reference = model(x, t)
    fast = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t)
    assert torch.allclose(reference, fast, atol=1e-5)


def test_gradient_checkpointing_changes_no_numbers():
    base = trained_like_tiny()
    checkpointed = UNet(dataclasses.replace(base.config, gradient_checkpointing=True))
    checkpointed.load_state_dict(base.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    grads = []
    for model in (base, checkpointed):
        model.zero_grad()
        model(x, t).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_forward_compiles_without_graph_breaks():
    model = trained_like_tiny().eval()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_bf16_autocast_stays_close_to_fp32():
    model = trained_like_tiny().eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 500])
    reference = model(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t)
    assert low.dtype == torch.bfloat16
    rel = (low.float() - reference).norm() / reference.norm()
    assert rel < 0.05


@pytest.mark.parametrize(
    "shape, t, message",
    [
        ((2, 3, 32, 32), [0, 1], r"shape \(batch, 3, 16, 16\); got \(2, 3, 32, 32\)"),
        ((2, 1, 16, 16), [0, 1], r"shape \(batch, 3, 16, 16\); got \(2, 1, 16, 16\)"),
        ((3, 16, 16), [0], r"got \(3, 16, 16\)"),
        ((2, 3, 16, 16), [0, 1, 2], r"one timestep per image, shape \(2,\); got \(3,\)"),
    ],
)
def test_wrong_input_shapes_get_one_clear_error(shape, t, message):
    model = UNet(get_preset("tiny").model)
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(shape), torch.tensor(t))
