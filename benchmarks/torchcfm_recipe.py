"""torchcfm's conditional image recipe on an fm prepared dataset, at a fixed wall clock, scored by `fm eval`'s metrics.

The peer in issue #28's comparison: torchcfm's class-conditional MNIST example (its `UNetModel`, 32 channels, one
residual block per level, class-conditional; `ConditionalFlowMatcher(sigma=0)`; Adam at torch's default lr 1e-3;
batch 128), trained for `--minutes` of wall clock on the same prepared data fm trains on, then sampled with
Euler at `--steps` steps (fm's quickstart sampler), `-n` images with balanced labels.

Two halves, two environments (torchcfm is never a dependency of fm):

    # 1. in a separate venv that has torchcfm (pip install torchcfm): train + sample -> an .npz of uint8 images + labels
    python benchmarks/torchcfm_recipe.py train --data data/shapes-32-n20000-s0 --minutes 10 -n 1000 --out runs/tcfm-shapes.npz
    # 2. in fm's venv: the same metrics as `fm eval` (domain features, floor, conditional accuracy)
    PYTHONPATH=$PWD python benchmarks/torchcfm_recipe.py score --data data/shapes-32-n20000-s0 --npz runs/tcfm-shapes.npz

Each half prints one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def load_prepared(data: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """uint8 [N,C,H,W] images, int labels and the class count of an fm prepared pixel dataset."""
    manifest = json.loads((data / "manifest.json").read_text())
    if manifest.get("kind") != "pixels" or not manifest.get("num_classes"):
        raise SystemExit(f"{data}: needs a labelled pixel dataset (fm prepare-data)")
    return np.load(data / "x.npy", mmap_mode="r"), np.load(data / "y.npy"), int(manifest["num_classes"])


def train(args) -> dict:
    import torch
    from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
    from torchcfm.models.unet import UNetModel

    torch.manual_seed(args.seed)
    x, y, num_classes = load_prepared(Path(args.data))
    shape = tuple(x.shape[1:])
    model = UNetModel(dim=shape, num_channels=32, num_res_blocks=1, num_classes=num_classes, class_cond=True)
    opt = torch.optim.Adam(model.parameters())
    matcher = ConditionalFlowMatcher(sigma=0.0)
    gen = np.random.default_rng(args.seed)
    start, steps, epoch_order = time.perf_counter(), 0, np.array([], dtype=np.int64)
    while time.perf_counter() - start < args.minutes * 60:
        if len(epoch_order) < args.batch_size:  # reshuffle per epoch, as the recipe's DataLoader(shuffle=True) does
            epoch_order = gen.permutation(len(x))
        idx, epoch_order = np.sort(epoch_order[: args.batch_size]), epoch_order[args.batch_size :]
        x1 = torch.from_numpy(np.asarray(x[idx])).float() / 127.5 - 1.0
        y1 = torch.from_numpy(y[idx]).long()
        x0 = torch.randn_like(x1)
        t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
        loss = torch.mean((model(t, xt, y1) - ut) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        if steps % 10 == 0:
            print(f"step {steps} loss {loss.item():.4f} {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    train_seconds = time.perf_counter() - start

    labels = np.arange(args.num_samples) % num_classes
    images, start = [], time.perf_counter()
    model.eval()
    with torch.no_grad():
        for lo in range(0, args.num_samples, args.sample_batch):
            yb = torch.from_numpy(labels[lo : lo + args.sample_batch]).long()
            z = torch.randn((len(yb), *shape), generator=torch.Generator().manual_seed(args.seed * 100003 + lo))
            for i in range(args.steps):  # Euler from noise (t=0) to data (t=1), the recipe's time convention
                t = torch.full((len(yb),), i / args.steps)
                z = z + model(t, z, yb) / args.steps
            images.append(((z.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy())
            print(f"sampled {lo + len(yb)}/{args.num_samples}", file=sys.stderr, flush=True)
    sample_seconds = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, images=np.concatenate(images), labels=labels)
    tmp.replace(out)
    params = sum(p.numel() for p in model.parameters())
    return {"recipe": "torchcfm conditional UNet", "params": params, "train_steps": steps, "train_seconds": round(train_seconds, 1),
            "batch_size": args.batch_size, "sampler": f"euler {args.steps}", "num_samples": args.num_samples,
            "sample_seconds": round(sample_seconds, 1), "torch_threads": torch.get_num_threads(), "out": str(out)}


def score(args) -> dict:
    """`fm eval`'s scores (domain features: FD, KID, precision/recall, density/coverage, accuracy) for the .npz."""
    import torch

    from fmcli.features import build_space
    from fmcli.fidelity import Generated, features_of, floor, prepare_reference, score as fm_score

    blob = np.load(args.npz)
    images, labels = blob["images"], blob["labels"]
    data = Path(args.data)
    extractors = {"domain": build_space("domain", data=data, device=torch.device("cpu"))}
    reference = prepare_reference(data, extractors, len(images))
    generated = Generated({s: features_of(images, e) for s, e in extractors.items()}, labels)
    return {"npz": args.npz, "num_samples": len(images), **fm_score(reference, generated), "floor": floor(reference)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("train", help="train + sample (needs torchcfm)")
    t.add_argument("--data", required=True)
    t.add_argument("--minutes", type=float, default=10.0)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--steps", type=int, default=50, help="Euler steps when sampling")
    t.add_argument("-n", "--num-samples", type=int, default=1000)
    t.add_argument("--sample-batch", type=int, default=250)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True)
    s = sub.add_parser("score", help="score an .npz in fm's metrics (needs fm)")
    s.add_argument("--data", required=True)
    s.add_argument("--npz", required=True)
    args = ap.parse_args()
    print(json.dumps(train(args) if args.mode == "train" else score(args), default=float), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
