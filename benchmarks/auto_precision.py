"""`fm bench --mode train` under the preset's defaults (precision/compile "auto") against the explicit choices, in one run.

Variants (each a separate `fm bench` process, run round-robin `--rounds` times, order reversed every other
round because this machine's load changes by the minute; medians reported):
  defaults          the preset as shipped (train.precision = "auto", train.compile = "auto")
  fp32 + adamw      --precision fp32 --set optim.name=adamw
  bf16              --precision bf16
  defaults eager    --no-compile
  forced bf16-slow  the defaults with FM_PROBE_FORCE=bf16-slow: what a CPU without fast bf16 gets (fp32, fp32 Muon)

    PYTHONPATH=$PWD python benchmarks/auto_precision.py --preset quickstart --rounds 2

`--interleave N`: instead of separate `fm bench` processes, every variant's training step (fm bench's own
`train_step_fn`, with precision / compile / Muon dtype resolved as `fm bench` resolves them) is built in
this one process and timed round-robin for N rounds of `--steps` steps: on a machine whose load changes by
the second this is the comparison that means something.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

VARIANTS = {
    "defaults": ([], {}),
    "fp32 + adamw": (["--precision", "fp32", "--set", "optim.name=adamw"], {}),
    "bf16": (["--precision", "bf16"], {}),
    "defaults eager": (["--no-compile"], {}),
    "forced bf16-slow": ([], {"FM_PROBE_FORCE": "bf16-slow"}),
}


def bench(preset: str, batch: int, steps: int, args: list[str], env: dict) -> dict:
    cmd = [sys.executable, "-m", "fmcli.cli", "bench", "--preset", preset, "--mode", "train", "--json", "--batch-size", str(batch), "--steps", str(steps), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=1200)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def interleaved(preset: str, batch: int, steps: int, rounds: int, names: list[str]) -> None:
    import time

    import torch

    from fmcli.measure import BenchSpec, train_step_fn
    from fmcli.bench import resolve_bench_hardware
    from fmcli.config import config_to_dict, load_config, resolve_without_data
    from fmcli.models import build_model

    def option(extra, flag):
        return extra[extra.index(flag) + 1] if flag in extra else None

    runners, facts = {}, {}
    for name in names:
        extra, env = VARIANTS[name]
        overrides = [extra[i + 1] for i, a in enumerate(extra) if a == "--set"]
        cfg = resolve_without_data(load_config(preset, overrides))
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            hw = resolve_bench_hardware(cfg, torch.device("cpu"), option(extra, "--precision") or cfg.train.precision, False if "--no-compile" in extra else cfg.train.compile, lambda m: print(f"[{name}] {m}", file=sys.stderr))
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        spec = BenchSpec(config=config_to_dict(cfg), batch=batch, precision=hw["precision"]["precision"], compile=hw["compile"]["compile"], device="cpu", muon_ns_dtype=hw["muon_ns_dtype"])
        torch.manual_seed(0)
        step = train_step_fn(build_model(cfg.model), cfg, spec, torch.device("cpu"))
        for _ in range(2):
            step()  # warmup (compiled in train_step_fn's first call)
        runners[name] = step
        facts[name] = (spec.precision, step.compiled, spec.muon_ns_dtype or "-")
        print(f"[{name}] ready: {facts[name]}", file=sys.stderr, flush=True)
    rates = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else list(reversed(names)):
            start = time.perf_counter()
            for _ in range(steps):
                runners[name]()
            rates[name].append(steps * batch / (time.perf_counter() - start))
        print(f"[round {r}] " + ", ".join(f"{n} {rates[n][-1]:.0f}" for n in names), file=sys.stderr, flush=True)
    med = {n: statistics.median(v) for n, v in rates.items()}
    print(f"preset {preset}, batch {batch}, interleaved in one process: {rounds} rounds x {steps} steps, {torch.get_num_threads()} threads")
    print("| variant | precision | compiled | Muon NS dtype | median img/s | vs defaults |")
    print("|---|---|---|---|---:|---:|")
    for n in names:
        print(f"| {n} | {facts[n][0]} | {facts[n][1]} | {facts[n][2]} | {med[n]:.0f} | {med[n] / med[names[0]]:.2f}x |")
    if {"defaults", "fp32 + adamw", "bf16"} <= set(med):
        best = max(med["fp32 + adamw"], med["bf16"])
        print(f"defaults / max(fp32 + adamw, bf16) = {med['defaults']:.0f} / {best:.0f} = {med['defaults'] / best:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quickstart")
    ap.add_argument("--batch", type=int, default=None, help="default: the preset's global batch (= its micro batch on one process)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from: " + "; ".join(VARIANTS))
    ap.add_argument("--interleave", type=int, default=0, help="N rounds in one process instead of separate fm bench runs")
    args = ap.parse_args()
    names = args.variants.split(",")
    if args.batch is None:
        from fmcli.config import load_config

        args.batch = load_config(args.preset).train.global_batch_size
    if args.interleave:
        interleaved(args.preset, args.batch, args.steps, args.interleave, names)
        return 0
    rates, reports = {n: [] for n in names}, {}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            extra, env = VARIANTS[name]
            rep = bench(args.preset, args.batch, args.steps, extra, env)
            rates[name].append(rep["train"]["img_per_s"])
            reports[name] = rep
            print(f"[round {r}] {name}: {rep['train']['img_per_s']:.1f} img/s ({rep['precision']}, compile {rep['compile']}, Muon NS {rep['hardware']['muon_ns_dtype']})", file=sys.stderr, flush=True)
    med = {n: statistics.median(v) for n, v in rates.items()}
    probe = reports[names[0]]["hardware"]["precision"]["probe"]
    print(f"preset {args.preset}, batch {args.batch}, {args.rounds} rounds x {args.steps} steps; probe: {json.dumps(probe)}")
    print("| variant | precision | compile | Muon NS dtype | runs (img/s) | median img/s |")
    print("|---|---|---|---|---|---:|")
    for n in names:
        rep = reports[n]
        print(f"| {n} | {rep['precision']} | {rep['compile']} | {rep['hardware']['muon_ns_dtype'] or '-'} | {', '.join(f'{x:.0f}' for x in rates[n])} | {med[n]:.0f} |")
    if {"defaults", "fp32 + adamw", "bf16"} <= set(med):
        best = max(med["fp32 + adamw"], med["bf16"])
        print(f"defaults / max(fp32 + adamw, bf16) = {med['defaults']:.0f} / {best:.0f} = {med['defaults'] / best:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
