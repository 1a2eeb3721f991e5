"""fm plot: curves from metrics.jsonl (matplotlib is the `plot` extra, installed by CI)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import fm_env, fm_in_process
from fmcli.errors import UsageError
from fmcli.plot import read_metrics


def _write_metrics(run_dir, with_fid=True, torn=False):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-3 * min(1, s / 5), "grad_norm": 0.5}) for s in range(1, 21)]
    if with_fid:
        lines.insert(10, json.dumps({"step": 10, "fid": 80.0, "fid_num_samples": 64}))
        lines.append(json.dumps({"step": 20, "fid": 60.0, "fid_num_samples": 64}))
    text = "\n".join(lines) + "\n" + ('{"step": 21, "lo' if torn else "")
    (run_dir / "metrics.jsonl").write_text(text)


def test_read_metrics_separates_fid_records(tmp_path):
    _write_metrics(tmp_path / "run", torn=True)
    train, fid = read_metrics(tmp_path / "run")
    assert [r["step"] for r in train] == list(range(1, 21))  # FID lines and the torn last line skipped
    assert [(r["step"], r["fid"]) for r in fid] == [(10, 80.0), (20, 60.0)]


def test_read_metrics_shows_the_current_branch_of_a_resumed_run(tmp_path):
    # Logged to step 15 (FID at 10 and 15), then resumed from a step-12 checkpoint and run to 18 (FID at 18).
    rows = [{"step": s, "loss": 1.0} for s in range(1, 16)] + [{"step": 10, "fid": 9.0}, {"step": 15, "fid": 7.0}]
    rows = sorted(rows, key=lambda r: r["step"]) + [{"step": s, "loss": 2.0} for s in range(13, 19)] + [{"step": 18, "fid": 5.0}]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, fid = read_metrics(tmp_path / "run")
    assert [(r["step"], r["loss"]) for r in train] == [(s, 1.0) for s in range(1, 13)] + [(s, 2.0) for s in range(13, 19)]
    assert [(r["step"], r["fid"]) for r in fid] == [(10, 9.0), (18, 5.0)]  # the abandoned branch's FID at 15 is gone


def test_read_metrics_rejects_a_run_without_metrics(tmp_path):
    with pytest.raises(UsageError, match="metrics.jsonl not found"):
        read_metrics(tmp_path)


def test_fm_plot_writes_a_png_with_three_panels(tmp_path):
    pytest.importorskip("matplotlib")  # the `plot` extra; .ci/run installs it
    run = tmp_path / "run"
    _write_metrics(run)
    out = tmp_path / "out" / "curves.png"
    res = fm_in_process("plot", run, "--out", out)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(out)
    img = np.asarray(Image.open(out).convert("L"))
    assert img.shape[0] > img.shape[1]  # three stacked panels: loss, lr, fid
    assert img.std() > 5  # not a blank canvas
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp file left behind

    _write_metrics(run, with_fid=False)
    res = fm_in_process("plot", run)  # default: RUN_DIR/loss.png, two panels
    assert res.returncode == 0, res.stderr
    two = np.asarray(Image.open(run / "loss.png").convert("L"))
    assert two.shape[0] < img.shape[0]


def test_fm_plot_without_matplotlib_says_how_to_install(tmp_path):
    _write_metrics(tmp_path / "run")
    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.argv = ['fm', 'plot', sys.argv[1]];"
        "from fmcli.cli import app; app()"
    )
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True, timeout=120, env=fm_env())
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["error: fm plot needs matplotlib: pip install matplotlib  (or, in the fm checkout: pip install -e '.[plot]')"]


def test_fm_plot_sweep_keeps_an_existing_default_output_unless_forced(tmp_path):
    pytest.importorskip("matplotlib")
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps([{"fid": 40.0 / n, "nfe_per_sample": n, "solver": "euler"} for n in (1, 2, 4)]))
    png = tmp_path / "sweep.png"
    png.write_bytes(b"the user's own sweep.png")
    res = fm_in_process("plot", sweep)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [f"error: {png} already exists; pass --force to replace it"]
    assert png.read_bytes() == b"the user's own sweep.png"
    res = fm_in_process("plot", sweep, "--force")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(png) and Image.open(png).size[0] > 100


def test_fm_plot_y_is_refused_where_there_is_no_frontier_not_ignored(tmp_path):
    # --y picks an `fm eval` frontier's metric; on an NFE sweep or a run directory it was silently ignored.
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps([{"fid": 40.0 / n, "nfe_per_sample": n, "solver": "euler"} for n in (1, 2, 4)]))
    _write_metrics(tmp_path / "run")
    for target in (sweep, tmp_path / "run"):
        res = fm_in_process("plot", str(target), "--y", "fd")
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--y chooses the metric of an `fm eval` sweep" in res.stderr, res.stderr
    assert not (tmp_path / "sweep.png").exists() and not (tmp_path / "run" / "loss.png").exists()


def test_fm_plot_of_a_binary_file_is_one_line(tmp_path):
    image = tmp_path / "curves.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    res = fm_in_process("plot", image)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: {image} is not text: give a run directory or the JSON of `fm fid --nfe ... --json` or `fm eval ... --json`"]


def test_fm_plot_frontier_y_kid_of_rows_without_kid_is_a_usage_error(tmp_path):
    """`fm eval --no-kid` rows have no kid: `fm plot FILE --y kid` says so (exit 2), not a KeyError (exit 1)."""
    from fmcli.plot import plot_sweep

    pytest.importorskip("matplotlib")
    scores = {"fd": 1.0, "precision": 0.5, "recall": 0.6, "density": 0.7, "coverage": 0.4}
    rows = [{"cfg": c, "guidance_interval": None, "nfe_per_sample": 8, "metrics": {"domain": scores}, "accuracy": 0.5 + c / 10,
             "floor": {"metrics": {"domain": scores}, "accuracy": 0.99}} for c in (1, 2)]
    sweep = tmp_path / "frontier.json"
    sweep.write_text(json.dumps(rows))
    with pytest.raises(UsageError, match="--y kid") as err:
        plot_sweep(sweep, tmp_path / "f.png", y="kid")
    assert "recall" in str(err.value) and "kid" not in str(err.value).split("choose one of")[1]
    assert not (tmp_path / "f.png").exists()
    assert plot_sweep(sweep, tmp_path / "f.png", y="fd").is_file()  # the metrics the rows do have still plot


def _record_plotted(monkeypatch):
    """The (x, y) lists every Axes.plot call draws."""
    import matplotlib.axes

    drawn, plot = [], matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, x, y, *a, **k: drawn.append((list(x), list(y))) or plot(ax, x, y, *a, **k))
    return drawn


def test_fm_plot_of_sweeps_with_a_null_value_leaves_that_point_out(tmp_path, monkeypatch):
    """`--json` writes a non-finite FID or FD as null (console.emit_json): `fm plot` of such an `fm fid --nfe` or
    `fm eval` output draws the other points (null as NaN, a gap), not a refusal or a TypeError."""
    pytest.importorskip("matplotlib")
    drawn = _record_plotted(monkeypatch)
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps([{"fid": None, "nfe_per_sample": 1, "solver": "euler"}, {"fid": 4.0, "nfe_per_sample": 2, "solver": "euler"}]))
    res = fm_in_process("plot", str(sweep))
    assert res.returncode == 0, res.stderr
    (x, y), = drawn
    assert x == [1.0, 2.0] and np.isnan(y[0]) and y[1] == 4.0
    scores = {"fd": None, "precision": 0.5, "recall": 0.6, "density": 0.7, "coverage": 0.4}
    rows = [{"cfg": c, "nfe_per_sample": 8, "metrics": {"tiny": dict(scores, fd=None if c == 1 else 3.0)}, "floor": {"metrics": {"tiny": scores}}} for c in (1, 2)]
    frontier = tmp_path / "frontier.json"
    frontier.write_text(json.dumps(rows))
    drawn.clear()
    res = fm_in_process("plot", str(frontier), "--y", "fd")
    assert res.returncode == 0, res.stderr
    (x, y), (fx, fy) = drawn  # the points, then the real-vs-real floor
    assert x == [0.5, 0.5] and np.isnan(y[0]) and y[1] == 3.0 and fx == [0.5] and np.isnan(fy[0])


@pytest.mark.parametrize("metrics", [{}, 5, {"tiny": 5}])
def test_fm_plot_of_eval_rows_with_malformed_metrics_is_a_usage_error(tmp_path, metrics):
    pytest.importorskip("matplotlib")
    frontier = tmp_path / "frontier.json"
    frontier.write_text(json.dumps([{"cfg": 1, "metrics": metrics}]))
    res = fm_in_process("plot", str(frontier))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: {frontier}: expected rows with 'metrics' per feature space, as written by `fm eval ... --json`"]
    assert not (tmp_path / "frontier.png").exists()


@pytest.mark.parametrize("first", ['5', '["step", 1]', '{"step": "a", "loss": 1}', '{"step": null, "loss": 1}'])
def test_read_metrics_names_a_line_that_is_not_a_record(tmp_path, first):
    """A damaged metrics.jsonl line that parses as JSON but is no record is one usage error naming it (exit 2), as
    invalid JSON is, not a TypeError."""
    (tmp_path / "metrics.jsonl").write_text(first + '\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(UsageError, match=r"metrics.jsonl:1 is not a metrics record"):
        read_metrics(tmp_path)


def test_read_metrics_of_a_binary_file_is_a_usage_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_bytes(b'\xff\xfe\x00\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(UsageError, match="is not text"):
        read_metrics(tmp_path)


def test_fm_plot_draws_each_appended_sweep_as_its_own_curve(tmp_path, monkeypatch):
    """Two models' `fm fid --nfe 1,2,4 --json >> sweep.json` at the same solver and cfg (a 2-RF student and its
    distilled one-step model, both Euler at cfg 1) are two curves, each through its own three points, not one
    line zig-zagging between the models; single rows (`fm fid --json` without --nfe) still join per setting."""
    pytest.importorskip("matplotlib")
    drawn = _record_plotted(monkeypatch)
    a = [{"fid": f, "nfe_per_sample": n, "solver": "euler", "cfg": 1.0} for n, f in ((1, 9.0), (2, 8.0), (4, 7.0))]
    b = [{"fid": f, "nfe_per_sample": n, "solver": "euler", "cfg": 1.0} for n, f in ((1, 5.0), (2, 4.0), (4, 3.0))]
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps(a) + "\n" + json.dumps(b) + "\n")
    res = fm_in_process("plot", str(sweep))
    assert res.returncode == 0, res.stderr
    assert sorted(drawn) == [([1.0, 2.0, 4.0], [5.0, 4.0, 3.0]), ([1.0, 2.0, 4.0], [9.0, 8.0, 7.0])]
    drawn.clear()
    singles = tmp_path / "singles.json"
    singles.write_text("".join(json.dumps(r) + "\n" for r in a))
    assert fm_in_process("plot", str(singles)).returncode == 0
    assert drawn == [([1.0, 2.0, 4.0], [9.0, 8.0, 7.0])]


def test_fm_plot_keeps_appended_sweeps_of_other_checkpoints_or_intervals_apart(tmp_path, monkeypatch):
    """`fm fid --nfe ... --json >> sweep.json` for two checkpoints (or two guidance intervals) of the same solver and
    cfg: each sweep is its own curve, as the README says. The curves were keyed by (solver, guidance, cfg) only, so
    such sweeps were joined into one zig-zag line with two points per NFE."""
    pytest.importorskip("matplotlib")
    drawn = _record_plotted(monkeypatch)
    common = {"solver": "euler", "guidance": "cfg", "cfg": 4.0, "seed": 0, "num_samples": 16, "features": "tiny-randconv-v1"}
    sweeps = [  # (ckpt, step, interval): three sweeps at NFE 2 and 4
        [dict(common, ckpt="runs/ot", step=40, guidance_interval=None, nfe_per_sample=n, fid=10.0 / n) for n in (2, 4)],
        [dict(common, ckpt="runs/ot", step=40, guidance_interval=[0.5, 1.0], nfe_per_sample=n, fid=20.0 / n) for n in (2, 4)],
        [dict(common, ckpt="runs/c10", step=40, guidance_interval=None, nfe_per_sample=n, fid=30.0 / n) for n in (2, 4)],
    ]
    sweep = tmp_path / "sweep.json"
    sweep.write_text("".join(json.dumps(rows) + "\n" for rows in sweeps))
    res = fm_in_process("plot", str(sweep))
    assert res.returncode == 0, res.stderr
    assert sorted(drawn) == [([2.0, 4.0], [5.0, 2.5]), ([2.0, 4.0], [10.0, 5.0]), ([2.0, 4.0], [15.0, 7.5])]
    from fmcli.plot import _curve_label

    rows = [r for rows in sweeps for r in rows]
    assert [_curve_label(rows[i], rows) for i in (0, 2, 4)] == [
        "euler, cfg 4, ckpt runs/ot", "euler, cfg 4, ckpt runs/ot, guidance_interval [0.5,1]", "euler, cfg 4, ckpt runs/c10"]
    drawn.clear()  # rows of one setting appended point by point still make one curve
    sweep.write_text("".join(json.dumps([r]) + "\n" for r in sweeps[0]))
    assert fm_in_process("plot", str(sweep), "--force").returncode == 0
    assert drawn == [([2.0, 4.0], [5.0, 2.5])]


def test_fm_plot_reads_rows_written_before_and_after_nfe_and_nfe_max(tmp_path, monkeypatch):
    """`fm fid`/`fm eval --json` rows gained `nfe`, `nfe_max` and `steps` null for dopri5 (with rtol/atol): a file
    with an old sweep and a new one appended still plots each as its curve at its `nfe_per_sample`, the eval
    frontier of new rows plots, and the eval table names a dopri5 row by its tolerances, not "dopri5 None"."""
    pytest.importorskip("matplotlib")
    from fmcli.fidelity import format_table

    drawn = _record_plotted(monkeypatch)
    common = {"solver": "heun", "guidance": "cfg", "cfg": 2.0, "seed": 0, "num_samples": 16, "features": "tiny-randconv-v1", "guidance_interval": None}
    old = [dict(common, nfe_budget=n, nfe_per_sample=float(n), steps=n // 2, fid=8.0 / n, ckpt="runs/a") for n in (2, 4)]
    new = [dict(common, nfe_budget=n, nfe_per_sample=float(n), nfe=n, nfe_max=n, steps=n // 2, fid=4.0 / n, ckpt="runs/b", precision="fp32") for n in (2, 4)]
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps(old) + "\n" + json.dumps(new) + "\n")
    res = fm_in_process("plot", str(sweep))
    assert res.returncode == 0, res.stderr
    assert sorted(drawn) == [([2.0, 4.0], [2.0, 1.0]), ([2.0, 4.0], [4.0, 2.0])]
    scores = {"fd": 1.0, "precision": 0.5, "recall": 0.6, "density": 0.7, "coverage": 0.4}
    floor = {"metrics": {"tiny": scores}, "floor_count": 8, "ref_count": 8}
    rows = [
        {"solver": "dopri5", "steps": None, "rtol": 1e-3, "atol": 1e-4, "guidance": "cfg", "cfg": 2.0, "guidance_interval": None,
         "nfe_per_sample": 40.5, "nfe": 40.5, "nfe_max": 46, "metrics": {"tiny": scores}, "floor": floor},
        {"solver": "euler", "steps": 8, "guidance": "cfg", "cfg": 1.0, "guidance_interval": None, "nfe_per_sample": 8.0, "metrics": {"tiny": scores}, "floor": floor},
    ]  # fmt: skip
    frontier = tmp_path / "frontier.json"
    frontier.write_text(json.dumps(rows))
    assert fm_in_process("plot", str(frontier)).returncode == 0 and (tmp_path / "frontier.png").is_file()
    table = format_table(floor, rows)
    assert "cfg 2, dopri5 0.001/0.0001" in table and "cfg 1, euler 8" in table and "None" not in table


def test_frontier_points_of_two_checkpoints_name_their_checkpoint():
    # Two `fm eval --json` files appended into one: the same cfg at two checkpoints must not read as one label twice.
    from fmcli.plot import _label

    rows = [{"ckpt": f"runs/{name}", "step": step, "cfg": 2.0, "guidance_interval": [0.3, 1.0], "nfe_per_sample": 50}
            for name, step in (("a", 100), ("b", 200))]
    assert _label(rows[0]) == "cfg 2 [0.3,1] nfe 50"
    assert [_label(r, True) for r in rows] == ["a@100: cfg 2 [0.3,1] nfe 50", "b@200: cfg 2 [0.3,1] nfe 50"]


def test_frontier_of_evaluations_at_two_sample_counts_draws_each_floor_and_names_the_count(tmp_path, monkeypatch):
    # `fm eval -n 100 --json >> f.json; fm eval -n 1000 --json >> f.json`: each evaluation has its own floor (the
    # floor depends on n); drawing only the first row's put the n=1000 point against the n=100 floor, and the two
    # points of the same cfg read as one label twice.
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    drawn = _record_plotted(monkeypatch)
    texts = []
    annotate = matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", lambda ax, text, *a, **k: texts.append(text) or annotate(ax, text, *a, **k))

    def row(n, acc, recall, floor_recall):
        scores = {"fd": 1.0, "precision": 0.5, "recall": recall, "density": 0.7, "coverage": 0.4, "recall_sd": 0.01, "fd_sd": 0.1}
        floor = {"ref_count": n, "floor_count": n, "splits": 5, "accuracy": 0.99, "metrics": {"domain": dict(scores, recall=floor_recall)}}
        return {"ckpt": "runs/a", "step": 100, "cfg": 2.0, "nfe_per_sample": 8, "num_samples": n, "accuracy": acc,
                "metrics": {"domain": scores}, "floor": floor}

    frontier = tmp_path / "frontier.json"
    frontier.write_text(json.dumps([row(100, 0.5, 0.7, 0.9)]) + "\n" + json.dumps([row(1000, 0.6, 0.75, 0.97)]) + "\n")
    res = fm_in_process("plot", str(frontier))
    assert res.returncode == 0, res.stderr
    points, *floors = drawn
    assert points == ([0.5, 0.6], [0.7, 0.75])
    assert sorted(floors) == [([0.99], [0.9]), ([0.99], [0.97])]
    assert texts == ["cfg 2 nfe 8, n 100", "cfg 2 nfe 8, n 1000"]


def test_fm_plot_names_the_points_a_null_value_leaves_out(tmp_path):
    # A diverged setting (`--json` writes its non-finite FID/FD as null) is a gap in the picture: stderr says which.
    pytest.importorskip("matplotlib")
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps([{"fid": None, "nfe_per_sample": 1, "solver": "euler"}, {"fid": 4.0, "nfe_per_sample": 2, "solver": "euler"}]))
    res = fm_in_process("plot", str(sweep))
    assert res.returncode == 0, res.stderr
    assert "not drawn for: euler, cfg 1, nfe 1" in res.stderr and "nfe 2" not in res.stderr
    scores = {"fd": 3.0, "precision": 0.5, "recall": 0.6, "density": 0.7, "coverage": 0.4}
    rows = [{"cfg": c, "nfe_per_sample": 8, "accuracy": 0.5, "metrics": {"tiny": dict(scores, fd=None if c == 4 else 3.0)}} for c in (1, 4)]
    frontier = tmp_path / "frontier.json"
    frontier.write_text(json.dumps(rows))
    res = fm_in_process("plot", str(frontier), "--y", "fd")
    assert res.returncode == 0, res.stderr
    assert "not drawn for: cfg 4 nfe 8" in res.stderr and "cfg 1" not in res.stderr


def test_fm_plot_keeps_single_fid_rows_at_another_precision_or_reference_apart(tmp_path, monkeypatch):
    # `fm fid --json` rows appended one by one join per setting; bf16 and fp32 (or another reference) are other
    # settings: joined, they drew one zig-zag line through both FIDs at each NFE.
    pytest.importorskip("matplotlib")
    drawn = _record_plotted(monkeypatch)
    base = {"solver": "euler", "cfg": 1.0, "guidance": "cfg", "ckpt": "runs/a", "step": 100, "seed": 0, "num_samples": 500, "features": "tiny"}
    rows = [dict(base, nfe_per_sample=nfe, fid=fid, precision=prec, ref_count=ref)
            for prec, ref, fids in (("fp32", 1000, (2.5, 1.25)), ("bf16", 1000, (7.5, 3.75)), ("fp32", 5000, (2.0, 1.0)))
            for nfe, fid in zip((4, 8), fids)]
    sweep = tmp_path / "sweep.json"
    sweep.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = fm_in_process("plot", str(sweep))
    assert res.returncode == 0, res.stderr
    assert sorted(drawn) == [([4.0, 8.0], [2.0, 1.0]), ([4.0, 8.0], [2.5, 1.25]), ([4.0, 8.0], [7.5, 3.75])]


def test_frontier_draws_a_feature_space_only_later_appended_rows_have(tmp_path, monkeypatch):
    # `fm eval --features domain --json > f.json; fm eval --features domain,dinov2 --json >> f.json`: one panel per
    # space of any row (was: the first row's spaces only, the dinov2 point silently not drawn).
    pytest.importorskip("matplotlib")
    drawn = _record_plotted(monkeypatch)
    scores = {"fd": 3.0, "precision": 0.5, "recall": 0.6, "density": 0.7, "coverage": 0.4}
    first = {"cfg": 1.0, "nfe_per_sample": 8, "accuracy": 0.5, "metrics": {"domain": scores}}
    second = {"cfg": 2.0, "nfe_per_sample": 8, "accuracy": 0.6, "metrics": {"domain": scores, "dinov2": dict(scores, recall=0.3)}}
    frontier = tmp_path / "frontier.json"
    frontier.write_text(json.dumps([first]) + "\n" + json.dumps([second]) + "\n")
    res = fm_in_process("plot", str(frontier))
    assert res.returncode == 0, res.stderr
    assert drawn == [([0.5, 0.6], [0.6, 0.6]), ([0.6], [0.3])]


def test_frontier_shows_the_spread_over_reference_draws_as_error_bars(tmp_path, monkeypatch):
    # `fm eval` rows carry each metric's sd over its reference draws (`recall_sd`, ...): drawn as +-1 sd bars on
    # the chosen metric; a row of a one-draw evaluation (no `_sd`) gets none, and no error.
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    bars = []
    errorbar = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", lambda ax, x, y, *a, **k: bars.append((list(x), list(y), list(k["yerr"]))) or errorbar(ax, x, y, *a, **k))
    scores = {"fd": 3.0, "precision": 0.5, "recall": 0.6, "density": 0.7, "coverage": 0.4}
    rows = [{"cfg": 1.0, "nfe_per_sample": 8, "accuracy": 0.5, "metrics": {"domain": dict(scores, fd_sd=0.25, recall_sd=0.02)}},
            {"cfg": 2.0, "nfe_per_sample": 8, "accuracy": 0.7, "metrics": {"domain": dict(scores, fd=5.0)}}]
    frontier = tmp_path / "frontier.json"
    frontier.write_text(json.dumps(rows))
    res = fm_in_process("plot", str(frontier), "--y", "fd")
    assert res.returncode == 0, res.stderr
    (x, y, sd), = bars
    assert x == [0.5, 0.7] and y == [3.0, 5.0] and sd[0] == 0.25 and np.isnan(sd[1])


def test_fm_plot_of_a_run_names_the_evaluations_a_non_finite_value_leaves_out(tmp_path):
    # A diverged evaluation (FD NaN in metrics.jsonl, or null) is a gap in the curve: stderr names its step.
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0, "lr": 0.001}\n{"step": 10, "fd": 2.0, "fd_floor": 0.5}\n'
                                       '{"step": 20, "loss": 0.9, "lr": 0.001}\n{"step": 20, "fd": NaN, "fd_floor": 0.5}\n'
                                       '{"step": 30, "fd": null, "fd_floor": 0.5}\n')
    res = fm_in_process("plot", str(run))
    assert res.returncode == 0, res.stderr
    assert "fd is null (non-finite) and not drawn for: step 20; step 30" in res.stderr and "step 10" not in res.stderr
