"""`fm plot`: loss, learning-rate (and FID or the fidelity metrics, when logged) curves of a run from its
metrics.jsonl; FID-vs-NFE curves from the JSON of `fm fid --nfe ... --json`; the recall/FD-against-accuracy
frontier from the JSON of `fm eval ... --json`.

matplotlib is an optional extra (`pip install -e '.[plot]'` in the checkout); without it the command says how to install it.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path

from .errors import UsageError
from .fsutil import atomic_write, refuse_existing

FRONTIER_Y = ("recall", "precision", "coverage", "density", "fd", "kid")
INSTALL_HINT = "pip install matplotlib  (or, in the fm checkout: pip install -e '.[plot]')"


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(training records with a "loss", evaluation records with a "fid" or an "fd") from RUN_DIR/metrics.jsonl.

    Blank lines and a torn last line (a run killed mid-write) are skipped; other malformed lines are errors.
    A resumed run appends from its checkpoint's step, after records the interrupted run had already logged past it
    (a rollback moves the abandoned branch's records aside, train.Trainer._set_aside_outputs, but a run killed
    between checkpoints leaves them): a training record at or before the last one's step starts the current
    branch there, and every earlier record (training or evaluation) at its step or later is dropped.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"{path} not found: give a run directory written by `fm train`")
    train, fid = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not text: give a run directory written by `fm train`") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                continue
            raise UsageError(f"{path}:{n} is not valid JSON") from None
        if not isinstance(record, dict) or record.get("step", 0) is None or not _is_value(record.get("step", 0)):
            raise UsageError(f"{path}:{n} is not a metrics record (a JSON object with a numeric step)")
        if "loss" in record and "step" in record:
            if train and train[-1]["step"] >= record["step"]:  # a resume: the branch restarts here
                train, fid = _before(train, record["step"]), _before(fid, record["step"])
            train.append(record)
        if ("fid" in record or "fd" in record) and "step" in record:
            fid = _before(fid, record["step"]) if fid and fid[-1]["step"] >= record["step"] else fid
            fid.append(record)
    if not train and not fid:
        raise UsageError(f"{path} has no loss or fid records yet (train.log_every steps must pass first)")
    return train, fid


def _before(records: list[dict], step: int) -> list[dict]:
    return [r for r in records if r["step"] < step]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError(f"fm plot needs matplotlib: {INSTALL_HINT}") from None
    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def read_json_rows(path: Path) -> list[dict]:
    """The rows of one or more JSON outputs (a JSON list, or such lists / objects one per line)."""
    return [r for chunk in read_json_chunks(path) for r in (chunk if isinstance(chunk, list) else [chunk])]


def read_json_chunks(path: Path) -> list:
    """The JSON outputs in a file, each as written (a list of rows or one object): one, or one per line."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:  # an image or other binary file
        raise UsageError(f"{path} is not text: give a run directory or the JSON of `fm fid --nfe ... --json` or `fm eval ... --json`") from None
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        chunks = [json.loads(text)]
    except json.JSONDecodeError:
        try:
            chunks = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise UsageError(f"{path} is neither a run directory nor the JSON of `fm fid --nfe ... --json` or `fm eval ... --json`") from None
    return chunks


def read_nfe_sweep(path: str | Path) -> list[dict]:
    """The rows of one or more `fm fid --nfe ... --json` outputs (a JSON list, or such lists one per line), each
    row with `_sweep`: the index of the list it came from (None for a single row, `fm fid --json` without --nfe,
    or a one-budget sweep: such rows appended one by one are points of one curve, joined per setting)."""
    path = Path(path)
    rows = [
        {**r, "_sweep": i if isinstance(chunk, list) and len(chunk) > 1 else None} if isinstance(r, dict) else r
        for i, chunk in enumerate(read_json_chunks(path)) for r in (chunk if isinstance(chunk, list) else [chunk])
    ]  # fmt: skip
    if not rows or not all(isinstance(r, dict) and _is_value(r.get("fid", "")) and "nfe_per_sample" in r for r in rows):
        raise UsageError(f"{path}: expected rows with 'fid' and 'nfe_per_sample', as written by `fm fid --nfe 1,2,4,8 --json`")
    return rows


def _is_value(v) -> bool:
    """A number, or null: `--json` writes a non-finite one (a diverged FID) as null (console.emit_json)."""
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _num(v) -> float:
    """A value of a row as a float; null (non-finite when written) is NaN, which matplotlib leaves out."""
    return float("nan") if v is None else float(v)


def plot_sweep(path: str | Path, out: str | Path | None = None, y: str | None = None, force: bool = False) -> Path:
    """A sweep file: `fm eval` rows (they have "metrics") as a frontier (`y` against accuracy, default recall),
    `fm fid --nfe` rows as FID-vs-NFE (which has no `y` to choose: one given is refused, not ignored)."""
    rows = read_json_rows(Path(path))
    if rows and all(isinstance(r, dict) and "metrics" in r for r in rows):
        return plot_frontier(path, out, y=y or "recall", force=force)
    if y is not None:
        raise UsageError(f"--y chooses the metric of an `fm eval` sweep's frontier; {path} holds `fm fid --nfe` rows (FID against NFE)")
    return plot_nfe_sweep(path, out, force=force)


def _sweep_output(out, path: Path, force: bool) -> Path:
    """--out, else SWEEP.png beside the sweep: a name the user may have used for a file of their own, so an
    existing one needs --force (unlike RUN/loss.png, fm's own file in a run directory)."""
    if out is not None:
        return _output_path(out, None)
    default = path.with_suffix(".png")
    if default.resolve() == path.resolve():
        raise UsageError(f"{path}: the default output {default.name} would replace the sweep itself; pass --out FILE.png")
    refuse_existing(default, force)
    return default


def plot_frontier(path: str | Path, out: str | Path | None = None, y: str = "recall", force: bool = False) -> Path:
    """`y` (recall, precision, coverage, density or fd) against conditional accuracy, one point per sampling
    setting (its sd over the reference draws, `*_sd`, as an error bar) and one panel per feature space, the
    real-vs-real floor as a star: the user picks a point."""
    if y not in FRONTIER_Y:
        raise UsageError(f"--y {y}: choose one of {', '.join(FRONTIER_Y)}")
    path = Path(path)
    rows = read_json_rows(path)
    if not all(isinstance(r["metrics"], dict) and r["metrics"] and all(isinstance(m, dict) for m in r["metrics"].values()) for r in rows):
        raise UsageError(f"{path}: expected rows with 'metrics' per feature space, as written by `fm eval ... --json`")
    if any(y not in m for r in rows for m in r["metrics"].values()):  # kid: absent from `fm eval --no-kid` rows
        have = [k for k in FRONTIER_Y if all(k in m for r in rows for m in r["metrics"].values())]
        raise UsageError(f"--y {y}: not every row of {path} has it (e.g. `fm eval --no-kid` writes no kid); choose one of {', '.join(have)}")
    out = _sweep_output(out, path, force)
    plt = _pyplot()
    spaces = list(dict.fromkeys(s for r in rows for s in r["metrics"]))  # appended evaluations may score other spaces
    x_key = "accuracy" if all("accuracy" in r for r in rows) else "precision"  # unconditional: precision-recall
    fig, axes = plt.subplots(1, len(spaces), figsize=(6 * len(spaces), 4.5), squeeze=False)
    for ax, space in zip(axes[0], spaces):
        several = len({(r.get("ckpt"), r.get("step")) for r in rows}) > 1  # appended evaluations of other checkpoints
        sizes = len({r.get("num_samples") for r in rows}) > 1  # appended evaluations at another -n
        pts = [(_x(r, space, x_key), _num(r["metrics"][space][y]), _label(r, several) + (f", n {r.get('num_samples')}" if sizes else ""))
               for r in rows if space in r["metrics"]]  # fmt: skip
        _note_left_out([p[2] for p in pts if math.isnan(p[0]) or math.isnan(p[1])], f"{x_key} or {y} ({space})")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color="tab:blue")
        spread = [_num(r["metrics"][space].get(f"{y}_sd")) for r in rows if space in r["metrics"]]
        if any(not math.isnan(sd) for sd in spread):  # one sd over `fm eval`'s reference draws (--splits)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=spread, fmt="none", ecolor="tab:blue", alpha=0.5, capsize=2)
        for px, py, label in pts:
            ax.annotate(label, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
        floors = _floors(rows, space)
        for i, (floor, name) in enumerate(floors):
            color = ("tab:green", "tab:orange", "tab:red", "tab:purple", "tab:brown")[i % 5]  # never the points' blue
            ax.plot([_x(floor, space, x_key)], [_num(floor["metrics"][space][y])], "*", ms=12, color=color, label=name)
        if floors:
            ax.legend(loc="best")
        ax.set_xlabel("conditional accuracy" if x_key == "accuracy" else "precision")
        ax.set_ylabel(f"{'FD' if y == 'fd' else y} ({space} features)")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, plt, out)


def _floors(rows: list[dict], space: str) -> list[tuple[dict, str]]:
    """The distinct real-vs-real floors of the rows (appended evaluations at another -n or against other data
    have their own), each with its legend name: by its sample count where that tells them apart."""
    floors = {}
    for r in rows:
        floor = r.get("floor")
        if isinstance(floor, dict) and space in floor.get("metrics", {}):
            floors.setdefault(json.dumps(floor, sort_keys=True), floor)
    counts = [f.get("floor_count") for f in floors.values()]
    if len(floors) < 2:
        return [(f, "real vs real") for f in floors.values()]
    by_count = len(set(map(str, counts))) == len(counts)
    return [(f, f"real vs real, n {f.get('floor_count')}" if by_count else f"real vs real ({i + 1})") for i, f in enumerate(floors.values())]


def _note_left_out(labels: list[str], what: str) -> None:
    """A note on stderr naming the points not drawn: `--json` wrote their value as null (non-finite, a diverged run)."""
    if labels:
        print(f"note: {what} is null (non-finite) and not drawn for: {'; '.join(labels)}", file=sys.stderr)


def _x(row: dict, space: str, key: str) -> float:
    return _num(row["accuracy"] if key == "accuracy" else row["metrics"][space]["precision"])


def _label(row: dict, name_checkpoint: bool = False) -> str:
    """cfg 2 [0.2,1] nfe 8: the setting of one point (led by its checkpoint and step where the file holds several)."""
    if "cfg" not in row:
        return Path(row.get("gen", "")).name
    interval = row.get("guidance_interval")
    where = f"{Path(str(row.get('ckpt', ''))).name}@{row.get('step')}: " if name_checkpoint else ""
    return where + f"cfg {row['cfg']:g}" + (f" [{interval[0]:g},{interval[1]:g}]" if interval else "") + f" nfe {row.get('nfe_per_sample', 0):g}"


def plot_nfe_sweep(path: str | Path, out: str | Path | None = None, force: bool = False) -> Path:
    """FID against the NFE each sample used (log2 axis), one curve per appended sweep (single rows: per setting)
    and per (solver, guidance, cfg) and checkpoint, interval or other setting the rows differ in
    (_CURVE_SETTINGS), labelled by them (and by the sweep's place in the file where two curves would share a
    label: two sweeps are never joined into one line); returns the image path."""
    path = Path(path)
    rows = read_nfe_sweep(path)
    out = _sweep_output(out, path, force)
    plt = _pyplot()
    _note_left_out([f"{_curve_label(r, rows)}, nfe {r['nfe_per_sample']:g}" for r in rows if r["fid"] is None], "fid")
    curves: dict[tuple, list[tuple[float, float]]] = {}
    for r in rows:
        curves.setdefault((r["_sweep"], _curve_label(r, rows)), []).append((float(r["nfe_per_sample"]), _num(r["fid"])))
    shared = Counter(setting for _, setting in curves)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (sweep, setting), pts in curves.items():
        label = setting if shared[setting] == 1 or sweep is None else f"{setting} (sweep {sweep + 1})"
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=1.2, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("network evaluations per sample (NFE)")
    features = {r.get("features", "inception") for r in rows}
    ax.set_ylabel("FID" if features == {"inception"} else f"FD ({', '.join(sorted(features))} features)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, plt, out)


# Settings besides solver, guidance and cfg that make an `fm fid --nfe` row part of another curve (another
# checkpoint, guidance interval, SDE noise, the network's precision, the reference's size, ...): rows that differ in
# one of them are never joined.
_CURVE_SETTINGS = ("ckpt", "step", "guide_ckpt", "guidance_interval", "sde_noise", "zero_init_steps", "rtol", "atol", "seed", "num_samples",
                   "features", "precision", "ref_count")  # fmt: skip


def _curve_label(row: dict, rows: list[dict]) -> str:
    """euler, cfg 4 (plus each setting of _CURVE_SETTINGS that differs between the rows of that solver, guidance
    and cfg, where this row has it): one curve's name."""
    base = _curve_base(row)
    label = f"{row.get('solver', '?')}, {row.get('guidance', 'cfg')} {row.get('cfg', 1):g}"
    for key in _CURVE_SETTINGS:
        value = row.get(key)
        if value is not None and len({json.dumps(r.get(key)) for r in rows if _curve_base(r) == base}) > 1:
            label += f", {key} " + (f"[{value[0]:g},{value[1]:g}]" if isinstance(value, list) and len(value) == 2 else str(value))
    return label


def _curve_base(row: dict) -> tuple:
    return row.get("solver"), row.get("guidance", "cfg"), row.get("cfg", 1)


def _output_path(out, default: Path) -> Path:
    out = Path(out) if out is not None else default
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UsageError(f"--out {out}: use a .png, .svg or .pdf file name")
    return out


def _save(fig, plt, out: Path) -> Path:
    try:
        return atomic_write(out, lambda tmp: fig.savefig(tmp, format=out.suffix.lower().lstrip("."), dpi=110))
    finally:
        plt.close(fig)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the curves PNG (default RUN_DIR/loss.png) atomically; returns its path."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    train, fid = read_metrics(run_dir)
    out = _output_path(out, run_dir / "loss.png")

    panels = [
        (("loss",), "loss", train, "log"), (("lr",), "learning rate", train, "linear"), (("fid",), "FID", fid, "linear"),
        (("fd",), "FD", fid, "linear"), (("precision", "recall", "coverage"), "fidelity", fid, "linear"), (("accuracy",), "accuracy", fid, "linear"),
    ]  # fmt: skip
    panels = [p for p in panels if p[2] and any(k in r for r in p[2] for k in p[0])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (keys, label, records, scale) in zip(axes[:, 0], panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            _note_left_out([f"step {r['step']}" for r in records if key in r and not (isinstance(r[key], (int, float)) and math.isfinite(r[key]))], key)
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if records is fid or len(pts) < 30 else None, lw=1.2, label=key if len(keys) > 1 else None)
            floor = [r[f"{key}_floor"] for r in records if isinstance(r.get(f"{key}_floor"), (int, float))]
            if floor:  # the real-vs-real floor: where a perfect model would be
                ax.axhline(floor[-1], ls="--", lw=1, color=line[0].get_color(), alpha=0.7)
        if len(keys) > 1:
            ax.legend(loc="best", fontsize=8)
        ax.set_ylabel(label)
        if scale == "log" and pts and all(p[1] > 0 for p in pts):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    return _save(fig, plt, out)
