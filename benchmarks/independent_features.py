"""A second opinion on `fm eval`'s domain metrics, from a classifier fm never trains with.

REPA (`repa.encoder = "domain"`) pulls a model's hidden tokens toward the features of fm's domain classifier
(seed 1), and `fm eval` scores in the features of the same architecture (seed 0). A gain in those numbers could
then be a gain in looking right *to that kind of network* only. This script trains a classifier of another
architecture (VGG-style: 3x3 convolutions, ReLU, max-pooling, no batch norm, dropout; Adam, a different seed and
schedule) on the same training images, and reports, for each checkpoint, conditional accuracy, FD and
precision/recall/coverage (k = 5) in its features next to the real-vs-real floor (two disjoint real halves).

    PYTHONPATH=$PWD python benchmarks/independent_features.py --data D --ckpt RUN_A --ckpt RUN_B [-n 1000]

Samples: `fm eval`'s default sampling of each checkpoint (its own sample.* settings), n images with classes
n / K of each of the K classes, seed 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fmcli.data.dataset import read_manifest
from fmcli.fidelity import split_halves
from fmcli.metrics import accuracy, frechet_distance_of, prdc


class VGGish(nn.Module):
    def __init__(self, channels: int, classes: int):
        super().__init__()

        def stage(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]

        self.body = nn.Sequential(*stage(channels, 24), *stage(24, 48), *stage(48, 96), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(96, classes))

    def forward(self, x):
        return self.head(self.body(x))


def to_input(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).float() / 127.5 - 1.0


def train(x: np.ndarray, y: np.ndarray, classes: int, steps: int, seed: int = 7) -> tuple[VGGish, float]:
    torch.manual_seed(seed)
    g = np.random.default_rng(seed)
    order = g.permutation(len(x))
    held = order[: min(2000, len(x) // 10)]
    rest = order[len(held):]
    net = VGGish(x.shape[1], classes)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    net.train()
    for _ in range(steps):
        idx = g.choice(rest, 128)
        loss = F.cross_entropy(net(to_input(x[idx])), torch.from_numpy(y[idx]).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    return net, float((predict(net, x[held])[1] == y[held]).mean())


@torch.no_grad()
def predict(net: VGGish, x: np.ndarray, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
    feats, labels = [], []
    for i in range(0, len(x), batch):
        h = net.body(to_input(x[i : i + batch]))
        feats.append(h.double().numpy())
        labels.append(net.head(h).argmax(1).numpy())
    return np.concatenate(feats), np.concatenate(labels)


def samples_of(ckpt: str, n: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """n // classes samples of every class at the checkpoint's own sampling settings (seed 0), as uint8 [N, C, H, W]."""
    from fmcli.generate import class_grid_samples, load_for_sampling, prepare_for_sampling
    from fmcli.images import to_uint8

    device = torch.device("cpu")
    loaded = load_for_sampling(ckpt, device)
    loaded = prepare_for_sampling(loaded, loaded.config.sample, device, lambda line: print(line, file=sys.stderr))
    per_class = n // classes
    x, _ = class_grid_samples(loaded, per_class, seed=0, sample_cfg=loaded.config.sample, batch_size=250, device=device)
    return to_uint8(x).transpose(0, 3, 1, 2), np.repeat(np.arange(classes), per_class)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--ckpt", action="append", required=True)
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--cache", default=None, help="save the classifier here, or load it if the file exists (the same one for several calls)")
    args = ap.parse_args()
    start = time.perf_counter()
    manifest = read_manifest(Path(args.data))
    x, y = np.load(Path(args.data) / "x.npy", mmap_mode="r"), np.load(Path(args.data) / "y.npy")
    classes = manifest["num_classes"]
    if args.cache and Path(args.cache).exists():
        net, held_out = VGGish(x.shape[1], classes), None
        blob = torch.load(args.cache, weights_only=True)
        net.load_state_dict(blob["state"])
        net.eval()
        held_out = blob["held_out"]
    else:
        net, held_out = train(np.asarray(x), y, classes, args.steps)
        if args.cache:
            torch.save({"state": net.state_dict(), "held_out": held_out}, args.cache)
    print(f"independent classifier: held-out accuracy {held_out:.4f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    a, b = split_halves(len(x), 0)
    n = min(args.n, len(a), len(b))
    ref, _ = predict(net, np.asarray(x[np.sort(a[:n])]))
    other, _ = predict(net, np.asarray(x[np.sort(b[:n])]))
    floor = {"fd": frechet_distance_of(ref, other), **prdc(ref, other, k=5)}
    print(json.dumps({"floor": {k: round(v, 4) for k, v in floor.items()}, "held_out_accuracy": round(held_out, 4), "n": n}))
    for ckpt in args.ckpt:
        images, wanted = samples_of(ckpt, n, classes)
        feats, predicted = predict(net, images)
        row = {"fd": frechet_distance_of(ref, feats), **prdc(ref, feats, k=5)}
        print(json.dumps({"ckpt": ckpt, "accuracy": round(accuracy(predicted, wanted), 4), **{k: round(v, 4) for k, v in row.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
