"""Mean-flow student vs 2-RF student vs teacher on shapes, at 1, 2 and 4 NFE: shape accuracy and a distribution metric.

Both students start from the same finished teacher (train.init_from) and fine-tune on the same reflow pairs at
an equal budget: `--steps` optimizer steps each (default: the reflow recipe's 2,500), or `--minutes` of wall
clock each (train.budget_minutes fits the steps). The 2-RF student is the README's reflow recipe (Euler, one
evaluation per step); the mean-flow student is `presets/quickstart-meanflow.toml` (its own jumps, one
evaluation per step); the teacher samples with its own CFG, one guided evaluation counted as one NFE (fm's
convention; it costs a doubled batch). Then, for every model and NFE:

- shape accuracy: fm's domain classifier of the data (benchmarks/shape_accuracy.py) on `--per-class` samples of every class;
- `fm eval --nfe ...` against the data: FD, recall, precision, coverage in the features of the dataset's own
  classifier (fm's domain features), beside the real-vs-real floor, and that classifier's conditional accuracy.

Steps already done in `--work` (pairs, runs) are reused, so a rerun only evaluates. Each line of stdout is a
JSON record; a Markdown table closes the output.

    PYTHONPATH=$PWD python benchmarks/meanflow_compare.py --data data/shapes-32-n20000-s0 \
        --teacher runs/quickstart --work runs/mf-compare
    # other mean-flow settings: --mf-set flow.meanflow_ratio=0.25 --mf-set flow.meanflow_power=0 --work runs/mf-r25
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parent.parent

from shape_accuracy import cached_classifier  # noqa: E402

from fmcli.config import overrides_with  # noqa: E402
from fmcli.generate import class_grid_samples, load_for_sampling  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the prepared shapes dataset the teacher was trained on")
    ap.add_argument("--teacher", required=True, help="the finished quickstart run (or checkpoint)")
    ap.add_argument("--work", required=True, help="folder for the pairs and the two students (reused when present)")
    ap.add_argument("--pairs", type=int, default=4000)
    ap.add_argument("--pair-steps", type=int, default=8, help="Heun steps of the teacher per pair")
    ap.add_argument("--steps", type=int, default=2500, help="fine-tuning steps of each student")
    ap.add_argument("--minutes", type=float, default=None, help="instead of --steps: this many minutes of training each")
    ap.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--teacher-steps", type=int, default=50, help="the teacher's reference accuracy at this many Euler steps")
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--fid-samples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--classifier", default=None, help="the domain classifier's cache (default: fm's, beside the data)")
    ap.add_argument("--mf-set", action="append", default=[], help="extra --set for the mean-flow student (repeatable)")
    ap.add_argument("--rf-set", action="append", default=[], help="extra --set for the 2-RF student (repeatable)")
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pairs = work / "pairs"
    if not pairs.exists():
        wall = fm("reflow", "--ckpt", args.teacher, "--num-pairs", args.pairs, "--solver", "heun", "--steps", args.pair_steps, "--out", pairs)
        emit({"made": "pairs", "count": args.pairs, "seconds": wall})
    students = {
        "2rf": ("quickstart", ["flow.coupling=pairs", "flow.cond_dropout=0", "flow.time_sampler=uniform", "flow.shift=1", "sample.cfg=1", "sample.steps=4", "optim.lr=1e-3"]),
        "meanflow": ("quickstart-meanflow", []),
    }
    for name, (preset, extra) in students.items():
        run = work / name
        if (run / "checkpoints" / "latest").exists():
            continue
        steps = 10**6 if args.minutes else args.steps
        budget = [f"train.budget_minutes={args.minutes}"] if args.minutes else []
        user = args.rf_set if name == "2rf" else args.mf_set  # the user's --*-set replace the script's own settings
        base = [f"train.init_from='{args.teacher}'", f"train.steps={steps}", *budget, f"train.sample_every={steps}", f"train.checkpoint_every={steps}", *extra]
        items = overrides_with(base, user)
        wall = fm("train", "--preset", preset, "--data", pairs, "--run-dir", run, *[a for item in items for a in ("--set", item)])
        emit({"trained": name, "preset": preset, "overrides": items, "seconds": wall, "steps": load_for_sampling(str(run), torch.device("cpu"), with_encoders=False).step})

    clf, held_out = cached_classifier(args.data, args.classifier)
    emit({"classifier_held_out_accuracy": round(held_out, 4)})
    models = {"teacher": args.teacher, "2rf": work / "2rf", "meanflow": work / "meanflow"}
    rows = []
    for name, ckpt in models.items():
        loaded = load_for_sampling(str(ckpt), torch.device("cpu"))
        solver = loaded.config.sample.solver  # euler for the teacher and 2-RF, meanflow for the mean-flow student
        budgets = list(dict.fromkeys(args.nfe + ([args.teacher_steps] if name == "teacher" else [])))
        fid = fid_rows(ckpt, args, budgets, solver)
        for nfe in budgets:
            row = {"model": name, "solver": solver, "cfg": loaded.config.sample.cfg, "nfe": nfe,
                   "accuracy": accuracy(loaded, clf, solver, nfe, args), **fid[nfe]}
            emit(row)
            rows.append(row)
    print(table(rows, args.nfe, args.teacher_steps))
    return 0


def fm(*args) -> float:
    """Run `fm ARGS` from this checkout; returns its wall time in seconds (raises on failure)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fmcli.cli", *map(str, args)], env=env, check=True)
    return round(time.perf_counter() - start, 1)


def accuracy(loaded, clf, solver: str, nfe: int, args) -> float:
    """Fraction of `per_class` samples per class that the classifier assigns to the requested class."""
    sample_cfg = loaded.config.sample.model_copy(update={"solver": solver, "steps": nfe})
    x, _ = class_grid_samples(loaded, args.per_class, seed=args.seed, sample_cfg=sample_cfg, batch_size=100, device=torch.device("cpu"))
    labels = torch.arange(loaded.num_classes).repeat_interleave(args.per_class)
    with torch.no_grad():
        return round((clf(x.clamp(-1, 1)).argmax(1) == labels).float().mean().item(), 3)


def fid_rows(ckpt, args, budgets: list[int], solver: str) -> dict[int, dict]:
    """`fm eval --nfe` at every budget, in the dataset's own classifier features: {nfe: FD, recall, precision,
    coverage, density, KID and the eval's conditional accuracy, with the real-vs-real floor's FD and recall}."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "fmcli.cli", "eval", "--ckpt", str(ckpt), "-n", str(args.fid_samples), "--data", str(args.data),
           "--solver", solver, "--nfe", ",".join(map(str, budgets)), "--seed", str(args.seed), "--batch-size", "250", "--json"]
    out = {}
    for r in json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout):  # one row per budget
        m, f = r["metrics"]["domain"], r["floor"]["metrics"]["domain"]
        out[r["steps"]] = {**{k: m[k] for k in ("fd", "kid", "precision", "recall", "density", "coverage") if k in m},
                           "eval_accuracy": r.get("accuracy"), "fd_floor": f["fd"], "recall_floor": f["recall"]}
    return out


def table(rows: list[dict], nfes: list[int], teacher_steps: int) -> str:
    """Markdown: one row per model, accuracy / FD / recall (domain features) at each NFE, then the floor."""
    head = "| model | solver | CFG | " + " | ".join(f"acc / FD / recall, {n} NFE" for n in nfes) + f" | {teacher_steps} steps |"
    lines = [head, "|" + "---|" * (4 + len(nfes))]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = {r["nfe"]: r for r in rows if r["model"] == model}
        first = next(iter(mine.values()))
        cells = [cell(mine[n]) if n in mine else "-" for n in nfes]
        ref = mine.get(teacher_steps) if model == "teacher" else None
        lines.append(f"| {model} | {first['solver']} | {first['cfg']:g} | " + " | ".join(cells) + f" | {cell(ref) if ref else '-'} |")
    floor = rows[0]
    lines.append(f"\nreal-vs-real floor (domain features): FD {floor['fd_floor']:.3f}, recall {floor['recall_floor']:.3f}")
    return "\n".join(lines)


def cell(row: dict) -> str:
    return f"{row['accuracy']:.3f} / {row.get('fd', float('nan')):.2f} / {row.get('recall', float('nan')):.2f}"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
