"""The built-in `shapes` source: procedural, labelled and captioned, the zero-download default.

Coloured geometric shapes, one class per shape, random colour, background, position and scale, with a
caption for each image. The readers for real datasets live in readers.py; prepare.py runs them all.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from ..shapes_vocab import BACKGROUNDS, COLOURS, SHAPE_NAMES, caption
from .decode import Record
from .dataset import PreparedWriter
from .readers import Source

# Bumped whenever the same (size, count, seed) would draw different images; recorded in the manifest so
# `fm train` re-makes its auto-prepared data/shapes-* directory when it came from an older generator.
GENERATOR_VERSION = 2  # 2: radius 0.3-0.45 of the image (1: 0.22-0.4)
SUPERSAMPLE = 4  # draw large, downsample with antialiasing: smooth edges at 32x32


def prepare_shapes(
    out: str | Path,
    *,
    size: int = 32,
    count: int = 20000,
    seed: int = 0,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write `count` shapes images of `size` x `size`; identical output for the same seed."""
    with PreparedWriter(out, count, (3, size, size), labels=True, captions=True, force=force) as writer:
        for i, (image, label, caption) in enumerate(generate_shapes(size, count, seed)):
            writer.add(image, label, caption)
            if progress is not None and (i + 1) % 500 == 0:
                progress(500)
        return writer.finish(**_shapes_manifest(seed))


def shapes_source(*, size: int = 32, count: int = 20000, seed: int = 0) -> Source:
    """The shapes generator as a `fm prepare-data` source (records are pixel arrays at `size`)."""

    def records() -> Iterator[Record]:
        for i, (image, label, caption) in enumerate(generate_shapes(size, count, seed)):
            yield Record(f"shapes[{i}]", image, label, caption)

    info = {k: v for k, v in _shapes_manifest(seed).items() if k not in ("num_classes", "class_names", "source")}
    return Source("shapes", records, 3, count, list(SHAPE_NAMES), captions=True, info=info, native_size=size)


def generate_shapes(size: int, count: int, seed: int) -> Iterator[tuple[np.ndarray, int, str]]:
    """`count` (image [3,size,size] uint8, label, caption), a pure function of (size, count, seed)."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield render_shape(rng, size)


def _shapes_manifest(seed: int) -> dict:
    return {"num_classes": len(SHAPE_NAMES), "class_names": SHAPE_NAMES, "source": "shapes", "seed": seed, "generator_version": GENERATOR_VERSION}


def render_shape(rng: np.random.Generator, size: int) -> tuple[np.ndarray, int, str]:
    """One image [3,size,size] uint8, its class index and its caption."""
    label = int(rng.integers(len(SHAPE_NAMES)))
    fg_name = list(COLOURS)[rng.integers(len(COLOURS))]
    bg_choices = [b for b in BACKGROUNDS if b != fg_name]
    bg_name = bg_choices[rng.integers(len(bg_choices))]
    big = size * SUPERSAMPLE
    bg = np.array(BACKGROUNDS[bg_name], dtype=np.float32)
    # A gentle vertical gradient so backgrounds are not flat.
    ramp = np.linspace(-1, 1, big, dtype=np.float32)[:, None, None] * rng.uniform(0, 25)
    canvas = np.clip(bg[None, None, :] + ramp, 0, 255).astype(np.uint8).repeat(big, axis=1)
    img = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(img)
    radius = rng.uniform(0.3, 0.45) * big  # large enough for outlines at patch 4: the quickstart DiT learns them in 10 CPU minutes
    cx = rng.uniform(radius, big - radius)
    cy = rng.uniform(radius, big - radius)
    angle = rng.uniform(0, 2 * math.pi) if SHAPE_NAMES[label] in ("triangle", "star", "hexagon") else 0.0
    _draw(draw, SHAPE_NAMES[label], cx, cy, radius, angle, COLOURS[fg_name], tuple(int(v) for v in bg))
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(img).transpose(2, 0, 1).copy(), label, caption(fg_name, SHAPE_NAMES[label], bg_name)


def _polygon(cx, cy, r, n, angle, inner=None):
    pts = []
    steps = n * 2 if inner else n
    for k in range(steps):
        rad = (inner if inner and k % 2 else r) if inner else r
        a = angle + 2 * math.pi * k / steps - math.pi / 2
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _draw(draw: ImageDraw.ImageDraw, name, cx, cy, r, angle, fg, bg):
    box = (cx - r, cy - r, cx + r, cy + r)
    if name == "circle":
        draw.ellipse(box, fill=fg)
    elif name == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fg)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, angle), fill=fg)
    elif name == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)], fill=fg)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, r, 5, angle, inner=0.45 * r), fill=fg)
    elif name == "cross":
        w = 0.32 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fg)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fg)
    elif name == "ring":
        draw.ellipse(box, fill=fg)
        s = 0.55 * r
        draw.ellipse((cx - s, cy - s, cx + s, cy + s), fill=bg)
    elif name == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, angle), fill=fg)
    elif name == "crescent":
        draw.ellipse(box, fill=fg)
        off = 0.45 * r
        draw.ellipse((cx - r + off, cy - r - 0.1 * r, cx + r + off, cy + r - 0.1 * r), fill=bg)
    elif name == "heart":
        lobe = 0.5 * r
        draw.ellipse((cx - r, cy - r * 0.75, cx, cy - r * 0.75 + 2 * lobe), fill=fg)
        draw.ellipse((cx, cy - r * 0.75, cx + r, cy - r * 0.75 + 2 * lobe), fill=fg)
        draw.polygon([(cx - r * 0.97, cy - r * 0.1), (cx + r * 0.97, cy - r * 0.1), (cx, cy + r)], fill=fg)
    else:
        raise ValueError(f"unknown shape {name!r}")
