"""Our DiT vs diffusers' DiTTransformer2DModel at equal config and precision, in one run.

DiT-S/2-sized by default (width 384, depth 12, heads 6, patch 2) on 32x32x4 inputs, 10 classes. For each
precision the two models are measured alternately (fm, diffusers, diffusers, fm, ...) `--repeats` times,
each measurement with a fresh model and optimizer (a fresh process on CPU), and the medians are compared.

    PYTHONPATH=$PWD python benchmarks/compare_diffusers.py --batch 8 --steps 3 --repeats 3
    PYTHONPATH=$PWD python benchmarks/compare_diffusers.py --device cuda --batch 256 --steps 20 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace

import torch

from fmcli.measure import BenchSpec, device_name, measure_isolated, train_step_fn
from fmcli.bench import dit_forward_flops, measure_bench, peak_flops
from fmcli.config import resolve_without_data as resolve_bench_config
from fmcli.models import build_bench_model
from fmcli.hardware import autocast as _autocast
from fmcli.config import config_to_dict, load_config, overrides_with

DIT_S2 = ["model.hidden_size=384", "model.depth=12", "model.heads=6", "model.patch_size=2", "model.mlp_ratio=4.0",
          "model.image_size=32", "model.in_channels=4", "model.num_classes=10", "sample.steps=50", "sample.cfg=2.0",
          "optim.name=adamw", "train.compile=false"]  # equal optimizer for both models, whatever the quickstart preset uses


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps (and timed solver steps)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mode", default="both", choices=["train", "sample", "both"])
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    ap.add_argument("--interleave", type=int, default=0, metavar="N",
                    help="instead: both models in this process, N step pairs alternating fm/diffusers; median of per-pair ratios "
                         "(robust on a machine whose load changes by the second)")
    args = ap.parse_args()
    if args.interleave:
        return interleaved(args)

    cfg = resolve_bench_config(load_config("quickstart", overrides_with(DIT_S2, args.overrides)))
    dev = torch.device(args.device)
    run = (lambda spec: measure_isolated(spec, measure_bench)) if dev.type == "cpu" else measure_bench
    base = BenchSpec(config=config_to_dict(cfg), batch=args.batch, mode=args.mode, steps=args.steps, warmup=args.warmup, device=dev.type)
    name = device_name(dev)
    fwd = dit_forward_flops(cfg.model)
    peak = peak_flops(name) if dev.type == "cuda" else None
    report = {"device": name, "batch": args.batch, "model": model_name(cfg.model), "precisions": {}}
    for precision in args.precisions.split(","):
        samples = {"fm": {"train": [], "sample": []}, "diffusers": {"train": [], "sample": []}}
        params = {}
        for r in range(args.repeats):
            order = ("fm", "diffusers") if r % 2 == 0 else ("diffusers", "fm")
            for impl in order:
                res = run(replace(base, precision=precision, sample_precision=precision, impl=impl))  # both parts at this precision
                params[impl] = res["params"]
                for part in ("train", "sample"):
                    if part in res:
                        samples[impl][part].append(res[part]["img_per_s"])
                print(f"[{precision} repeat {r}] {impl}: " + ", ".join(f"{p} {res[p]['img_per_s']:.2f} img/s" for p in ("train", "sample") if p in res), file=sys.stderr, flush=True)
        entry = {"params": params}
        for part in ("train", "sample"):
            if samples["fm"][part]:
                ours, theirs = statistics.median(samples["fm"][part]), statistics.median(samples["diffusers"][part])
                entry[part] = {"fm_img_per_s": ours, "diffusers_img_per_s": theirs, "ratio": ours / theirs,
                               "fm_all": samples["fm"][part], "diffusers_all": samples["diffusers"][part]}
                if peak and part == "train":
                    entry[part]["fm_mfu"] = ours * 3 * fwd / peak
        report["precisions"][precision] = entry
    print(json.dumps(report, indent=1))
    return 0


def model_name(m) -> str:
    """The model measured, as --set left it (DiT-S/2 by default)."""
    return f"DiT {m.hidden_size}/{m.depth}/{m.heads} patch {m.patch_size}, {m.image_size}x{m.image_size}x{m.in_channels}, {m.num_classes} classes"


def interleaved(args) -> int:
    """Paired timing: each fm step is followed (or preceded) by a diffusers step, so both see the same load."""
    import time

    cfg = resolve_bench_config(load_config("quickstart", overrides_with(DIT_S2, args.overrides)))
    dev = torch.device(args.device)
    m = cfg.model
    report = {"device": device_name(dev), "batch": args.batch, "pairs": args.interleave, "mode": "interleaved", "precisions": {}}
    for precision in args.precisions.split(","):
        spec = BenchSpec(config=config_to_dict(cfg), batch=args.batch, precision=precision, device=dev.type)
        torch.manual_seed(0)
        models = {impl: build_bench_model(m, impl).to(dev) for impl in ("fm", "diffusers")}
        steps = {impl: train_step_fn(model, cfg, spec, dev) for impl, model in models.items()}
        x = torch.randn(2 * args.batch, m.in_channels, m.image_size, m.image_size, device=dev)  # a CFG-doubled batch
        t = torch.rand(2 * args.batch, device=dev)
        y = torch.randint(0, m.num_classes + 1, (2 * args.batch,), device=dev)

        def forward(impl):
            with torch.no_grad(), _autocast(precision, dev):
                models[impl].eval()(x, t, y)
            models[impl].train()

        def clock(fn):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        for impl in models:  # warmup
            steps[impl]()
            forward(impl)
        entry = {}
        for part, fn in (("train", lambda impl: steps[impl]()), ("forward", forward)):
            times = {"fm": [], "diffusers": []}
            for i in range(args.interleave):
                for impl in (("fm", "diffusers") if i % 2 == 0 else ("diffusers", "fm")):
                    times[impl].append(clock(lambda: fn(impl)))
            ratios = [d / f for f, d in zip(times["fm"], times["diffusers"])]  # > 1: fm faster
            entry[part] = {
                "fm_median_s": statistics.median(times["fm"]),
                "diffusers_median_s": statistics.median(times["diffusers"]),
                "ratio_fm_over_diffusers_speed": statistics.median(ratios),
                "pairs_fm_faster": sum(r > 1 for r in ratios),
            }
            print(f"[{precision}] {part}: fm/diffusers speed {entry[part]['ratio_fm_over_diffusers_speed']:.3f} "
                  f"(fm faster in {entry[part]['pairs_fm_faster']}/{len(ratios)} pairs)", file=sys.stderr, flush=True)
        report["precisions"][precision] = entry
        del models, steps
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
