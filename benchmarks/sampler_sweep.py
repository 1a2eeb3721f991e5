"""Quality vs network evaluations for each sampler, on a shapes checkpoint: shape accuracy and a feature FD.

For every solver and NFE budget (the most steps that fit, solvers.steps_for_nfe) it samples `--per-class`
images of every class (class-grid order, fixed seed, the checkpoint's CFG unless --cfg) and reports
- shape accuracy: the fraction an independent CNN (benchmarks/shape_accuracy.py, trained on the real
  data) assigns to the requested class;
- FD: the Frechet distance of `--features` (default tiny: fm's fixed random conv net, not comparable to
  published FID) between the samples and the whole training set.
dopri5 chooses its own steps: it runs at each of `--tolerances` (rtol = atol) and reports the NFE it used.

    PYTHONPATH=$PWD python benchmarks/sampler_sweep.py --ckpt runs/quickstart --data data/shapes-32-n20000-s0
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.shape_accuracy import cached_classifier
from fmcli.evaluate import build_extractor, frechet_distance, reference_statistics, statistics_of, to_rgb
from fmcli.generate import class_grid_samples, load_for_sampling, nfe_record
from fmcli.images import to_uint8
from fmcli.solvers import steps_for_nfe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", required=True, help="the prepared shapes dataset the model was trained on")
    ap.add_argument("--solvers", default="euler,heun,ab2,euler-sde")
    ap.add_argument("--nfe", default="4,8,16,32")
    ap.add_argument("--tolerances", default="1e-2,1e-3,1e-4", help="dopri5 rtol = atol values ('' to skip dopri5)")
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--cfg", type=float, default=None, help="default: the checkpoint's sample.cfg")
    ap.add_argument("--sde-noise", type=float, default=1.0)
    ap.add_argument("--features", default="tiny")
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--classifier", default=None, help="the domain classifier's cache file (default: beside the data)")
    args = ap.parse_args()

    start = time.perf_counter()
    cpu = torch.device("cpu")
    clf, held_out = cached_classifier(args.data, args.classifier)
    extractor = build_extractor(args.features, device=cpu)
    ref = reference_statistics(args.data, extractor)
    loaded = load_for_sampling(args.ckpt, cpu)
    base = loaded.config.sample.model_copy(update={"sde_noise": args.sde_noise, **({"cfg": args.cfg} if args.cfg is not None else {})})
    labels = torch.arange(loaded.num_classes).repeat_interleave(args.per_class)

    def score(settings) -> dict:
        t0 = time.perf_counter()
        x, nfes = class_grid_samples(loaded, args.per_class, seed=args.seed, sample_cfg=settings, batch_size=len(labels), device=cpu)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            accuracy = (clf(x.clamp(-1, 1)).argmax(1) == labels).float().mean().item()
        pixels = torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).contiguous()  # the PNG values, as `fm fid` scores them
        fd = frechet_distance(statistics_of(extractor(to_rgb(pixels)), extractor.name, x.shape[-1]), ref)
        steps = None if settings.solver == "dopri5" else settings.steps
        return {"solver": settings.solver, "steps": steps, **nfe_record(nfes), "shape_accuracy": round(accuracy, 3), "fd": round(fd, 3), "sample_seconds": round(seconds, 1)}

    rows = []
    for budget in (int(n) for n in args.nfe.split(",")):  # budget-major: a cut-short run still compares every solver
        for solver in [s for s in args.solvers.split(",") if s]:
            if steps_for_nfe(solver, budget) == 0:  # not even one step fits this budget (e.g. heun at NFE 1)
                continue
            rows.append({"nfe_budget": budget, **score(base.model_copy(update={"solver": solver, "steps": steps_for_nfe(solver, budget)}))})
            print(json.dumps(rows[-1]), flush=True)
    for tol in (float(v) for v in args.tolerances.split(",") if v):
        rows.append({"tolerance": tol, **score(base.model_copy(update={"solver": "dopri5", "rtol": tol, "atol": tol}))})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({
        "ckpt": args.ckpt, "step": loaded.step, "cfg": base.cfg, "guidance": base.guidance, "sde_noise": args.sde_noise, "per_class": args.per_class,
        "features": extractor.name, "ref_count": ref.count, "classifier_held_out_accuracy": round(held_out, 4),
        "seconds": round(time.perf_counter() - start, 1), "rows": rows,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
