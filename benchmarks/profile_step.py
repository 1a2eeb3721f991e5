"""Where one training step's time goes: torch.profiler over the real step (step.TrainingStep, the one `fm train`
and `fm bench` run: model, Muon/AdamW, EMA, conditioning) on synthetic data, op by op.

    PYTHONPATH=$PWD python benchmarks/profile_step.py --preset quickstart --batch 32 --steps 10

Prints the profiler's table sorted by self CPU time, then the step's mean wall time. Compiled graphs show as
"Call CompiledFxGraph" (their own fused elementwise kernels) with the GEMMs they call as aten::mm/addmm.
Run it alone on the machine: every other process changes the numbers (docs/benchmarks.md, "How far the
shapes' bar is").
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fmcli.config import config_to_dict, load_config, resolve_without_data
from fmcli.hardware import resolve_hardware
from fmcli.measure import BenchSpec, train_step_fn
from fmcli.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quickstart")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE, as fm's --set (repeatable)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="profiled steps")
    ap.add_argument("--warmup", type=int, default=15, help="unprofiled steps first (compile, optimizer state, allocator)")
    ap.add_argument("--precision", default=None, choices=["auto", "bf16", "fp32"], help="default: the preset's train.precision")
    ap.add_argument("--compile", default=None, choices=["auto", "true", "false"], help="default: the preset's train.compile")
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()

    overrides = list(args.overrides)
    overrides += [f"train.precision={args.precision}"] if args.precision else []
    overrides += [f"train.compile={args.compile}"] if args.compile else []
    cfg = resolve_without_data(load_config(args.preset, overrides))
    # Precision, compile and Muon's Newton-Schulz dtype decided as `fm train` decides them on this CPU (the probe).
    m = cfg.model
    choice, compile_choice, ns_dtype = resolve_hardware(cfg, torch.device("cpu"), (m.in_channels, m.image_size, m.image_size))
    print(f"precision {choice.precision} ({choice.reason}); compile {compile_choice.compile}; Muon NS dtype {ns_dtype}", file=sys.stderr)
    torch.manual_seed(0)
    spec = BenchSpec(
        config=config_to_dict(cfg), batch=args.batch, steps=args.steps, warmup=args.warmup, precision=choice.precision,
        compile=compile_choice.compile, device="cpu", muon_ns_dtype=ns_dtype,
    )  # fmt: skip
    step = train_step_fn(build_model(cfg.model), cfg, spec, torch.device("cpu"))
    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    seconds = (time.perf_counter() - start) / args.steps
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(f"{args.preset} batch {args.batch} ({choice.precision}, compiled={step.compiled}): {1000 * seconds:.1f} ms a step under the profiler")


if __name__ == "__main__":
    main()
