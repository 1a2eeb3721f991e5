"""What a mean-flow training step costs, part by part, at a preset's model size (default: quickstart's DiT).

Times (fastest of `--repeat`, milliseconds) the network's forward with the default SDPA kernel and with the math
backend (what attention costs inside the JVP, where only the math backend has forward-mode AD), the JVP itself
(`torch.func.jvp`, tangent (v, 1, 0), as step.mean_flow_target runs it), the flow-matching forward + backward,
and whole training steps (step.TrainingStep: EMA, optimizer) of the flow objective and of the mean-flow one at
several `flow.meanflow_ratio` values (the JVP runs on that fraction of the rows).

    PYTHONPATH=$PWD python benchmarks/meanflow_step_cost.py --preset quickstart --batch 32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fmcli.measure import BenchSpec, train_step_fn
from fmcli.bench import flow_twin
from fmcli.config import apply_overrides, load_config, resolve_without_data
from fmcli.models import build_model
from fmcli.hardware import autocast as autocast_for


def fastest(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1000 * min(times), 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quickstart")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    base = resolve_without_data(load_config(args.preset, ["flow.objective='meanflow'", "sample.solver='meanflow'", "flow.coupling='independent'"]))
    m = base.model
    torch.manual_seed(0)
    model = build_model(m)
    b = args.batch
    x, v = torch.randn(b, m.in_channels, m.image_size, m.image_size), torch.randn(b, m.in_channels, m.image_size, m.image_size)
    t = torch.rand(b) * 0.5
    cond = {"y": torch.arange(b) % m.num_classes, "t_end": t + 0.5}
    autocast = autocast_for(args.precision, torch.device("cpu"))

    def forward(backend=None):
        with torch.no_grad(), autocast, (sdpa_kernel(backend) if backend else contextlib.nullcontext()):
            model(x, t, **cond)

    def jvp():
        with torch.no_grad(), autocast, sdpa_kernel(SDPBackend.MATH):
            torch.func.jvp(lambda a, s: model(a, s, **cond), (x, t), (v, torch.ones_like(t)))

    def forward_backward():
        with autocast:
            out = model(x, t, **cond)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    row = {"preset": args.preset, "batch": b, "precision": args.precision, "threads": torch.get_num_threads(),
           "forward_ms": fastest(forward, args.repeat), "forward_math_sdpa_ms": fastest(lambda: forward(SDPBackend.MATH), args.repeat),
           "jvp_ms": fastest(jvp, args.repeat), "forward_backward_ms": fastest(forward_backward, args.repeat)}
    spec = BenchSpec(config={}, batch=b, precision=args.precision)
    step = train_step_fn(build_model(flow_twin(base).model), flow_twin(base), spec, torch.device("cpu"))
    row["flow_step_ms"] = fastest(step, args.repeat)
    for ratio in args.ratios:
        cfg = apply_overrides(base, [f"flow.meanflow_ratio={ratio}"])
        step = train_step_fn(build_model(cfg.model), cfg, spec, torch.device("cpu"))
        row[f"meanflow_step_ms_ratio_{ratio:g}"] = fastest(step, args.repeat)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
