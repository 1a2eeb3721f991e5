"""The speed `fm sample` delivers: the whole command in fp32 eager vs its auto choice, interleaved; and the
fidelity of bf16 samples against fp32 ones, measured against the seed-to-seed spread.

Speed (docs/benchmarks.md, "Sampling precision and compile"): rounds of `fm sample` subprocesses, each round
running every variant once, so a drifting machine hits all of them alike; the wall clock of the whole command
(loading, probe cache, compiling, sampling, PNGs) gives its images/s.

    # a trained checkpoint (quickstart), unguided and CFG 4, 1,000 images:
    PYTHONPATH=$PWD python benchmarks/sample_precision.py speed --ckpt runs/quickstart -n 1000 --cfg 1 --cfg 4
    # randomly initialised models of the quickstart's and DiT-S/2's size (no training needed):
    PYTHONPATH=$PWD python benchmarks/sample_precision.py speed --random quickstart -n 1000 --cfg 1 --cfg 4
    PYTHONPATH=$PWD python benchmarks/sample_precision.py speed --random DiT-S/2 -n 400 --cfg 4
    # what auto does on a CPU without fast bf16 (it must equal fp32 eager within noise):
    PYTHONPATH=$PWD python benchmarks/sample_precision.py speed --random quickstart -n 400 --cfg 4 --probe-force bf16-slow
    # which part gives what (fp32/bf16 x eager/compiled):
    PYTHONPATH=$PWD python benchmarks/sample_precision.py speed --random quickstart -n 1000 --cfg 4 --all-variants

Fidelity: `fm eval`'s metrics in the dataset's own classifier features (FD, recall, precision, coverage and
conditional accuracy), at fp32 and at bf16, for two seeds: bf16 is as good as fp32 when |bf16 - fp32| at a seed
is within |seed 0 - seed 1| at one precision.

    PYTHONPATH=$PWD python benchmarks/sample_precision.py fidelity --ckpt runs/quickstart --data data/shapes-32-n20000-s0 -n 2000

How much the pixels differ (README, "Precision and compile"): the same samples in fp32 and bf16, 8-bit levels.

    PYTHONPATH=$PWD python benchmarks/sample_precision.py diff --ckpt runs/quickstart -n 200 --compiled

Every variant passes its precision and compile explicitly except "auto" (the checkpoint's sample.precision /
sample.compile, "auto" unless changed). Sizes are arguments, so a tiny run checks the script itself:
    PYTHONPATH=$PWD python benchmarks/sample_precision.py speed --random debug -n 8 --rounds 1 --cfg 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {  # name -> the flags it adds to `fm sample`
    "fp32 eager": ["--precision", "fp32", "--no-compile"],
    "auto": [],  # sample.precision / sample.compile of the checkpoint ("auto": the probe and the C++ compiler decide)
}
MORE_VARIANTS = {  # --all-variants: which of precision and compile gives what
    "fp32 compiled": ["--precision", "fp32", "--compile"],
    "bf16 eager": ["--precision", "bf16", "--no-compile"],
    "bf16 compiled": ["--precision", "bf16", "--compile"],
}


def random_checkpoint(size: str, out: Path) -> Path:
    """A checkpoint of a randomly initialised class-conditional model on 32x32 shapes: the quickstart's own
    model (`quickstart`), DiT-S/2 at the quickstart's settings (`DiT-S/2`), or the tests' `debug` one.
    Speed does not depend on the weights; sample.precision / sample.compile stay "auto"."""
    import torch

    from fmcli.checkpoint import save_atomic
    from fmcli.config import config_to_dict, load_config, resolve_without_data
    from fmcli.data.shapes import SHAPE_NAMES
    from fmcli.models import build_model

    sets = {"quickstart": [], "DiT-S/2": ["model.size='DiT-S/2'"], "debug": ["sample.precision='auto'", "sample.compile='auto'"]}[size]
    cfg = resolve_without_data(load_config("debug" if size == "debug" else "quickstart", sets))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # adaLN-Zero's zero init would make every velocity 0 (and bf16 trivially equal to fp32)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    weights = model.state_dict()
    m = cfg.model
    info = {"kind": "pixels", "shape": [m.in_channels, m.image_size, m.image_size], "num_classes": m.num_classes,
            "class_names": SHAPE_NAMES[: m.num_classes], "source": "shapes", "image_size": m.image_size}  # fmt: skip
    return save_atomic({"format": 1, "model": weights, "ema": weights, "step": 0, "config": config_to_dict(cfg), "data_info": info}, out)


def fm(*args, env=None) -> tuple[dict, float, str]:
    """Run `fm ARGS --json` from this checkout; (its JSON, wall seconds, stderr)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fmcli.cli", *map(str, args), "--json"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})  # fmt: skip
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"fm {' '.join(map(str, args))} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), seconds, proc.stderr


def speed(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="fm-sample-precision-"))
    ckpt = args.ckpt or random_checkpoint(args.random, work / "random.pt")
    env = {"FM_PROBE_FORCE": args.probe_force} if args.probe_force else {}
    rows = {}
    variants = VARIANTS | (MORE_VARIANTS if args.all_variants else {})
    for r in range(args.rounds):
        for cfg in args.cfg:
            for name, flags in variants.items():
                out = work / f"r{r}-cfg{cfg}-{name.replace(' ', '-')}"
                info, seconds, stderr = fm("sample", "--ckpt", ckpt, "-n", args.n, "--batch-size", args.batch_size, "--cfg", cfg,
                                           "--seed", 0, "--out", out, *flags, env=env)  # fmt: skip
                row = rows.setdefault((cfg, name), {"cfg": cfg, "variant": name, "wall_s": [], "sampling_s": []})
                row["wall_s"].append(round(seconds, 2))
                row["sampling_s"].append(info["seconds"])
                row.update(precision=info["precision"], compile=info["compile"], nfe=info["nfe"])
                print(f"round {r}: cfg {cfg} {name:>10}: {seconds:7.1f} s wall ({args.n / seconds:6.1f} img/s), "
                      f"{info['precision']} {'compiled' if info['compile'] else 'eager'}", file=sys.stderr)  # fmt: skip
    result = {"ckpt": str(ckpt), "n": args.n, "batch_size": args.batch_size, "probe_force": args.probe_force, "rows": []}
    for (cfg, name), row in rows.items():
        best = min(row["wall_s"])
        row["img_per_s"] = round(args.n / best, 2)
        baseline = min(rows[(cfg, "fp32 eager")]["wall_s"])
        row["speedup_vs_fp32_eager"] = round(baseline / best, 3)
        result["rows"].append(row)
    return result


def fidelity(args) -> dict:
    """`fm eval`'s metrics (the dataset's own classifier features: FD, recall, precision, coverage; conditional
    accuracy) at fp32 and at bf16, seeds 0 and 1, each at the checkpoint's sampler and guidance (or --cfg). bf16
    is as good as fp32 when |bf16 - fp32| at a seed is within |seed 0 - seed 1| at one precision. Both eager:
    compile changes the last bits, not the precision's effect."""
    import torch

    from fmcli.fidelity import EvalRequest, evaluate_fidelity

    keys = ("fd", "recall", "precision", "coverage", "accuracy")
    rows = []
    for precision in ("fp32", "bf16"):
        for seed in (0, 1):
            change = {"precision": precision, "compile": False} | ({"cfg": args.cfg} if args.cfg is not None else {})
            req = EvalRequest(data=Path(args.data), ckpt=args.ckpt, num_samples=args.n, seed=seed, batch_size=args.batch_size,
                              kid=False, sample_overrides=lambda base, change=change: base.model_copy(update=change))  # fmt: skip
            floor, (row,) = evaluate_fidelity(req, device=torch.device("cpu"))
            got = {**row["metrics"]["domain"], "accuracy": row.get("accuracy")}
            rows.append({"dtype": precision, "seed": seed, "cfg": row["cfg"], **{k: got[k] for k in keys}})  # "precision" is a metric
            print(json.dumps(rows[-1]), file=sys.stderr)
    at = {(r["dtype"], r["seed"]): r for r in rows}
    spread = {k: abs(at[("fp32", 0)][k] - at[("fp32", 1)][k]) for k in keys}
    gap = {k: max(abs(at[("bf16", s)][k] - at[("fp32", s)][k]) for s in (0, 1)) for k in keys}
    return {"ckpt": args.ckpt, "n": args.n, "rows": rows, "floor": floor["metrics"]["domain"], "seed_spread_fp32": spread,
            "bf16_vs_fp32_max": gap, "bf16_within_seed_spread": {k: gap[k] <= spread[k] for k in keys}}  # fmt: skip


def diff(args) -> dict:
    """How much samples differ between precisions: the same seeds and indices in fp32 eager and in each other
    variant, compared as the 8-bit pixels `fm sample` writes (mean and max |difference| in levels of 255, and
    the share of pixels that differ)."""
    import torch

    from fmcli.generate import iterate_samples, load_for_sampling, prepare_for_sampling
    from fmcli.images import to_uint8

    cpu = torch.device("cpu")
    loaded = load_for_sampling(args.ckpt, cpu)
    base = loaded.config.sample.model_copy(update={k: v for k, v in (("cfg", args.cfg), ("steps", args.steps)) if v is not None})
    variants = {"fp32 eager": ("fp32", False), "bf16 eager": ("bf16", False)} | ({"bf16 compiled": ("bf16", True)} if args.compiled else {})
    pixels = {}
    for name, (precision, compiled) in variants.items():
        sc = base.model_copy(update={"precision": precision, "compile": compiled})
        prepared = prepare_for_sampling(loaded, sc, cpu)
        xs = [r.x for _, _, r in iterate_samples(prepared, list(range(args.n)), seed=args.seed, sample_cfg=sc, batch_size=args.batch_size, device=cpu)]
        pixels[name] = torch.from_numpy(to_uint8(torch.cat(xs))).int()
    ref = pixels["fp32 eager"]
    rows = []
    for name, px in pixels.items():
        d = (px - ref).abs().float()
        per_image = d.flatten(1).mean(1)
        rows.append({
            "variant": name, "mean_abs_levels": round(d.mean().item(), 4), "max_abs_levels": int(d.max()),
            "p99_abs_levels": float(d.flatten().kthvalue(max(1, int(0.99 * d.numel()))).values), "share_differing": round((d > 0).float().mean().item(), 4),
            "images_mean_abs_over_4_levels": round((per_image > 4).float().mean().item(), 4),
        })  # fmt: skip
        print(f"{name:>14} vs fp32 eager: mean |d| {rows[-1]['mean_abs_levels']:.3f} / 255, max {rows[-1]['max_abs_levels']}, "
              f"p99 {rows[-1]['p99_abs_levels']:.0f}, {rows[-1]['share_differing']:.1%} of pixels differ, "
              f"{rows[-1]['images_mean_abs_over_4_levels']:.1%} of images by over 4 levels on average", file=sys.stderr)  # fmt: skip
    return {"ckpt": args.ckpt, "n": args.n, "solver": base.solver, "steps": base.steps, "cfg": base.cfg, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    sp = sub.add_parser("speed", help="fm sample images/s: fp32 eager vs auto, interleaved")
    which = sp.add_mutually_exclusive_group(required=True)
    which.add_argument("--ckpt", help="a checkpoint or run directory")
    which.add_argument("--random", choices=["quickstart", "DiT-S/2", "debug"], help="a randomly initialised model of this size")
    sp.add_argument("-n", type=int, default=1000, help="images per command (400+ for the acceptance figure)")
    sp.add_argument("--batch-size", type=int, default=500)
    sp.add_argument("--cfg", type=float, action="append", help="guidance weights to time (repeatable; 1 = unguided); default 1 and 4")
    sp.add_argument("--rounds", type=int, default=3)
    sp.add_argument("--probe-force", choices=["bf16-slow", "bf16-fast"], help="FM_PROBE_FORCE for every command (bf16-slow: a CPU without fast bf16)")
    sp.add_argument("--all-variants", action="store_true", help="also fp32 compiled, bf16 eager and bf16 compiled")
    fp = sub.add_parser("fidelity", help="bf16 vs fp32 samples against the seed-to-seed spread")
    fp.add_argument("--ckpt", required=True)
    fp.add_argument("--data", required=True, help="the prepared shapes dataset the model was trained on")
    fp.add_argument("-n", type=int, default=2000)
    fp.add_argument("--batch-size", type=int, default=500)
    fp.add_argument("--cfg", type=float, default=None, help="default: the checkpoint's sample.cfg")
    dp = sub.add_parser("diff", help="how much bf16 samples differ from fp32 ones, in 8-bit pixel levels")
    dp.add_argument("--ckpt", required=True)
    dp.add_argument("-n", type=int, default=100)
    dp.add_argument("--batch-size", type=int, default=100)
    dp.add_argument("--cfg", type=float, default=None, help="default: the checkpoint's sample.cfg")
    dp.add_argument("--steps", type=int, default=None)
    dp.add_argument("--seed", type=int, default=0)
    dp.add_argument("--compiled", action="store_true", help="also bf16 compiled")
    args = ap.parse_args()
    if args.what == "speed":
        args.cfg = args.cfg or [1.0, 4.0]
        print(json.dumps(speed(args), indent=1))
    else:
        print(json.dumps(fidelity(args) if args.what == "fidelity" else diff(args), indent=1))


if __name__ == "__main__":
    main()
