"""Diffusion Transformer (Peebles & Xie, 2023) predicting flow-matching velocity.

Patchify -> fixed 2D sin-cos positions -> N blocks with adaLN-Zero conditioning on (time + class)
-> adaLN final layer -> unpatchify. Class index `num_classes` is the null class used for CFG dropout.
With `model.cross_attention` each block is self-attn -> cross-attn to the text tokens (padding masked)
-> MLP, still with adaLN-Zero time conditioning; one class serves class and text models.
Contract: `model(x [B,C,H,W], t [B] in [0,1], y [B] long | None, text [B,L,D] | None,
text_mask [B,L] bool | None) -> velocity [B,C,H,W]`.
A mean-flow DiT (`model.end_time`) also takes `t_end [B]` (>= t; default t) and returns the average velocity
over [t, t_end] (fmcli/flow.py): the interval length t_end - t gets its own timestep embedding, added to the
conditioning, whose output layer starts at zero, so a mean-flow DiT loaded from a flow DiT (train.init_from)
starts as that model for every t_end (exact at t_end = t, where the average velocity is the velocity).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..flow import velocity_from_data


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
        self.predicts_data = cfg.prediction == "data"  # the output is x1; forward returns its velocity (flow.py)
        self.grid = cfg.image_size // cfg.patch_size
        width = cfg.hidden_size

        self.x_embed = nn.Conv2d(cfg.in_channels, width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        # Fixed positions: not a parameter, and not saved (it is a pure function of the config).
        pos = sincos_2d_embedding(width, self.grid)
        self.register_buffer("pos_embed", torch.from_numpy(pos).float().unsqueeze(0), persistent=False)
        self.t_embed = TimestepEmbedder(width)
        # One extra row: the null class for classifier-free guidance (also the only row if unconditional).
        self.y_embed = nn.Embedding(cfg.num_classes + 1, width)
        self.cross_attention = cfg.cross_attention
        if cfg.cross_attention:
            if cfg.text_dim is None:
                raise ValueError("model.text_dim must be resolved (from the text encoder) before building")
            # Caption projection to the model width (as PixArt-alpha): Linear -> GELU -> Linear.
            self.text_embed = nn.Sequential(nn.Linear(cfg.text_dim, width), nn.GELU(approximate="tanh"), nn.Linear(width, width))
        blocks = (DiTBlock(width, cfg.heads, cfg.mlp_ratio, cross_attention=cfg.cross_attention) for _ in range(cfg.depth))
        self.blocks = nn.ModuleList(blocks)
        self.final = FinalLayer(width, cfg.patch_size, cfg.in_channels)
        # On a forked RNG (here and in reset_parameters), so that the other weights draw the same initial values
        # as a flow DiT's of the same seed, and the global stream is left where a flow DiT leaves it.
        self.interval_embed = None
        if cfg.end_time:
            with torch.random.fork_rng(devices=[]):
                self.interval_embed = TimestepEmbedder(width)
        self.reset_parameters()

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def end_time(self) -> bool:
        """A mean-flow model: it takes `t_end` and predicts the average velocity over [t, t_end]."""
        return self.interval_embed is not None

    def reset_parameters(self):
        interval = set() if self.interval_embed is None else set(self.interval_embed.modules())

        def _basic(m):
            if isinstance(m, nn.Linear) and m not in interval:
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
            if block.cross_attn is not None:  # cross-attention residual starts at zero too: identity blocks
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final.modulation[-1].weight)
        nn.init.zeros_(self.final.modulation[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)
        if self.interval_embed is not None:  # zero output: the model starts blind to t_end (see the module docstring)
            with torch.random.fork_rng(devices=[]):
                nn.init.normal_(self.interval_embed.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.interval_embed.mlp[0].bias)
            nn.init.zeros_(self.interval_embed.mlp[-1].weight)
            nn.init.zeros_(self.interval_embed.mlp[-1].bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        t_end: torch.Tensor | None = None,
        hidden_after: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The velocity [N, C, H, W]; with `hidden_after` = k also the tokens [N, T, D] after block k (REPA, fmcli/repa.py)."""
        if y is None:
            y = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        h = self.x_embed(x).flatten(2).transpose(1, 2)  # (N, T, D)
        h = h + self.pos_embed  # fp32 positions: under autocast the residual stream stays fp32 (as in DiT)
        c = self.t_embed(t) + self.y_embed(y)  # (N, D)
        if self.interval_embed is not None:
            c = c + self.interval_embed(t - t if t_end is None else t_end - t)  # the interval's length, as in MeanFlow
        elif t_end is not None:
            raise ValueError("t_end given to a flow DiT: only mean-flow models (model.end_time) take an end time")
        context, key_mask = None, None
        if self.cross_attention:
            if text is None:
                raise ValueError("this is a text-conditioned DiT: pass text (and text_mask); the empty prompt's states for unconditional")
            context = self.text_embed(text.to(h.dtype))
            key_mask = text_attention_mask(text_mask, text.shape[:2], x.device)
        hidden = None
        for k, block in enumerate(self.blocks, start=1):
            h = block(h, c, context, key_mask)
            if k == hidden_after:
                hidden = h
        out = self.unpatchify(self.final(h, c))
        out = velocity_from_data(out, x, t) if self.predicts_data else out
        return out if hidden_after is None else (out, hidden)

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
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32  # float64 for derivative checks
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=dtype) / half)
        args = 1000 * t.to(dtype)[:, None] * freqs[None]
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
        out = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(b, n, d).to(x.dtype))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA, in fp32 for bf16 inputs on the CPU when a backward will follow: PyTorch's CPU flash-attention
    backward in bf16 is several times slower than in fp32 (it was 45 % of a bf16 training step), while the GEMMs
    around it gain from bf16. CPU autocast would cast the inputs straight back to bf16, so it is switched off
    for this one call. Without gradients (sampling) the bf16 forward is the faster one (docs/benchmarks.md)."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled():
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def text_attention_mask(text_mask: torch.Tensor | None, shape, device) -> torch.Tensor | None:
    """Key-padding mask [B,L] (True = a real token) -> SDPA boolean attn_mask [B,1,1,L].

    A row with no real token (an empty prompt from a tokenizer without end-of-sequence token) attends to
    its first position rather than to nothing, which would give NaN.
    """
    if text_mask is None:
        return None
    mask = text_mask.to(device=device, dtype=torch.bool)
    if mask.shape != tuple(shape):
        raise ValueError(f"text_mask shape {tuple(mask.shape)} does not match the text states {tuple(shape)}")
    empty = ~mask.any(dim=1)
    if empty.any():
        mask = mask.clone()
        mask[empty, 0] = True
    return mask[:, None, None, :]


class CrossAttention(nn.Module):
    """Queries from the image tokens, keys and values from the text tokens; padding keys masked out."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        hd = d // self.heads
        q = self.q(x).reshape(b, n, self.heads, hd).transpose(1, 2)
        kv = self.kv(context).reshape(b, context.shape[1], 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        out = _sdpa(q, kv[0], kv[1], attn_mask=key_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d).to(x.dtype))


class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, cross_attention: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        # Only text models have these modules, so class models keep their state_dict keys.
        self.cross_norm = nn.LayerNorm(width, eps=1e-6) if cross_attention else None
        self.cross_attn = CrossAttention(width, heads) if cross_attention else None
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context=None, key_mask=None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_norm(x), context, key_mask)
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
