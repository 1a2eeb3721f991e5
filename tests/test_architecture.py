"""The layering of fmcli (DESIGN.md section 1): no import cycle, one training step, presets in the wheel."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parent.parent / "fmcli"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every fmcli module `path` imports, at any depth (function-level imports count: they hide cycles)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    graph = {name: _imports(path, name, known) for name, path in files.items()}
    # `from .models import build_model` names the package: a package's __init__ is imported with it.
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_inside_fmcli():
    graph = import_graph()
    assert "fmcli.step" in graph["fmcli.train"] and "fmcli.step" in graph["fmcli.autotune"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_train_never_imports_bench():
    assert "fmcli.bench" not in import_graph()["fmcli.train"]


def test_autotune_and_training_run_the_same_step_function(tmp_path, shapes16, monkeypatch):
    """A spy on step.TrainingStep.__call__: `fm train` and the autotuner's trial both go through it."""
    from conftest import QuietLog

    from fmcli import step as step_mod
    from fmcli.autotune import BenchSpec, measure
    from fmcli.config import config_to_dict, load_config, resolve_without_data
    from fmcli.train import train

    calls = []
    real = step_mod.TrainingStep.__call__

    def spy(self, batches, batch_index, step):
        calls.append(type(self.model).__name__)
        return real(self, batches, batch_index, step)

    monkeypatch.setattr(step_mod.TrainingStep, "__call__", spy)
    train(load_config("debug", [f"data.path='{shapes16}'", "train.steps=2"]), tmp_path / "run", log=QuietLog())
    trained = len(calls)
    cfg = resolve_without_data(load_config("debug"))
    measure(BenchSpec(config=config_to_dict(cfg), batch=4, mode="train", steps=2, warmup=1))
    assert trained == 2 and len(calls) == trained + 3  # 1 warmup + 2 timed steps, the same function


def test_auto_micro_batch_works_for_a_text_preset(tmp_path):
    """train.micro_batch_size='auto' on a text model (tiny built-in T5, CPU): the autotuner runs the real
    text-conditioned step and training uses its result."""
    from conftest import QuietLog

    from fmcli.config import load_config
    from fmcli.data.sources import prepare_shapes
    from fmcli.train import train

    data = prepare_shapes(tmp_path / "captioned", size=16, count=64, seed=0)
    cfg = load_config("quickstart-text", [
        f"data.path='{data}'", "model.hidden_size=32", "model.depth=1", "model.heads=2", "model.patch_size=4",
        "train.steps=2", "train.global_batch_size=16", "train.micro_batch_size='auto'", "train.compile=false",
        "train.precision=fp32", "train.sample_every=0", "sample.grid_size=2", "sample.steps=2", "encoders.max_tokens=8",
    ])  # fmt: skip
    messages = []

    class Log(QuietLog):
        def info(self, message):
            messages.append(message)

    result = train(cfg, tmp_path / "run", log=Log())
    assert result.step == 2
    assert any("autotuning" in m for m in messages)
    import json

    cache = json.loads((tmp_path / "run" / "autotune.json").read_text())
    (entry,) = cache.values()
    assert 1 <= entry["batch"] <= 16 and entry["img_per_s"] > 0


@pytest.mark.parametrize("module", ["train.py", "cli.py", "bench.py", "launch.py", "step.py", "autotune.py"])
def test_no_function_is_longer_than_80_lines(module):
    tree = ast.parse((PACKAGE / module).read_text())
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]  # fmt: skip
    assert not long, long
