"""Diffusion Transformer (Peebles & Xie, 2023) predicting flow-matching velocity.

Patchify -> fixed 2D sin-cos positions -> N blocks with adaLN-Zero conditioning on (time + class)
-> adaLN final layer -> unpatchify. Class index `num_classes` is the null class used for CFG dropout.
Contract: `model(x [B,C,H,W], t [B] in [0,1], y [B] long | None) -> velocity [B,C,H,W]`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class DiT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.image_size is None or cfg.in_channels is None or cfg.num_classes is None:
            raise ValueError("model.image_size, in_channels and num_classes must be resolved before building")
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by patch_size {cfg.patch_size}")
        self.in_channels = cfg.in_channels
        self.patch_size = cfg.patch_size
        self.num_classes = cfg.num_classes
        self.grid = cfg.image_size // cfg.patch_size
        width = cfg.hidden_size

        self.x_embed = nn.Conv2d(cfg.in_channels, width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        # Fixed positions: not a parameter, and not saved (it is a pure function of the config).
        pos = sincos_2d_embedding(width, self.grid)
        self.register_buffer("pos_embed", torch.from_numpy(pos).float().unsqueeze(0), persistent=False)
        self.t_embed = TimestepEmbedder(width)
        # One extra row: the null class for classifier-free guidance (also the only row if unconditional).
        self.y_embed = nn.Embedding(cfg.num_classes + 1, width)
        self.blocks = nn.ModuleList(DiTBlock(width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final = FinalLayer(width, cfg.patch_size, cfg.in_channels)
        self.reset_parameters()

    @property
    def null_class(self) -> int:
        return self.num_classes

    def reset_parameters(self):
        def _basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_basic)
        w = self.x_embed.weight.data  # like nn.Linear on the flattened patch
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embed.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for layer in self.t_embed.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, and the output layer starts at zero velocity.
        for block in self.blocks:
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        nn.init.zeros_(self.final.modulation[-1].weight)
        nn.init.zeros_(self.final.modulation[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            y = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        h = self.x_embed(x).flatten(2).transpose(1, 2)
        h = h + self.pos_embed.to(h.dtype)  # keep the residual stream in the compute dtype (bf16 under autocast)
        c = self.t_embed(t) + self.y_embed(y)
        for block in self.blocks:
            h = block(h, c)
        h = self.final(h, c)
        return self.unpatchify(h)

    def unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        p, g, c = self.patch_size, self.grid, self.in_channels
        h = h.reshape(h.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(h.shape[0], c, g * p, g * p)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of 1000 t (so [0, 1] spans the usual frequency range), then an MLP."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000 * t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # unbind (not qkv[i] indexing): its backward is one stack, not three zero-filled full-size gradients.
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    def __init__(self, width: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


def sincos_2d_embedding(width: int, grid: int) -> np.ndarray:
    """[grid*grid, width] fixed 2D sin-cos positions (half the channels for rows, half for columns)."""
    if width % 4:
        raise ValueError(f"hidden_size {width} must be divisible by 4 for 2D sin-cos positions")
    coords = np.arange(grid, dtype=np.float64)
    gy, gx = np.meshgrid(coords, coords, indexing="ij")
    return np.concatenate([_sincos_1d(width // 2, gy.reshape(-1)), _sincos_1d(width // 2, gx.reshape(-1))], axis=1)


def _sincos_1d(width: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2.0))
    out = np.outer(pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
