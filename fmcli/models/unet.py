"""A thin wrapper over the diffusers U-Nets with fm's model contract.

`UNet2DModel` for class-conditional or unconditional models (the class embedding has one extra row,
index `num_classes`, the null class for CFG dropout), `UNet2DConditionModel` for text models
(`model.cross_attention`): cross-attention to the text states with the padding mask. Time t in [0, 1]
is passed as the diffusers timestep 1000 t (the range its sinusoidal embedding is tuned for).
Contract: `model(x [B,C,H,W], t [B], y [B] | None, text [B,L,D] | None, text_mask [B,L] | None) -> velocity`.
Sizes: base channels = model.hidden_size, one level per model.channel_mult entry, each level but the
last halves the resolution (so image_size must be divisible by 2^(levels - 1)). Attention (every level but the
first, and the middle): a text U-Net has model.heads heads at every level; a class U-Net, as UNet2DModel counts,
hidden_size / heads channels per head, so heads * m heads at a level of multiplier m.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..flow import velocity_from_data
from .dit import text_attention_mask

TIMESTEP_SCALE = 1000.0


class UNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.image_size is None or cfg.in_channels is None or cfg.num_classes is None:
            raise ValueError("model.image_size, in_channels and num_classes must be resolved before building")
        levels = len(cfg.channel_mult)
        if cfg.image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size {cfg.image_size} is not divisible by 2^{levels - 1} (model.channel_mult has {levels} levels)")
        channels = tuple(cfg.hidden_size * m for m in cfg.channel_mult)
        common = dict(
            sample_size=cfg.image_size,
            in_channels=cfg.in_channels,
            out_channels=cfg.in_channels,
            block_out_channels=channels,
            layers_per_block=cfg.layers_per_block,
            norm_num_groups=math.gcd(32, *channels),
        )
        self.num_classes = cfg.num_classes
        self.predicts_data = cfg.prediction == "data"  # the output is x1; forward returns its velocity (flow.py)
        self.cross_attention = cfg.cross_attention
        if cfg.cross_attention:
            from diffusers import UNet2DConditionModel

            if cfg.text_dim is None:
                raise ValueError("model.text_dim must be resolved (from the text encoder) before building")
            self.net = UNet2DConditionModel(
                down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
                up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
                cross_attention_dim=cfg.text_dim,
                attention_head_dim=cfg.heads,  # diffusers' legacy name: here it is the number of heads
                **common,
            )
        else:
            from diffusers import UNet2DModel

            self.net = UNet2DModel(
                down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (levels - 1),
                up_block_types=("AttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
                attention_head_dim=max(1, cfg.hidden_size // cfg.heads),  # channels per head
                num_class_embeds=cfg.num_classes + 1,  # + the null class
                **common,
            )

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, x, t, y=None, text=None, text_mask=None):
        timestep = t.float() * TIMESTEP_SCALE
        if self.cross_attention:
            if text is None:
                raise ValueError("this is a text-conditioned U-Net: pass text (and text_mask); the empty prompt's states for unconditional")
            mask = text_attention_mask(text_mask, text.shape[:2], x.device)
            mask = mask[:, 0, 0, :] if mask is not None else None
            out = self.net(x, timestep, encoder_hidden_states=text.to(x.dtype), encoder_attention_mask=mask).sample
        else:
            if y is None:
                y = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
            out = self.net(x, timestep, class_labels=y).sample
        return velocity_from_data(out, x, t) if self.predicts_data else out
