"""Feature spaces for the fidelity metrics: an in-domain classifier, DINOv2, and evaluate.py's Inception/tiny.

- `domain`: a small CNN that fm trains once on the prepared dataset's own labelled images (its penultimate
  128-D activations are the features, its predictions give the conditional accuracy). For data unlike
  ImageNet (shapes, digits) Inception's features measure the wrong things; a classifier of the data itself
  sees the classes. It trains in seconds on a CPU, is deterministic for a seed, and is cached beside the
  dataset (DATA/fm-classifier-sSEED.pt) with a key of the dataset manifest, the seed and the architecture:
  a cache whose key differs is rebuilt (or refused at a path the user gave), never trusted blindly.
- `dinov2`: the CLS token of transformers' `Dinov2Model` from a local directory (FD-DINOv2, Stein et al.
  2023): images resized bicubically to the model's size and normalised with ImageNet's mean and std.
- `inception`, `tiny`, `module:factory`: evaluate.build_extractor.

Every extractor maps uint8 [B,3,H,W] to float64 [B,D] and has a `name` and an `input_size`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .classifier import CLASSIFIER_ARCH, CLASSIFIER_STEPS, DomainCNN, TrainedClassifier, load_or_train_classifier, to_input  # noqa: F401 (fm's API)
from .errors import UsageError

SPACES = ("domain", "inception", "dinov2", "tiny")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_space(spec: str, *, data: Path | None, device, classifier: str | None = None, seed: int = 0, steps: int | None = None,
                inception: str | None = None, inception_unverified: bool = False, dinov2: str | None = None, log=None):
    """The extractor of one feature space (`domain` needs the labelled prepared dataset `data`)."""
    from .evaluate import build_extractor

    if spec == "domain":
        if data is None:
            raise UsageError("the domain features are a classifier trained on a prepared dataset: give --data DIR")
        return domain_extractor(Path(data), seed=seed, steps=steps or CLASSIFIER_STEPS, path=classifier, device=device, log=log)
    if spec == "dinov2":
        return Dinov2Extractor(resolve_dinov2_path(dinov2), device)
    # fm eval (the one caller of these spaces here) has no --inception-unverified: its refusal must not advise one.
    return build_extractor(spec, inception=inception, device=device, unverified=inception_unverified, unverified_option=None)


class DomainExtractor:
    """The in-domain classifier as a feature extractor; also predicts classes (conditional accuracy)."""

    input_size = None  # native resolution: images are fed as the dataset stores them

    def __init__(self, trained: TrainedClassifier, in_channels: int, device):
        self.model = trained.model.to(device)
        self.trained, self.in_channels, self.device = trained, in_channels, torch.device(device)
        self.name = f"{CLASSIFIER_ARCH}-{trained.key[:12]}"  # statistics of different classifiers never mix

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.model.body(self._input(images)).double().cpu().numpy()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.model(self._input(images)).argmax(1).cpu().numpy()

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1 and images.shape[1] == 3:  # evaluate.to_rgb repeated the grey channel
            images = images[:, :1]
        return to_input(images).to(self.device)


def domain_extractor(data: Path, *, seed: int = 0, steps: int = CLASSIFIER_STEPS, path: str | None = None, device="cpu", log=None) -> DomainExtractor:
    from .data.dataset import read_manifest

    trained = load_or_train_classifier(data, seed=seed, steps=steps, path=path, log=log)
    return DomainExtractor(trained, read_manifest(data)["shape"][0], device)


# --------------------------------------------------------------------------------------------- DINOv2


def resolve_dinov2_path(path: str | None) -> Path:
    """--dinov2 DIR, else $FM_DINOV2: a local transformers Dinov2Model directory (config.json + weights)."""
    path = path or os.environ.get("FM_DINOV2")
    if not path:
        raise UsageError(
            "DINOv2 weights not given: pass --dinov2 DIR or set FM_DINOV2 to a local transformers Dinov2Model directory "
            "(e.g. once, online: huggingface-cli download facebook/dinov2-base --local-dir weights/dinov2-base)"
        )
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise UsageError(f"--dinov2 {p} is not a transformers model directory (no config.json); download facebook/dinov2-base there")
    return p


class Dinov2Extractor:
    """The CLS token (after the final layer norm) of a local DINOv2, as FD-DINOv2 uses it."""

    def __init__(self, path: Path, device):
        from transformers import Dinov2Model

        try:
            self.model = Dinov2Model.from_pretrained(str(path), local_files_only=True).to(device).eval()
        except (OSError, ValueError) as err:
            raise UsageError(f"--dinov2 {path}: cannot load a Dinov2Model ({type(err).__name__}: {str(err).splitlines()[0]})") from None
        self.device = torch.device(device)
        self.input_size = int(self.model.config.image_size)
        self.name = f"dinov2-{path.name}-{self.model.config.hidden_size}"
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = images.to(self.device, torch.float32) / 255.0
        x = F.interpolate(x, size=(self.input_size,) * 2, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        out = self.model(pixel_values=(x - self.mean) / self.std)
        return out.pooler_output.double().cpu().numpy()
