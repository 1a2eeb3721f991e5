"""Why was our DiT slower than diffusers'? Time the two changes made to fmcli/models/dit.py one by one.

Variants (same process, alternating, fresh model per measurement): diffusers; `old` (the DiT before the
fix: q/k/v taken by qkv[i] indexing, fp32 positional embedding added to the residual stream); `+unbind`;
`+poscast`; `new` (both, the current code); `new+split3` (q, k, v from three GEMMs, the
layout diffusers gives SDPA: a candidate for the remaining forward gap). Prints the medians and the SDPA kernel PyTorch picks.

    PYTHONPATH=$PWD python benchmarks/profile_dit.py --device cuda --batch 256 --steps 20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from dataclasses import replace

import torch
import torch.nn.functional as F

from benchmarks.compare_diffusers import DIT_S2
from fmcli.bench import measure_bench as measure
from fmcli.measure import BenchSpec
from fmcli.config import resolve_without_data as resolve_bench_config
from fmcli.config import config_to_dict, load_config, overrides_with
from fmcli.models import dit


def old_attention_forward(self, x):
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    return self.proj(out.transpose(1, 2).reshape(b, n, d))


def old_dit_forward(self, x, t, y=None):
    if y is None:
        y = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
    h = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
    c = self.t_embed(t) + self.y_embed(y)
    for block in self.blocks:
        h = block(h, c)
    h = self.final(h, c)
    return self.unpatchify(h)


def split3_attention_forward(self, x):
    """q, k, v from three GEMMs on slices of the fused weight: the exact memory layout diffusers feeds SDPA."""
    b, n, d = x.shape
    h = self.heads
    q, k, v = (F.linear(x, w, bias).view(b, n, h, d // h).transpose(1, 2) for w, bias in zip(self.qkv.weight.chunk(3), self.qkv.bias.chunk(3)))
    out = F.scaled_dot_product_attention(q, k, v)
    return self.proj(out.transpose(1, 2).reshape(b, n, d))


@contextlib.contextmanager
def variant(name):
    saved = (dit.Attention.forward, dit.DiT.forward)
    if name in ("old", "old+poscast"):
        dit.Attention.forward = old_attention_forward
    if name in ("old", "old+unbind"):
        dit.DiT.forward = old_dit_forward
    if name == "new+split3":
        dit.Attention.forward = split3_attention_forward
    try:
        yield
    finally:
        dit.Attention.forward, dit.DiT.forward = saved


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--variants", default="diffusers,old,old+unbind,old+poscast,new,new+split3")
    args = ap.parse_args()
    cfg = resolve_bench_config(load_config("quickstart", overrides_with(overrides_with(DIT_S2, ["sample.steps=20"]), args.overrides)))
    base = BenchSpec(config=config_to_dict(cfg), batch=args.batch, mode="both", steps=args.steps, warmup=3, device=args.device)
    if args.device == "cuda":
        m = cfg.model
        q = torch.randn(args.batch, 256, 3, m.heads, m.hidden_size // m.heads, device="cuda")
        for dtype in (torch.float32, torch.bfloat16):
            qq = q.to(dtype)
            fused = qq.permute(2, 0, 3, 1, 4)
            sep = qq.unbind(2)
            print(f"sdpa choice {dtype}: indexed {torch._fused_sdp_choice(fused[0], fused[1], fused[2])}, "
                  f"unbind {torch._fused_sdp_choice(*(t.transpose(1, 2) for t in sep))}, "
                  f"contiguous {torch._fused_sdp_choice(*(t.transpose(1, 2).contiguous() for t in sep))} (0 math, 1 flash, 2 efficient, 3 cudnn)", file=sys.stderr)
    names = args.variants.split(",")
    report = {}
    for precision in args.precisions.split(","):
        res = {n: {"train": [], "sample": []} for n in names}
        for r in range(args.repeats):
            for n in names if r % 2 == 0 else names[::-1]:
                with variant(n):
                    spec = replace(base, precision=precision, sample_precision=precision, impl="diffusers" if n == "diffusers" else "fm")
                    out = measure(spec)  # in-process: the variant patches must apply
                for part in ("train", "sample"):
                    res[n][part].append(out[part]["img_per_s"])
        report[precision] = {n: {p: statistics.median(v) for p, v in parts.items()} for n, parts in res.items()}
        for n in names:
            print(f"{precision} {n:12s} train {report[precision][n]['train']:9.1f} img/s  sample {report[precision][n]['sample']:8.2f} img/s", file=sys.stderr)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
