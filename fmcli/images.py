"""Image output: tensors in [-1, 1] to uint8, PNG grids, class grids, trajectory GIFs (atomic writes)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .fsutil import atomic_write


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B,C,H,W] in [-1, 1] -> [B,H,W,C] uint8 (grayscale kept as one channel)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def grid_image(x: torch.Tensor, nrow: int | None = None, padding: int = 2) -> Image.Image:
    # Imported here: torchvision's package import pulls in torch._dynamo (~1.3 s), which a command that makes no grid
    # and compiles nothing (fm eval, fm fid, fm bench --no-compile) never needs.
    from torchvision.utils import make_grid

    nrow = nrow or max(1, int(np.ceil(np.sqrt(x.shape[0]))))
    grid = make_grid(x.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=padding, value_range=(-1, 1), normalize=True)
    arr = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def save_image_atomic(image: Image.Image, path: str | Path, durable: bool = True, **save_kwargs) -> Path:
    """Write to a temp file beside the target and rename: a reader never sees a half-written image."""
    path = Path(path)
    return atomic_write(path, lambda tmp: image.save(tmp, format=_format_of(path), **save_kwargs), durable=durable)


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    return save_image_atomic(grid_image(x, nrow), path)


def save_images(x: torch.Tensor, directory: str | Path, start_index: int = 0, prefix: str = "") -> list[Path]:
    """One PNG per sample, named by its global sample index (stable across batch sizes and ranks)."""
    paths = []
    for k, arr in enumerate(to_uint8(x)):
        img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        # Atomic but not fsynced: an fsync per file costs ~9 ms here (7 min for 50k FID samples), and a
        # sample lost in a power cut is regenerated bit-identically from (seed, index).
        paths.append(save_image_atomic(img, sample_file(directory, start_index + k, prefix), durable=False))
    return paths


def sample_file(directory: str | Path, index: int, prefix: str = "") -> Path:
    """Where sample `index` is written in an output directory (its global index: stable across ranks)."""
    return Path(directory) / f"{prefix}{index:06d}.png"


# `fm sample --out DIR` writes its grid beside the samples under this name; scoring a folder skips it there.
SAMPLE_GRID_NAME = "grid.png"
# ... and the settings its samples were made with, so that the same command run again continues an interrupted run.
SAMPLE_MANIFEST_NAME = "fm-sample.json"
_SAMPLE_NAME = re.compile(r"\d{6}\.png")  # sample_file's names (no prefix)


def is_sample_grid(path: str | Path) -> bool:
    """Whether `path` is the grid that `fm sample --out DIR` wrote: named SAMPLE_GRID_NAME, beside at least
    one sample file (NNNNNN.png). A grid.png among other images is an ordinary image."""
    path = Path(path)
    return path.name == SAMPLE_GRID_NAME and any(_SAMPLE_NAME.fullmatch(p.name) for p in path.parent.iterdir())


# The file types fm writes, by extension (PIL format names); anything else is written as PNG.
WRITE_FORMATS = {".png": "PNG", ".gif": "GIF", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
STILL_IMAGE_SUFFIXES = tuple(ext for ext, fmt in WRITE_FORMATS.items() if fmt != "GIF")


def _format_of(path: Path) -> str:
    return WRITE_FORMATS.get(path.suffix.lower(), "PNG")


def save_gif(frames: list[Image.Image], path: str | Path, duration_ms: int = 120, hold_last_ms: int = 1000) -> Path:
    """An animated GIF (looping; the last frame held longer), written atomically like every image."""
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    frames = [f.convert("RGB") for f in frames]
    durations = [duration_ms] * (len(frames) - 1) + [hold_last_ms]
    return save_image_atomic(frames[0], path, save_all=True, append_images=frames[1:], duration=durations, loop=0, optimize=False)


def trajectory_frames(trajectory: list[tuple[float, torch.Tensor]], nrow: int | None = None) -> list[Image.Image]:
    """One grid image per captured (t, x_t), with t written in a strip under the grid (never over samples)."""
    from PIL import ImageDraw

    frames = []
    for t, x in trajectory:
        grid = grid_image(x, nrow).convert("RGB")
        frame = Image.new("RGB", (grid.width, grid.height + 14), (0, 0, 0))
        frame.paste(grid, (0, 0))
        ImageDraw.Draw(frame).text((2, grid.height + 1), f"t={t:.2f}", fill=(255, 255, 255))
        frames.append(frame)
    return frames


def class_grid_image(x: torch.Tensor, per_class: int, class_names: list[str], padding: int = 2) -> Image.Image:
    """Rows of `per_class` samples, one row per class (x is ordered class by class), names in a left margin."""
    from PIL import ImageDraw, ImageFont

    grid = grid_image(x, nrow=per_class, padding=padding).convert("RGB")
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(grid)
    margin = max(probe.textbbox((0, 0), name, font=font)[2] for name in class_names) + 8
    out = Image.new("RGB", (grid.width + margin, grid.height), (255, 255, 255))
    out.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(out)
    row_h = x.shape[-2] + padding
    for k, name in enumerate(class_names):
        top = padding + k * row_h
        box = draw.textbbox((0, 0), name, font=font)
        draw.text((margin - 4 - box[2], top + (x.shape[-2] - box[3]) // 2), name, fill=(0, 0, 0), font=font)
    return out
