"""benchmarks/ot_straightness.py, reduced: on a 2D toy, ot-exact training gives straighter flows."""

from __future__ import annotations

import importlib.util

from conftest import REPO


def _benchmark():
    spec = importlib.util.spec_from_file_location("ot_straightness", REPO / "benchmarks" / "ot_straightness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ot_exact_gives_straighter_paths_than_independent(one_thread):
    results = _benchmark().compare(steps=400, batch=128, seed=0)
    ind, ot = results["independent"], results["ot-exact"]
    print(results)
    # Both learned the target (mean distance to the nearest of the 8 modes, radius 4, well under 1.5) ...
    assert ind["mode_dist"] < 1.5 and ot["mode_dist"] < 1.5
    # ... and OT's paths are much straighter: lower curvature and lower Euler-10 error against dopri5.
    assert ot["straightness"] < 0.5 * ind["straightness"]
    assert ot["euler10_err"] < 0.7 * ind["euler10_err"]


def test_the_benchmark_doc_states_the_sinkhorn_settings_the_script_runs():
    """docs/benchmarks.md's OT table has an ot-sinkhorn row: it must say at which flow.sinkhorn_reg and
    sinkhorn_iters the script ran it, and what fm's defaults are (config.FlowConfig), as they differ."""
    from fmcli.config import FlowConfig

    bench = _benchmark()
    doc = (REPO / "docs" / "benchmarks.md").read_text()
    section = doc.split("## Minibatch OT straightens flows", 1)[1].split("\n## ", 1)[0]
    defaults = FlowConfig()
    assert f"reg {bench.SINKHORN_REG}, {bench.SINKHORN_ITERS} iterations" in section
    assert f"reg {defaults.sinkhorn_reg}, {defaults.sinkhorn_iters} iterations" in section
