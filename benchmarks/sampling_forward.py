"""The sampling network alone: forward passes of the quickstart-sized DiT (width 128, depth 4, patch 4, 32x32x3,
10 classes; random weights) at a sampling batch, in one process, per execution variant, without gradients as
sampling runs it. docs/benchmarks.md, "Sampling precision and compile" (the third measurement).

Variants: fp32 (eager), bf16 (autocast, eager), bf16c (bf16 compiled), bf16c-freeze (+ inductor freezing, as
generate.SamplingNet compiles), and -sdpa32 variants that force the attention back to fp32 (what sampling did
before the attention followed `torch.is_grad_enabled()`; models/dit._sdpa).

    PYTHONPATH=$PWD python benchmarks/sampling_forward.py --batch 500
    PYTHONPATH=$PWD python benchmarks/sampling_forward.py --batch 8 --repeats 2 --variants fp32,bf16c-freeze   # a quick check
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import fmcli.models.dit as dit
from fmcli.config import ModelConfig
from fmcli.models import build_model

VARIANTS = ("fp32", "bf16", "bf16-sdpa32", "bf16c-sdpa32", "bf16c-freeze-sdpa32", "bf16c", "bf16c-freeze")


def fp32_attention(q, k, v, attn_mask=None):
    """The attention as sampling ran it before: bf16 inputs upcast to fp32 with autocast off."""
    if q.dtype == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def seconds_per_forward(variant: str, model, inputs, repeats: int) -> float:
    import torch._inductor.config as inductor

    torch._dynamo.reset()
    inductor.freezing = "freeze" in variant
    compiled = variant.split("-")[0].endswith("c")
    net = torch.compile(model) if compiled else model
    original = dit._sdpa
    if "sdpa32" in variant:
        dit._sdpa = fp32_attention
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant.startswith("bf16"))
    try:
        with torch.no_grad():
            times = []
            for i in range(repeats + 2):  # two untimed calls: compiling, lazy kernels
                start = time.perf_counter()
                with amp:
                    net(*inputs)
                if i >= 2:
                    times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        dit._sdpa = original
        inductor.freezing = False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if unknown := [v for v in variants if v not in VARIANTS]:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=128, depth=4, heads=4, patch_size=4, image_size=32, in_channels=3, num_classes=10)).eval()
    for p in model.parameters():  # adaLN-Zero starts at zero output: give every weight a value
        p.data.normal_(0, 0.02)
    b = args.batch
    inputs = (torch.randn(b, 3, 32, 32), torch.rand(b), torch.randint(0, 10, (b,)))
    rows = {v: seconds_per_forward(v, model, inputs, args.repeats) for v in variants}
    base = rows.get("fp32")
    for v, s in rows.items():
        print(json.dumps({"variant": v, "batch": b, "ms_per_forward": round(1000 * s, 1), "img_evals_per_s": round(b / s, 1),
                          "speedup_vs_fp32": round(base / s, 2) if base else None}))  # fmt: skip


if __name__ == "__main__":
    main()
