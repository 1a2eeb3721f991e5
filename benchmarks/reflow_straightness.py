"""How straight are a model's sampling paths? Mean path straightness (Liu et al. 2022) of checkpoints.

S = integral over t of E |(x1 - x0) - v(x_t, t)|^2 dt, per element: 0 for straight paths (then one Euler step
is exact). Estimated along a fine Euler trajectory (`--steps` steps, the model's CFG or `--cfg`) from fixed
noise with classes cycling: x1 is the trajectory's end, v the (guided) velocity used at each step.

    PYTHONPATH=$PWD python benchmarks/reflow_straightness.py --ckpt runs/quickstart --ckpt runs/quickstart-2rf
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fmcli.generate import class_conditions, initial_noise, labels_for, load_for_sampling
from fmcli.solvers import guided_velocity


@torch.no_grad()
def straightness(ckpt: str, n: int, steps: int, cfg: float | None, seed: int) -> dict:
    loaded = load_for_sampling(ckpt, torch.device("cpu"))
    w = loaded.config.sample.cfg if cfg is None else cfg
    labels = labels_for(range(n), loaded.num_classes, None)
    cond, uncond = class_conditions(labels, loaded.model.null_class) if labels is not None else ({}, None)
    velocity = guided_velocity(loaded.model, cond, uncond, cfg=w)
    s = path_straightness(velocity, initial_noise(seed, range(n), loaded.shape), steps)
    return {"ckpt": ckpt, "step": loaded.step, "cfg": w, "euler_steps": steps, "samples": n, "straightness": round(s, 5)}


@torch.no_grad()
def path_straightness(velocity, x0: torch.Tensor, steps: int) -> float:
    """Mean over Euler steps and elements of |v(x_t, t) - (x1 - x0)|^2, x1 the end of the same trajectory."""
    x, vs = x0.clone(), []
    ts = torch.linspace(0, 1, steps + 1, dtype=x0.dtype)
    for i in range(steps):
        v = velocity(x, ts[i])
        vs.append(v)
        x = x + (ts[i + 1] - ts[i]) * v
    chord = x - x0
    return torch.stack([((v - chord) ** 2).mean() for v in vs]).mean().item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", action="append", required=True, help="repeatable")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--cfg", type=float, default=None, help="default: each checkpoint's sample.cfg")
    ap.add_argument("--seed", type=int, default=123)
    args = ap.parse_args()
    for ckpt in args.ckpt:
        start = time.perf_counter()
        result = straightness(ckpt, args.n, args.steps, args.cfg, args.seed)
        print(json.dumps({**result, "seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
