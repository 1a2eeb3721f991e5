"""Representation alignment (REPA; Yu et al. 2025, "Representation Alignment for Generation"): while training,
the DiT's hidden tokens after block `repa.depth` go through a small trainable projector and are pulled, by
negative cosine similarity, toward a frozen encoder's features of the clean image at the same place. The
network learns what the data's images are made of from an encoder that already knows, instead of from the
denoising loss alone; sampling, the EMA and exports are unchanged (the projector is for training only).

The encoder (`repa.encoder = "domain"`) is fm's in-domain classifier (fmcli.classifier.DomainCNN, trained once
on the dataset's own labelled images and cached beside it) with its pooling and head removed: a 128-channel map
at 1/8 of the image size (or its 64-channel map at 1/4, `repa.feature_stride = 4`), brought to the DiT's token
grid. iREPA (Singh et al. 2025, "What matters for representation alignment") found that the target's spatial
structure is what transfers, and changed two things, both options here: a 3x3 convolution over the token grid as
the projector (`repa.projector = "conv"`) and the target standardised per image and channel over its tokens
(`repa.spatial_norm`). Its seed (`repa.seed`, default 1) differs from the
one `fm eval` scores with (0), so a run is not measured in the very features it was pulled toward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataclasses import dataclass

from .config import Config
from .errors import UsageError


@dataclass
class Encoder:
    module: nn.Module  # images in [-1, 1] [N, C, H, W] -> a feature map [N, D, h, w]
    key: str  # what its weights are (the classifier cache's key): a resume checks it is the run's own


class AlignedNet(nn.Module):
    """The network and its REPA projector as one module for the training forward, so that DDP averages both
    modules' gradients and torch.compile compiles both: returns (the network's output, projected tokens)."""

    def __init__(self, net: nn.Module, projector: nn.Module, depth: int):
        super().__init__()
        self.net, self.projector, self.depth = net, projector, depth

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        out, hidden = self.net(x, t, hidden_after=self.depth, **cond)
        return out, self.projector(hidden)


class ConvProjector(nn.Module):
    """iREPA's projector: one 3x3 convolution over the (square, row-major) token grid, [N, T, width] -> [N, T, D]."""

    def __init__(self, width: int, feature_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(width, feature_dim, 3, padding=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, count, width = tokens.shape
        grid = int(round(count**0.5))
        out = self.conv(tokens.transpose(1, 2).reshape(n, width, grid, grid))
        return out.flatten(2).transpose(1, 2)


def build_projector(kind: str, width: int, feature_dim: int, hidden: int = 256) -> nn.Module:
    """REPA's projector (`repa.projector`): "mlp", the paper's 3-layer MLP with SiLU per token (narrower for fm's
    small models), or "conv", iREPA's 3x3 convolution over the token grid."""
    if kind == "conv":
        return ConvProjector(width, feature_dim)
    return nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, feature_dim))


def spatially_normalised(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[N, T, D] features standardised per image and channel over the T tokens (iREPA's spatial normalisation):
    what is left is how each channel varies across the image, not its image-wide level."""
    return (target - target.mean(dim=1, keepdim=True)) / (target.std(dim=1, keepdim=True) + eps)


class Alignment:
    """The frozen encoder, the trainable projector and the loss of one run (`TrainingStep.align`)."""

    def __init__(self, cfg: Config, encoder: Encoder, device: torch.device):
        self.weight, self.key, self.spatial_norm = cfg.repa.weight, encoder.key, cfg.repa.spatial_norm
        self.encoder = encoder.module.to(device).float().eval().requires_grad_(False)
        with torch.no_grad():  # the feature width, read off the encoder itself
            size, channels = cfg.model.image_size, cfg.model.in_channels
            dim = self.encoder(torch.zeros(1, channels, size, size, device=device)).shape[1]
        with torch.random.fork_rng(devices=[]):  # its own draw: the network's weights and the global RNG stay a run's without REPA
            torch.manual_seed(cfg.train.seed + 1)
            self.projector = build_projector(cfg.repa.projector, cfg.model.hidden_size, dim).to(device)

    def load_state_dict(self, state: dict | None) -> None:
        """The projector of a checkpoint, refused when the checkpoint trained without REPA or with another encoder."""
        if state is None:
            raise UsageError("this checkpoint was trained without REPA, and the run now has repa.encoder set: resume it as it was trained")
        if state["encoder_key"] != self.key:
            raise UsageError("the REPA classifier found now is not the one this run trained with (its cache was retrained or replaced): "
                             "give the run's own with --set repa.classifier=PATH")
        self.projector.load_state_dict(state["projector"])

    def loss(self, projected: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """weight * (1 - mean cosine similarity) between the projected tokens [N, T, D] and the encoder's
        features of the clean images x1 at the tokens' places; 0 when they point the same way."""
        with torch.no_grad(), torch.autocast(x1.device.type, enabled=False):
            target = on_token_grid(self.encoder(x1.float()), int(round(projected.shape[1] ** 0.5)))
            if self.spatial_norm:
                target = spatially_normalised(target)
        cosine = F.cosine_similarity(projected.float(), target, dim=-1)
        return self.weight * (1.0 - cosine.mean())


def on_token_grid(features: torch.Tensor, grid: int) -> torch.Tensor:
    """[N, C, h, w] feature map -> [N, grid * grid, C] in the DiT's token order (row-major): each token takes
    the encoder cell its centre lies in (a coarser map repeats), or the mean of the cells it covers (a finer one)."""
    if features.shape[-1] < grid:  # "nearest-exact" samples at token centres; "nearest" at their left edges, which
        # picks the wrong cell where the grid is not a multiple of the map (48x48 at patch 6: 6 cells, 8 tokens)
        features = F.interpolate(features, size=(grid, grid), mode="nearest-exact")
    elif features.shape[-1] > grid:
        features = F.adaptive_avg_pool2d(features, grid)
    return features.flatten(2).transpose(1, 2)


def domain_encoder(trained_model: nn.Module, stride: int = 8) -> nn.Module:
    """The classifier's convolutional body up to its map at 1/`stride` of the image (`repa.feature_stride`):
    8 = all of it without the pooling, [N, 128, H/8, W/8]; 4 = its first three layers, [N, 64, H/4, W/4]."""
    layers = [m for m in trained_model.body if not isinstance(m, (nn.AdaptiveAvgPool2d, nn.Flatten))]
    keep, scale = [], 1
    for m in layers:
        if isinstance(m, nn.Conv2d):
            if scale * m.stride[0] > stride:  # the deepest map at 1/stride is reached: this convolution is coarser
                break
            scale *= m.stride[0]
        keep.append(m)
    return nn.Sequential(*keep)


def load_encoder(cfg: Config, log=None, *, resuming: bool = False) -> Encoder:
    """The run's frozen encoder: the domain classifier of cfg.data.path (trained and cached on first use). An error
    advises turning REPA off only to a fresh run: a resume refuses that change (it trained with REPA)."""
    from .classifier import load_or_train_classifier

    try:
        trained = load_or_train_classifier(cfg.data.path, seed=cfg.repa.seed, path=cfg.repa.classifier, log=log,
                                           option="repa.classifier", elsewhere="--set repa.classifier=PATH", unlabelled="")
    except UsageError as err:
        off = "" if resuming else "; or train without REPA: --set repa.encoder=none"
        raise UsageError(f"repa.encoder='domain': {err}{off}") from None
    return Encoder(domain_encoder(trained.model, cfg.repa.feature_stride), trained.key)


def untrained_encoder(cfg: Config) -> Encoder:
    """An encoder of the domain classifier's shape with its initial weights: what a step costs (fm bench, the
    micro-batch autotune) does not depend on the weights."""
    from .classifier import DomainCNN

    return Encoder(domain_encoder(DomainCNN(cfg.model.in_channels, max(2, cfg.model.num_classes or 2)), cfg.repa.feature_stride), "untrained")
