"""CPU training-step throughput of a preset's DiT: fp32 vs bf16 autocast, attention in bf16 vs fp32, eager vs compiled.

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

from fmcli.bench import resolve_bench_config
from fmcli.config import load_config
from fmcli.models import build_model
from fmcli.models import dit

VARIANTS = {
    "fp32": dict(bf16=False, fp32_attention=True, compile=False),
    "bf16, bf16 attention": dict(bf16=True, fp32_attention=False, compile=False),
    "bf16, fp32 attention": dict(bf16=True, fp32_attention=True, compile=False),
    "bf16, fp32 attention, compiled": dict(bf16=True, fp32_attention=True, compile=True),
}


def _plain_sdpa(q, k, v, attn_mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class Runner:
    def __init__(self, model_cfg, batch: int, variant: dict):
        torch.manual_seed(0)
        self.model = build_model(model_cfg)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.forward = torch.compile(self.model) if variant["compile"] else self.model
        self.variant = variant
        c, s = model_cfg.in_channels, model_cfg.image_size
        self.x = torch.randn(batch, c, s, s)
        self.t = torch.rand(batch)
        self.y = torch.randint(0, model_cfg.num_classes, (batch,))

    def step(self):
        patch = nullcontext() if self.variant["fp32_attention"] else mock.patch.object(dit, "_sdpa", _plain_sdpa)
        amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.variant["bf16"])
        with patch, amp:
            loss = (self.forward(self.x, self.t, self.y).float() - self.x).pow(2).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        return steps * self.x.shape[0] / (time.perf_counter() - start)


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
    runners = {name: Runner(cfg.model, batch, v) for name, v in VARIANTS.items()}
    for r in runners.values():  # warmup (and compilation) outside the timed rounds
        r.timed(3)
    rates = {name: [] for name in runners}
    for k in range(args.rounds):
        order = list(runners) if k % 2 == 0 else list(reversed(runners))
        for name in order:
            rates[name].append(runners[name].timed(args.steps))
    base = statistics.median(rates["fp32"])
    print(f"preset {args.preset}, batch {batch}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.rounds} rounds x {args.steps} steps")
    print("| variant | median img/s | vs fp32 |")
    print("|---|---:|---:|")
    for name, r in rates.items():
        med = statistics.median(r)
        print(f"| {name} | {med:.0f} | {med / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
