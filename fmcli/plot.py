"""`fm plot`: loss, learning-rate (and FID, when logged) curves of a run from its metrics.jsonl.

matplotlib is an optional extra (`pip install 'fm[plot]'`); without it the command says how to install it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UsageError
from .fsutil import atomic_write

INSTALL_HINT = "pip install 'fm[plot]'  (or: pip install matplotlib)"


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(training records with a "loss", FID records with a "fid") from RUN_DIR/metrics.jsonl.

    Blank lines and a torn last line (a run killed mid-write) are skipped; other malformed lines are errors.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"{path} not found: give a run directory written by `fm train`")
    train, fid = [], []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                continue
            raise UsageError(f"{path}:{n} is not valid JSON") from None
        if "loss" in record and "step" in record:
            train.append(record)
        if "fid" in record and "step" in record:
            fid.append(record)
    if not train and not fid:
        raise UsageError(f"{path} has no loss or fid records yet (train.log_every steps must pass first)")
    return train, fid


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError(f"fm plot needs matplotlib: {INSTALL_HINT}") from None
    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the curves PNG (default RUN_DIR/loss.png) atomically; returns its path."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    train, fid = read_metrics(run_dir)
    out = Path(out) if out is not None else run_dir / "loss.png"
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UsageError(f"--out {out}: use a .png, .svg or .pdf file name")

    panels = [("loss", "loss", train, "log"), ("lr", "learning rate", train, "linear"), ("fid", "FID", fid, "linear")]
    panels = [p for p in panels if p[2] and any(p[0] in r for r in p[2])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (key, label, records, scale) in zip(axes[:, 0], panels):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if key == "fid" or len(pts) < 30 else None, lw=1.2)
        ax.set_ylabel(label)
        if scale == "log" and all(p[1] > 0 for p in pts):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(run_dir.name)
    fig.tight_layout()

    try:
        return atomic_write(out, lambda tmp: fig.savefig(tmp, format=out.suffix.lower().lstrip("."), dpi=110))
    finally:
        plt.close(fig)
