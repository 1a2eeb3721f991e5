"""Are a model's samples the classes they were asked for, and how close are they to the data? Class accuracy
and FD / precision / recall / coverage in the in-domain classifier's features (fmcli.features, fmcli.fidelity).

1. Train (or reuse, cached beside the data) fm's domain classifier on the prepared dataset the model was trained
   on (shapes, sklearn-digits, any labelled pixel data); its held-out accuracy is reported.
2. Sample `--per-class` images of every class from the checkpoint (class-grid order, fixed seed).
3. Report the fraction the classifier assigns to the requested class, overall and per class (chance: 1/K), and
   FD, precision, recall, density, coverage of the samples against real images, each beside its real-vs-real
   floor (the same count of other real images; see fmcli/fidelity.py). Optionally save the samples as a grid.

    PYTHONPATH=$PWD python benchmarks/shape_accuracy.py --ckpt runs/quickstart --data data/shapes-32-n20000-s0 --cfg 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fmcli.features import domain_extractor
from fmcli.fidelity import Generated, floor, prepare_reference, score
from fmcli.generate import class_grid_samples, class_names_of, load_for_sampling, nfe_record, prepare_for_sampling, sampling_record
from fmcli.images import to_uint8


def cached_classifier(data: str, path: str | None = None) -> tuple[torch.nn.Module, float]:
    """fm's domain classifier of `data` (trained once, cached) and its held-out accuracy, for the other
    benchmarks: it maps images in [-1, 1] [B,C,H,W] to class logits."""
    from fmcli.features import load_or_train_classifier

    trained = load_or_train_classifier(Path(data), path=path)
    return trained.model, trained.held_out_accuracy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", required=True, help="the prepared dataset the model was trained on")
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--cfg", type=float, default=None, help="default: the checkpoint's sample.cfg")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--grid", default=None, help="also save the samples here (PNG)")
    ap.add_argument("--classifier", default=None, help="the classifier's cache file (default: beside the data)")
    ap.add_argument("--precision", default=None, help="network precision while sampling (default: the checkpoint's sample.precision)")
    ap.add_argument("--compile", dest="compile_model", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the network")
    args = ap.parse_args()

    start = time.perf_counter()
    device = torch.device("cpu")
    ext = domain_extractor(Path(args.data), path=args.classifier, device=device, log=lambda m: print(m, flush=True))
    loaded = load_for_sampling(args.ckpt, device)
    updates = {k: v for k, v in (("cfg", args.cfg), ("steps", args.steps), ("precision", args.precision), ("compile", args.compile_model)) if v is not None}
    sample_cfg = loaded.config.sample.model_copy(update=updates)
    loaded = prepare_for_sampling(loaded, sample_cfg, device, lambda line: print(line, file=sys.stderr))
    x, nfes = class_grid_samples(loaded, args.per_class, seed=args.seed, sample_cfg=sample_cfg, batch_size=100, device=device)
    pixels = torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).contiguous()  # the PNG bytes' values
    feats = ext(pixels)
    labels = np.repeat(np.arange(loaded.num_classes), args.per_class)
    reference = prepare_reference(Path(args.data), {"domain": ext}, len(labels))
    scores = score(reference, Generated({"domain": feats}, labels))
    real = floor(reference)
    predicted = ext.predict(pixels)
    names = class_names_of(loaded)
    per_class = {names[k]: round(float((predicted[labels == k] == k).mean()), 3) for k in range(loaded.num_classes)}
    if args.grid:
        import torchvision

        torchvision.utils.save_image((x[::3] + 1) / 2, args.grid, nrow=args.per_class // 3, padding=1)
    rounded = {k: round(v, 4) for k, v in scores["metrics"]["domain"].items()}
    print(json.dumps({
        "ckpt": args.ckpt, "step": loaded.step, **{f"sample_{k}": v for k, v in sampling_record(loaded).items()}, "cfg": sample_cfg.cfg, "solver": sample_cfg.solver, "steps": sample_cfg.steps, **nfe_record(nfes),
        "classifier_held_out_accuracy": round(ext.trained.held_out_accuracy, 4), "sample_accuracy": round(scores["accuracy"], 3),
        "per_class": per_class, **rounded, "floor": {k: round(v, 4) for k, v in real["metrics"]["domain"].items()},
        "per_class_fd_mean": None if scores["per_class_fd_mean"] is None else round(scores["per_class_fd_mean"], 4), "num_samples": len(labels), "seconds": round(time.perf_counter() - start, 1),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
