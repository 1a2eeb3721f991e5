"""Where REPA's extra training-step time goes: the real step (measure.train_step_fn, as `fm bench` runs it) of a
preset without REPA, with it, with its encoder replaced by a stub of the same output shape (no convolution work),
and with cheaper projectors, timed in interleaved rounds in one process so that every variant sees the same load.

    PYTHONPATH=$PWD python benchmarks/repa_step_cost.py --preset quickstart --batch 32 [--set KEY=VALUE ...]

Prints each variant's median step time over the rounds, its ratio to the step without REPA and the rounds
themselves. `fm bench` reports the with/without ratio alone (`repa.step_cost_vs_plain`); this splits it. Run it
alone on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn as nn

import fmcli.measure as measure
import fmcli.repa as repa
from fmcli.config import config_to_dict, load_config, resolve_without_data
from fmcli.hardware import resolve_hardware
from fmcli.models import build_model


class StubEncoder(nn.Module):
    """The encoder's output shape at no cost: what the rest of REPA costs without the encoder's forward."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.channels, self.stride = channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(x.shape[0], self.channels, x.shape[-2] // self.stride, x.shape[-1] // self.stride, device=x.device)


def step_fn(preset: str, overrides: list[str], batch: int, *, encoder=None, projector=None):
    """One real training step of the preset as a callable; `encoder` / `projector` replace REPA's for this build."""
    cfg = resolve_without_data(load_config(preset, overrides))
    m = cfg.model
    choice, compile_choice, ns_dtype = resolve_hardware(cfg, torch.device("cpu"), (m.in_channels, m.image_size, m.image_size))
    spec = measure.BenchSpec(config=config_to_dict(cfg), batch=batch, steps=1, warmup=0, precision=choice.precision,
                             compile=compile_choice.compile, device="cpu", muon_ns_dtype=ns_dtype)  # fmt: skip
    saved = measure.untrained_encoder, repa.build_projector
    if encoder is not None:
        measure.untrained_encoder = lambda c: repa.Encoder(encoder(c), "stub")
    if projector is not None:
        repa.build_projector = projector
    try:
        torch.manual_seed(0)
        return measure.train_step_fn(build_model(cfg.model), cfg, spec, torch.device("cpu")), cfg
    finally:
        measure.untrained_encoder, repa.build_projector = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quickstart")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE, as fm's --set (repeatable)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="steps per round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=15)
    args = ap.parse_args()

    on = [*args.overrides, "repa.encoder=domain"]
    off = [item for item in args.overrides if not item.split("=", 1)[0].strip().startswith("repa.")]  # REPA's own settings are unread without it (refused)
    plain, _ = step_fn(args.preset, [*off, "repa.encoder=none"], args.batch)
    with_repa, cfg = step_fn(args.preset, on, args.batch)
    dim = repa.untrained_encoder(cfg).module(torch.zeros(1, cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)).shape[1]
    variants = {
        "without REPA": plain,
        "REPA": with_repa,
        "REPA, encoder stubbed": step_fn(args.preset, on, args.batch, encoder=lambda c: StubEncoder(dim, c.repa.feature_stride))[0],
        "REPA, linear projector": step_fn(args.preset, on, args.batch, projector=lambda kind, width, d, hidden=256: nn.Linear(width, d))[0],
    }
    print(f"{args.preset}, batch {args.batch}, repa: {cfg.repa.model_dump()}", file=sys.stderr)
    for fn in variants.values():
        for _ in range(args.warmup):
            fn()
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append(1000 * (time.perf_counter() - start) / args.steps)
    base = statistics.median(times["without REPA"])
    for name, ms in times.items():
        med = statistics.median(ms)
        print(f"{name:24s} {med:7.1f} ms  {med / base:5.2f}x  rounds {', '.join(f'{v:.1f}' for v in ms)}")


if __name__ == "__main__":
    main()
