"""fmcli.images: GIF writing and labelled class grids (pixel-level checks, independent of the writer)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from fmcli.images import class_grid_image, grid_image, save_gif, trajectory_frames


def test_gif_frames_roundtrip(tmp_path):
    # Three flat frames (black, mid grey, white) survive GIF quantisation exactly.
    frames = [Image.new("RGB", (20, 10), (v, v, v)) for v in (0, 128, 255)]
    path = save_gif(frames, tmp_path / "a.gif", duration_ms=50, hold_last_ms=400)
    assert path.exists() and not list(tmp_path.glob(".*tmp*"))
    gif = Image.open(path)
    assert gif.n_frames == 3 and gif.size == (20, 10)
    values = []
    for k in range(3):
        gif.seek(k)
        values.append(int(np.asarray(gif.convert("RGB"))[5, 10, 0]))
        assert gif.info["duration"] == (400 if k == 2 else 50)
    assert values == [0, 128, 255]


def test_trajectory_frames_show_each_time_under_the_grid():
    x = torch.zeros(4, 3, 8, 8)
    frames = trajectory_frames([(0.0, x - 1), (1.0, x + 1)], nrow=2)
    grid = grid_image(x, nrow=2)
    assert len(frames) == 2 and frames[0].height > grid.height and frames[0].width == grid.width
    top0, top1 = np.asarray(frames[0])[: grid.height], np.asarray(frames[1])[: grid.height]
    # Samples are untouched by the label: a -1 image is black and a +1 image white inside the cells.
    assert top0[3, 3].tolist() == [0, 0, 0] and top1[3, 3].tolist() == [255, 255, 255]
    assert np.asarray(frames[0])[grid.height :].max() > 200  # the time label is drawn in the strip


def test_class_grid_rows_are_classes_with_names_in_the_margin():
    k, per, size, pad = 3, 4, 8, 2
    # Class c's samples are a flat value that identifies the row.
    levels = torch.tensor([-1.0, 0.0, 1.0])
    x = levels.repeat_interleave(per).view(-1, 1, 1, 1).expand(k * per, 3, size, size).clone()
    img = class_grid_image(x, per, ["zero", "one", "two-long-name"], padding=pad)
    grid = grid_image(x, nrow=per, padding=pad)
    margin = img.width - grid.width
    assert margin > 0 and img.height == grid.height == pad + k * (size + pad)
    arr = np.asarray(img)
    for c, expected in enumerate((0, 128, 255)):
        top = pad + c * (size + pad) + size // 2
        row = arr[top, margin + pad : margin + pad + size, 0]
        assert np.all(np.abs(row.astype(int) - expected) <= 1)
        # Some dark text pixels in this row's margin.
        assert arr[pad + c * (size + pad) : pad + c * (size + pad) + size, :margin].min() < 128
