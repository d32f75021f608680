"""The DDPM U-Net: paper §4 and App. B, module for module as the official `models/unet.py`.

A PixelCNN++-style Wide-ResNet U-Net: GroupNorm(32, eps 1e-6), swish, the sinusoidal timestep
embedding added into every residual block, single-head self-attention at the `attn_resolutions`
and in the middle, stride-2 convolutions down and nearest-neighbour + convolution up.
Submodule names follow the official TF scopes (as pesser/pytorch_diffusion does), so weights
map one to one onto the released checkpoints and onto diffusers' `UNet2DModel`.

Initialisation is the official one: Xavier-uniform (fan_avg) everywhere, zero biases, and zero
weights for each block's second conv, each attention output projection and the output conv
(`init_scale=0.` in the official code, which TF needs as 1e-10; zero is what it means), so the
untrained network outputs exactly 0. `model.init=pytorch` keeps PyTorch's default layer init instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import GROUPNORM_GROUPS, ModelConfig


def group_norm(channels: int) -> nn.GroupNorm:
    # tf.contrib.layers.group_norm defaults: 32 groups, eps 1e-6.
    return nn.GroupNorm(GROUPNORM_GROUPS, channels, eps=1e-6)


def timestep_frequencies(dim: int) -> torch.Tensor:
    """f_i = exp(-i ln(10000) / (half - 1)), i < half = dim // 2 (official `get_timestep_embedding`)."""
    half = dim // 2
    return torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))


def timestep_embedding(t: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """The Transformer sinusoid of t: [sin(t f), cos(t f)], sin first as the official code."""
    args = t.to(torch.float32)[:, None] * frequencies[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResnetBlock(nn.Module):
    """GN → swish → conv, + dense(swish(temb)), GN → swish → dropout → conv (zero-init), + skip."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # The official 1x1 "nin_shortcut" when the channel count changes.
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb_swish: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(temb_swish)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √C) v over (B, N, C) tokens, one head (the official C^-0.5 scale)."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # The CPU's bf16 SDPA kernels are 1.8–5× slower than these two bmm at the presets' 64–256 tokens
        # (bench/attention_cpu.py). fp32 keeps SDPA, as fast as bmm or faster there, and CUDA its fused kernels.
        # The keys are centred over the tokens first: that subtracts q_i·mean(k) from every logit of row i, which
        # softmax ignores, but which bmm's bf16 logits would store at the cost of their last bits (an offset of
        # 100 left 11 % output error, 1 % centred; tests/test_unet.py). Gradients are unchanged too. The mean is a
        # matmul: CPU bf16 `mean` over the tokens took 3× the first bmm's time at 256×512, the matmul half of it.
        # Centring costs 1.1–1.7× the two bare bmm (bench/attention_cpu.py), ≤ 2 % of a whole U-Net forward.
        tokens = k.shape[1]
        centred = k - torch.matmul(k.new_full((1, tokens), 1 / tokens), k)
        weights = torch.bmm(q, centred.transpose(1, 2)) * q.shape[-1] ** -0.5
        return torch.bmm(torch.softmax(weights, dim=-1), v)
    # SDPA's default scale is 1/sqrt(C); it picks a fused kernel, which takes only (B, heads, N, C) inputs.
    return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]


class AttnBlock(nn.Module):
    """Single-head self-attention over all H·W positions, softmax(q kᵀ / √C) v, added residually."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)

        def tokens(proj: nn.Conv2d) -> torch.Tensor:  # (B, H·W, C)
            return proj(h).reshape(b, c, height * width).transpose(1, 2)

        attended = attention(tokens(self.q), tokens(self.k), tokens(self.v))
        return x + self.proj_out(attended.transpose(1, 2).reshape(b, c, height, width))


class Downsample(nn.Module):
    """3×3 stride-2 conv with TF 'SAME' padding, which pads only bottom/right on even inputs."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the down or up path: res blocks, their attention, and the resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class UNet(nn.Module):
    """ε_θ(x_t, t): predicts the noise of Eq. 14 from an image batch and integer timesteps."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        ch, temb_ch = config.ch, 4 * config.ch
        num_levels = len(config.ch_mult)

        self.register_buffer("temb_frequencies", timestep_frequencies(ch), persistent=False)
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        resolution = config.resolution
        skip_channels = [ch]
        block_in = ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(config.ch_mult):
            level = Level()
            block_out = ch * mult
            for _ in range(config.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, temb_ch, config.dropout))
                block_in = block_out
                if resolution in config.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
                skip_channels.append(block_in)
            if i != num_levels - 1:
                level.downsample = Downsample(block_in)
                resolution //= 2
                skip_channels.append(block_in)
            self.down.append(level)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, temb_ch, config.dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, temb_ch, config.dropout)

        up_levels: list[Level] = []
        for i in reversed(range(num_levels)):
            level = Level()
            block_out = ch * config.ch_mult[i]
            for _ in range(config.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in + skip_channels.pop(), block_out, temb_ch, config.dropout))
                block_in = block_out
                if resolution in config.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in)
                resolution *= 2
            up_levels.insert(0, level)  # self.up[i] is level i, as in the official scopes
        self.up = nn.ModuleList(up_levels)

        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_channels, 3, padding=1)
        if config.init == "paper":  # else the layers keep PyTorch's default init (model.init=pytorch)
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation (see the module docstring)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, ResnetBlock):
                nn.init.zeros_(module.conv2.weight)
            elif isinstance(module, AttnBlock):
                nn.init.zeros_(module.proj_out.weight)
        nn.init.zeros_(self.conv_out.weight)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor) -> None:
        # Shapes only: they are static, so these checks cost nothing and break no compiled graph.
        c, r = self.config.in_channels, self.config.resolution
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] != r or x.shape[3] != r:
            raise ValueError(f"UNet expects images of shape (batch, {c}, {r}, {r}); got {tuple(x.shape)}")
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"UNet expects one timestep per image, shape ({x.shape[0]},); got {tuple(t.shape)}")

    def _block(self, block: ResnetBlock, h: torch.Tensor, temb_swish: torch.Tensor) -> torch.Tensor:
        if self.config.gradient_checkpointing and self.training:
            return checkpoint(block, h, temb_swish, use_reentrant=False)
        return block(h, temb_swish)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self._check_inputs(x, t)
        dense = self.temb.dense
        temb = dense[1](F.silu(dense[0](timestep_embedding(t, self.temb_frequencies))))
        # Every block adds dense(swish(temb)); swish(temb) is the same for all of them.
        temb_swish = F.silu(temb)

        hs = [self.conv_in(x)]
        for level in self.down:
            for j, block in enumerate(level.block):
                h = self._block(block, hs[-1], temb_swish)
                if level.attn:
                    h = level.attn[j](h)
                hs.append(h)
            if hasattr(level, "downsample"):
                hs.append(level.downsample(hs[-1]))

        h = self._block(self.mid.block_1, hs[-1], temb_swish)
        h = self.mid.attn_1(h)
        h = self._block(self.mid.block_2, h, temb_swish)

        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = self._block(block, torch.cat([h, hs.pop()], dim=1), temb_swish)
                if level.attn:
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)

        return self.conv_out(F.silu(self.norm_out(h)))
