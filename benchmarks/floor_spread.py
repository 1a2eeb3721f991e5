"""How much the choice of real images moves `fm eval`'s numbers: one folder of samples scored against the
reference and floor of each of several split seeds, one JSON line per draw, then mean / sd / range.

    python benchmarks/floor_spread.py --data DATA --gen SAMPLES_DIR -n 1000 --draws 8

SAMPLES_DIR is `fm sample --ckpt RUN -n N --out SAMPLES_DIR` of a class-conditional model (sample i is class
i mod K, as fm samples them). Domain features (the cached classifier of DATA, seed 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fmcli.data.dataset import read_manifest
from fmcli.evaluate import GeneratedFeatures
from fmcli.features import build_space
from fmcli.fidelity import features_of, floor, folder_images, prepare_references, score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--gen", type=Path, required=True)
    parser.add_argument("-n", type=int, required=True, help="images per reference and per floor (as fm eval -n)")
    parser.add_argument("--draws", type=int, default=8)
    args = parser.parse_args()
    manifest = read_manifest(args.data)
    ext = build_space("domain", data=args.data, device="cpu", classifier=None, dinov2=None, log=lambda s: print(s, file=sys.stderr))
    images = folder_images(args.gen, tuple(manifest["shape"]))
    generated = GeneratedFeatures({"domain": features_of(images, ext)}, np.arange(len(images)) % manifest["num_classes"])
    rows = []
    for seed, ref in enumerate(prepare_references(args.data, {"domain": ext}, args.n, seeds=range(args.draws))):
        f, g = floor(ref, kid=False)["metrics"]["domain"], score(ref, generated, kid=False)
        m = g["metrics"]["domain"]
        rows.append({"split_seed": seed, "floor_fd": f["fd"], "fd": m["fd"], "fd_over_floor": m["fd"] / f["fd"], "floor_recall": f["recall"],
                     "recall": m["recall"], "precision": m["precision"], "coverage": m["coverage"], "accuracy": g["accuracy"]})  # fmt: skip
        print(json.dumps(rows[-1]))
    for key in ("floor_fd", "fd", "fd_over_floor", "floor_recall", "recall"):
        v = np.array([r[key] for r in rows])
        print(f"{key}: mean {v.mean():.3f} sd {v.std(ddof=1):.3f} range {v.min():.3f}-{v.max():.3f}")


if __name__ == "__main__":
    main()
