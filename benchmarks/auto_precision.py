"""`fm bench --mode train` under the preset's defaults (precision/compile "auto") against the explicit choices, in one run.

Variants (each a separate `fm bench` process, run round-robin `--rounds` times, order reversed every other
round because this machine's load changes by the minute; medians reported):
  defaults          the preset as shipped (train.precision = "auto", train.compile = "auto")
  fp32 + adamw      --precision fp32 --set optim.name=adamw
  bf16              --precision bf16
  defaults, eager   --no-compile
  forced bf16-slow  the defaults with FM_PROBE_FORCE=bf16-slow: what a CPU without fast bf16 gets (fp32, fp32 Muon)

    PYTHONPATH=$PWD python benchmarks/auto_precision.py --preset quickstart --rounds 2
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
    "defaults, eager": (["--no-compile"], {}),
    "forced bf16-slow": ([], {"FM_PROBE_FORCE": "bf16-slow"}),
}


def bench(preset: str, batch: int, steps: int, args: list[str], env: dict) -> dict:
    cmd = [sys.executable, "-m", "fmcli.cli", "bench", "--preset", preset, "--mode", "train", "--json", "--batch-size", str(batch), "--steps", str(steps), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=1200)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quickstart")
    ap.add_argument("--batch", type=int, default=64, help="the quickstart's global batch (= its micro batch on one process)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    names = args.variants.split(",")
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
