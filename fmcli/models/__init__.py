"""Model construction from a validated ModelConfig."""

from __future__ import annotations

import torch.nn as nn


def build_model(model_cfg) -> nn.Module:
    """Build the backbone named by `model_cfg.arch` (its data-dependent fields must be resolved)."""
    if model_cfg.arch == "dit":
        from .dit import DiT

        return DiT(model_cfg)
    if model_cfg.arch == "unet":
        from .unet import UNet

        return UNet(model_cfg)
    from ..errors import UsageError

    raise UsageError(f"model.arch={model_cfg.arch!r} is not available in this version (use 'dit')")


def build_bench_model(model_cfg, impl: str = "fm") -> nn.Module:
    """Our model, or diffusers' DiTTransformer2DModel configured to the same size behind the same contract."""
    if impl == "fm":
        return build_model(model_cfg)
    if impl == "diffusers":
        from .diffusers_dit import DiffusersDiT

        return DiffusersDiT(model_cfg)
    from ..errors import UsageError

    raise UsageError(f"unknown model implementation {impl!r}")
