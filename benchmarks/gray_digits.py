"""A digits-shaped prepared dataset (1 channel, 28x28, 10 classes) made from the built-in shapes, offline.

MNIST's shape without MNIST: the shapes generator drawn at 28x28 and turned to grey (channel mean), so the
training loop and `fm bench` can be compared at the digits' shape (49 tokens at patch 4) on any machine.

    python benchmarks/gray_digits.py --out data/gray28 --count 20000
    fm train --preset quickstart --data data/gray28 ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def make_gray_digits(out: Path, count: int = 20000, size: int = 28, seed: int = 0, force: bool = False) -> Path:
    """`count` grey shapes [1, size, size] uint8 with their class labels, as a prepared dataset at `out`."""
    from fmcli.data.dataset import PreparedWriter
    from fmcli.data.shapes import SHAPE_NAMES, generate_shapes

    with PreparedWriter(out, count, (1, size, size), labels=True, force=force) as writer:
        for image, label, _ in generate_shapes(size, count, seed):
            writer.add(image.astype(np.float32).mean(0, keepdims=True).round().astype(np.uint8), label)
        return writer.finish(num_classes=len(SHAPE_NAMES), class_names=SHAPE_NAMES, source="mnist")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    a = p.parse_args()
    print(make_gray_digits(a.out, a.count, a.size, a.seed, a.force))


if __name__ == "__main__":
    main()
