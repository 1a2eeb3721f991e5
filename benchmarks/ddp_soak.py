"""Run `fm train --nproc 2` N times in a row: every run must exit 0, within a time limit, leaving no
processes behind and printing no "terminate called" (issue: clean distributed exits).

    python benchmarks/ddp_soak.py --runs 20
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def leftover_ranks(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=180)
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    ok, durations = 0, []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "fmcli.cli", "prepare-data", "shapes", "--out", data, "--size", "16", "--count", "256"], env=env, check=True, capture_output=True)
        for k in range(args.runs):
            run_dir = Path(tmp) / f"run{k}"
            start = time.time()
            try:
                proc = subprocess.run(
                    [sys.executable, "-m", "fmcli.cli", "train", "--preset", "debug", "--data", data, "--run-dir", run_dir,
                     "--nproc", "2", "--set", "train.steps=3", "--set", "train.checkpoint_every=0"],
                    env=env, capture_output=True, text=True, timeout=args.timeout,
                )
                code, stderr = proc.returncode, proc.stderr
            except subprocess.TimeoutExpired:
                code, stderr = "timeout", ""
            elapsed = time.time() - start
            durations.append(elapsed)
            left = leftover_ranks(str(run_dir))
            clean = code == 0 and "terminate called" not in stderr and not left
            ok += clean
            print(f"run {k + 1:2d}: exit {code}  {elapsed:5.1f}s  leftover processes: {len(left)}  {'ok' if clean else 'FAILED'}", flush=True)
            if not clean and stderr:
                print(stderr[-2000:], file=sys.stderr)
    print(f"{ok}/{args.runs} runs exited 0 cleanly; mean {sum(durations) / len(durations):.1f}s, max {max(durations):.1f}s")
    return 0 if ok == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
