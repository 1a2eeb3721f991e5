"""Does `fm bench` measure what the training loop does? The loop's own img/s against the bench's, at the
digits' shape (1 x 28 x 28: 49 tokens at patch 4) and at the shapes' (3 x 32 x 32: 64 tokens), interleaved.

`compare` (the acceptance figure, docs/benchmarks.md "Training loop vs fm bench"): each round runs, per dataset,
`fm train --preset quickstart` for --steps steps (budget off, one log line per --log-every steps, the first
window dropped: it holds compiling) and `fm bench --preset quickstart --mode train --batch-size 32` at that
shape; every command sees the same precision and compile (--precision, --compile/--no-compile).

    PYTHONPATH=$PWD python benchmarks/loop_vs_bench.py compare --steps 1200 --rounds 2

`parts` (where a step's time goes, in one process): the real TrainingStep fed by the run's DataLoader from the
prepared data, the same step fed by the bench's synthetic batch, the DataLoader alone, and the step again with
denormals flushed, in interleaved blocks; on eager or compiled models.

    PYTHONPATH=$PWD python benchmarks/loop_vs_bench.py parts --steps 30 --rounds 3

The digits-shaped data is benchmarks/gray_digits.py's (grey shapes at 28x28, no download); the shapes data is
the built-in source at 32x32. Tiny check of the script itself:
    PYTHONPATH=$PWD python benchmarks/loop_vs_bench.py compare --steps 20 --log-every 10 --rounds 1 --count 256 --no-compile --precision fp32
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


def datasets(work: Path, count: int) -> dict[str, Path]:
    """{"digits 1x28x28": grey shapes at 28, "shapes 3x32x32": the built-in shapes}, prepared once in `work`."""
    from gray_digits import make_gray_digits

    from fmcli.data.shapes import prepare_shapes

    out = {"digits 1x28x28": work / f"gray28-{count}", "shapes 3x32x32": work / f"shapes32-{count}"}
    if not out["digits 1x28x28"].exists():
        make_gray_digits(out["digits 1x28x28"], count)
    if not out["shapes 3x32x32"].exists():
        prepare_shapes(out["shapes 3x32x32"], size=32, count=count, seed=0)
    return out


def run(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "fmcli.cli", *map(str, args)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"fm {' '.join(map(str, args))} failed:\n{proc.stderr[-2000:]}")
    return proc


def hardware_sets(args) -> list[str]:
    return [f"train.precision={args.precision}", f"train.compile={str(args.compile).lower() if args.compile is not None else 'auto'}"]


def loop_img_per_s(data: Path, run_dir: Path, args) -> float:
    """The loop's own img/s: the mean of its logged windows after the first (compiling happens in the first)."""
    sets = hardware_sets(args) + [
        f"train.steps={args.steps}", f"train.log_every={args.log_every}", "train.budget_minutes=null", "train.budget_fallback=null",
        "train.sample_every=0", "train.checkpoint_every=0", "sample.grid_size=10", "sample.steps=2",
    ]  # fmt: skip
    run("train", "--preset", "quickstart", "--data", data, "--run-dir", run_dir, *[a for s in sets for a in ("--set", s)])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [r["img_per_s"] for r in records if "img_per_s" in r][1:-1] or [r["img_per_s"] for r in records if "img_per_s" in r]
    return statistics.mean(windows)  # the last window holds the final checkpoint and grid: dropped too


def bench_img_per_s(data: Path, args) -> float:
    sets = hardware_sets(args) + [f"data.path='{data}'"]
    proc = run("bench", "--preset", "quickstart", "--mode", "train", "--batch-size", 32, "--steps", args.bench_steps, "--json",
               *[a for s in sets for a in ("--set", s)])  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])["train"]["img_per_s"]


def compare(args) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="fm-loop-vs-bench-"))
    data = datasets(work, args.count)
    rows = {name: {"loop": [], "bench": []} for name in data}
    for r in range(args.rounds):
        for name, path in data.items():
            loop = loop_img_per_s(path, work / f"run-{name.split()[0]}-{r}", args)
            bench = bench_img_per_s(path, args)
            rows[name]["loop"].append(round(loop, 1))
            rows[name]["bench"].append(round(bench, 1))
            print(f"round {r}: {name}: loop {loop:.1f} img/s, bench {bench:.1f} img/s ({bench / loop:.2f}x)", file=sys.stderr)
    for row in rows.values():
        row["bench_over_loop"] = round(statistics.mean(row["bench"]) / statistics.mean(row["loop"]), 3)
    return {"steps": args.steps, "rounds": args.rounds, "precision": args.precision, "compile": args.compile, "rows": rows}


def parts(args) -> dict:
    """ms per step of: the loop's step on real batches, the bench's step on a synthetic batch, the loader alone,
    and the real step with denormals flushed; interleaved blocks of --steps steps."""
    import torch
    from torch.utils.data import DataLoader

    from fmcli import distributed as D
    from fmcli.measure import synthetic_batches
    from fmcli.config import load_config, resolve
    from fmcli.data.dataset import PreparedDataset, collate_batched
    from fmcli.data.sampler import RankBatchSampler
    from fmcli.hardware import resolve_hardware
    from fmcli.step import TrainingStep

    work = Path(args.work or tempfile.mkdtemp(prefix="fm-loop-vs-bench-"))
    result = {}
    for name, path in datasets(work, args.count).items():
        dataset = PreparedDataset(path)
        # data.path as `fm train --data` sets it: the quickstart's REPA (repa.encoder "auto" -> "domain") reads its encoder there
        sets = hardware_sets(args) + ["train.budget_minutes=null", "train.budget_fallback=null", f"data.path='{path}'"]
        cfg = resolve(load_config("quickstart", sets), dataset.manifest)
        shape = tuple(dataset.manifest["shape"])
        precision, compile_choice, ns_dtype = resolve_hardware(cfg, torch.device("cpu"), shape)
        cfg = cfg.with_section("train", precision=precision.precision)
        ctx = D.DistContext(device=torch.device("cpu"))
        G = cfg.train.global_batch_size
        step = TrainingStep(cfg, ctx, micro=G, accum=1, shape=shape, ns_dtype=ns_dtype)
        loader = DataLoader(dataset, batch_sampler=RankBatchSampler(len(dataset), G, G, 1, ctx, 0, 0, 0), num_workers=0, collate_fn=collate_batched)
        real, synthetic = iter(loader), synthetic_batches(cfg, G, ctx.device)
        step.wrap(compile_choice.compile, next(iter(loader)))
        counter = itertools.count()
        variants = {
            "loop step (real data, DataLoader)": lambda: step(real, next(counter), 0),
            "bench step (synthetic batch)": lambda: step(synthetic, next(counter), 0),
            "DataLoader alone": lambda: next(real),
            "loop step, denormals flushed": lambda: step(real, next(counter), 0),
        }
        times = {k: [] for k in variants}
        for _ in range(2):  # warmup: optimizer state, allocator
            variants["loop step (real data, DataLoader)"]()
        for _ in range(args.rounds):
            for k, fn in variants.items():
                torch.set_flush_denormal("flushed" in k)
                start = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                times[k].append(1000 * (time.perf_counter() - start) / args.steps)
            torch.set_flush_denormal(False)
        result[name] = {"precision": precision.precision, "compile": compile_choice.compile, "ms_per_step": {k: [round(v, 2) for v in vs] for k, vs in times.items()}}
        print(name, json.dumps(result[name]), file=sys.stderr)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    for name, steps in (("compare", 1200), ("parts", 30)):
        p = sub.add_parser(name)
        p.add_argument("--steps", type=int, default=steps, help="training steps per loop run (compare) or per timed block (parts)")
        p.add_argument("--rounds", type=int, default=2)
        p.add_argument("--count", type=int, default=20000, help="images per dataset")
        p.add_argument("--precision", default="auto")
        p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: auto")
        p.add_argument("--work", default=None, help="keep the datasets and runs here (default: a temporary folder)")
        if name == "compare":
            p.add_argument("--log-every", type=int, default=100)
            p.add_argument("--bench-steps", type=int, default=50)
    args = ap.parse_args()
    print(json.dumps(compare(args) if args.what == "compare" else parts(args), indent=1))


if __name__ == "__main__":
    main()
