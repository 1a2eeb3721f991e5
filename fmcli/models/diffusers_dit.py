"""diffusers' DiTTransformer2DModel behind fm's model contract (the `fm bench --compare diffusers` baseline)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UsageError


class DiffusersDiT(nn.Module):
    """diffusers' class-conditional DiTTransformer2DModel behind fm's contract `model(x, t, y=None)`.

    Same width, depth, heads, patch and input; out_channels = in_channels (no learned sigma); its label
    table has a row for the null class (index num_classes) because class_dropout_prob > 0. Its timestep
    embedding expects the 0..1000 scale, so t in [0, 1] is multiplied by 1000 (as our DiT does inside).
    """

    def __init__(self, model_cfg):
        super().__init__()
        from diffusers import DiTTransformer2DModel

        m = model_cfg
        if m.mlp_ratio != 4.0:
            raise UsageError("--compare diffusers needs model.mlp_ratio=4 (diffusers' DiT has a fixed 4x MLP)")
        if m.cross_attention:
            raise UsageError("--compare diffusers supports class-conditional DiTs only (no cross-attention)")
        self.num_classes = m.num_classes
        self.inner = DiTTransformer2DModel(
            num_attention_heads=m.heads,
            attention_head_dim=m.hidden_size // m.heads,
            in_channels=m.in_channels,
            out_channels=m.in_channels,
            num_layers=m.depth,
            sample_size=m.image_size,
            patch_size=m.patch_size,
            num_embeds_ada_norm=max(1, m.num_classes),
            activation_fn="gelu-approximate",
            norm_type="ada_norm_zero",
            norm_elementwise_affine=False,
            dropout=0.0,
        )

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        return self.inner(x, timestep=t * 1000, class_labels=y).sample
