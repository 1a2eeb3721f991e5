"""Image output: tensors in [-1, 1] to uint8, PNG grids, class grids, trajectory GIFs (atomic writes)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B,C,H,W] in [-1, 1] -> [B,H,W,C] uint8 (grayscale kept as one channel)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def grid_image(x: torch.Tensor, nrow: int | None = None, padding: int = 2) -> Image.Image:
    nrow = nrow or max(1, int(np.ceil(np.sqrt(x.shape[0]))))
    grid = make_grid(x.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=padding, value_range=(-1, 1), normalize=True)
    arr = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def save_image_atomic(image: Image.Image, path: str | Path, **save_kwargs) -> Path:
    """Write to a temp file beside the target and rename: a reader never sees a half-written image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        image.save(tmp, format=_format_of(path), **save_kwargs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    return save_image_atomic(grid_image(x, nrow), path)


def save_images(x: torch.Tensor, directory: str | Path, start_index: int = 0, prefix: str = "") -> list[Path]:
    """One PNG per sample, named by its global sample index (stable across batch sizes and ranks)."""
    paths = []
    for k, arr in enumerate(to_uint8(x)):
        img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        paths.append(save_image_atomic(img, Path(directory) / f"{prefix}{start_index + k:06d}.png"))
    return paths


def _format_of(path: Path) -> str:
    ext = path.suffix.lower()
    return {".png": "PNG", ".gif": "GIF", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(ext, "PNG")
