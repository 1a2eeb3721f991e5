"""CPU training-step throughput of a preset's DiT: fp32 vs bf16 autocast, attention in bf16 vs fp32, eager vs compiled.

The step is `fm bench`'s (`fmcli.measure.train_step_fn`, i.e. step.TrainingStep: the preset's flow path, loss, clipping, optimizer).
All variants are timed in one process, interleaved round by round (this machine's load changes by the
second), each with its own model and AdamW; the table reports the median images/s and the ratio to fp32.
"bf16, bf16 attention" is what plain autocast does (the model before `_sdpa` kept CPU attention in fp32).

    PYTHONPATH=$PWD python benchmarks/cpu_precision.py --preset quickstart --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from unittest import mock

import torch
import torch.nn.functional as F

from fmcli.measure import BenchSpec, train_step_fn
from fmcli.config import resolve_without_data as resolve_bench_config
from fmcli.config import config_to_dict, load_config
from fmcli.models import build_model
from fmcli.models import dit

VARIANTS = {  # (precision, attention in fp32 under CPU bf16, torch.compile)
    "fp32": ("fp32", True, False),
    "bf16, bf16 attention": ("bf16", False, False),
    "bf16, fp32 attention": ("bf16", True, False),
    "bf16, fp32 attention, compiled": ("bf16", True, True),
}


def _plain_sdpa(q, k, v, attn_mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class Runner:
    """fm bench's training step (the preset's path, loss, clip and optimizer) for one variant, own model."""

    def __init__(self, cfg, batch: int, precision: str, fp32_attention: bool, compile: bool):
        torch.manual_seed(0)
        spec = BenchSpec(config=config_to_dict(cfg), batch=batch, precision=precision, compile=compile, device="cpu")
        self.step = train_step_fn(build_model(cfg.model), cfg, spec, torch.device("cpu"))
        self.fp32_attention = fp32_attention
        self.batch = batch

    def timed(self, steps: int) -> float:
        patch = nullcontext() if self.fp32_attention else mock.patch.object(dit, "_sdpa", _plain_sdpa)
        with patch:
            start = time.perf_counter()
            for _ in range(steps):
                self.step()
            return steps * self.batch / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quickstart")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--batch", type=int, default=None, help="default: the preset's global batch")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    cfg = resolve_bench_config(load_config(args.preset, args.overrides))
    batch = args.batch or cfg.train.global_batch_size
    runners = {name: Runner(cfg, batch, *v) for name, v in VARIANTS.items()}
    for r in runners.values():  # warmup (and compilation) outside the timed rounds
        r.timed(3)
    rates = {name: [] for name in runners}
    for k in range(args.rounds):
        order = list(runners) if k % 2 == 0 else list(reversed(runners))
        for name in order:
            rates[name].append(runners[name].timed(args.steps))
    base = statistics.median(rates["fp32"])
    print(f"preset {args.preset} ({cfg.optim.name}), batch {batch}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.rounds} rounds x {args.steps} steps")
    print("| variant | median img/s | vs fp32 |")
    print("|---|---:|---:|")
    for name, r in rates.items():
        med = statistics.median(r)
        print(f"| {name} | {med:.0f} | {med / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
