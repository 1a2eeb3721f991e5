"""Teacher (1-RF) vs reflow student (2-RF) on shapes: class accuracy at few Euler steps, and path straightness.

One classifier (benchmarks/shape_accuracy.py's, trained once) scores `--per-class` samples of every class from
each checkpoint at each step count, with each checkpoint's own sample.cfg (the student of guided pairs
samples at cfg 1); straightness as in benchmarks/reflow_straightness.py.

    PYTHONPATH=$PWD python benchmarks/reflow_compare.py --data data/shapes-32-n20000-s0 \
        --ckpt teacher=runs/quickstart --ckpt 2rf=runs/quickstart-2rf --steps 1 2 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reflow_straightness import straightness  # noqa: E402
from shape_accuracy import cached_classifier  # noqa: E402

from fmcli.generate import class_grid_samples, load_for_sampling  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--ckpt", action="append", required=True, help="NAME=PATH, repeatable")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--straightness-n", type=int, default=100)
    ap.add_argument("--straightness-steps", type=int, default=32)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--classifier", default=None, help="the domain classifier's cache file (default: beside the data)")
    args = ap.parse_args()

    start = time.perf_counter()
    clf, held_out = cached_classifier(args.data, args.classifier)
    print(json.dumps({"classifier_held_out_accuracy": round(held_out, 4), "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    for item in args.ckpt:
        name, path = item.split("=", 1)
        loaded = load_for_sampling(path, torch.device("cpu"))
        row = {"name": name, "ckpt": path, "step": loaded.step, "cfg": loaded.config.sample.cfg}
        for steps in args.steps:
            sample_cfg = loaded.config.sample.model_copy(update={"solver": "euler", "steps": steps})
            x, _ = class_grid_samples(loaded, args.per_class, seed=args.seed, sample_cfg=sample_cfg, batch_size=100, device=torch.device("cpu"))
            labels = torch.arange(loaded.num_classes).repeat_interleave(args.per_class)
            with torch.no_grad():
                row[f"acc_euler{steps}"] = round((clf(x.clamp(-1, 1)).argmax(1) == labels).float().mean().item(), 3)
        row["straightness"] = straightness(path, args.straightness_n, args.straightness_steps, None, args.seed)["straightness"]
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
