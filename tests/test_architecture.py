"""The architecture of fmcli against its design document, docs/architecture.md.

The layout names every module, the `layers` block orders them and every import points down it (no
exceptions), the key table names every config key, the CLI contract every command,
the environment table every variable; no import cycle; one training step; no function over 80 lines.
Each failure message says what to add to docs/architecture.md (code and doc change in the same commit).
"""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parent.parent / "fmcli"
DOC = PACKAGE.parent / "docs" / "architecture.md"
MAX_FUNCTION_LINES = 80

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
    assert "fmcli.step" in graph["fmcli.train"] and "fmcli.step" in graph["fmcli.measure"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_train_never_imports_bench():
    assert "fmcli.bench" not in import_graph()["fmcli.train"]


def test_autotune_and_training_run_the_same_step_function(tmp_path, shapes16, monkeypatch):
    """A spy on step.TrainingStep.__call__: `fm train` and the autotuner's trial both go through it."""
    from conftest import QuietLog

    from fmcli import step as step_mod
    from fmcli.measure import BenchSpec, measure
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
    from fmcli.data.shapes import prepare_shapes
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


# ------------------------------------------------------------------------- docs/architecture.md is honest


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def module_paths() -> dict[str, Path]:
    """Every module of the package, by its path relative to fmcli/ (`data/prepare.py`): the doc's names."""
    return {p.relative_to(PACKAGE).as_posix(): p for p in sorted(PACKAGE.rglob("*.py"))}


def parse_layers(text: str) -> list[tuple[str, list[str]]]:
    """The ```layers block: one `name: module, module, ...` line per layer, top to bottom."""
    found = re.search(r"^```layers\n(.*?)^```", text, re.M | re.S)
    assert found, "docs/architecture.md has no ```layers block (section 2): one `layer: a.py, b.py` line per layer, top to bottom"
    layers = []
    for line in found.group(1).splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, modules = line.partition(":")
        assert sep, f"```layers line {line!r} is not `layer_name: module.py, module.py, ...`"
        layers.append((name.strip(), [m.strip() for m in modules.split(",") if m.strip()]))
    return layers


def layer_index() -> dict[str, int]:
    """Module path -> position of its layer (0 = top)."""
    return {module: i for i, (_, modules) in enumerate(parse_layers(_doc())) for module in modules}


def import_edges() -> set[tuple[str, str]]:
    """(importer, imported) as paths relative to fmcli/, every import at any depth."""
    rel = {_module_name(path): name for name, path in module_paths().items()}
    return {(rel[src], rel[dst]) for src, targets in import_graph().items() for dst in targets}


def test_layers_parser_reads_a_block():
    text = "intro\n```layers\n# top first\ncli: cli.py\nbase: errors.py, fsutil.py\n```\nafter\n"
    assert parse_layers(text) == [("cli", ["cli.py"]), ("base", ["errors.py", "fsutil.py"])]


def test_every_module_is_in_the_layout():
    doc = _doc()
    missing = [name for name in module_paths() if f"`{name}`" not in doc]
    assert not missing, "docs/architecture.md does not name these modules; add to section 1 (Layout):\n" + "\n".join(
        f"  - `{name}`: <what it does, one line>" for name in missing
    )


def test_layers_block_names_every_module_once():
    layers = parse_layers(_doc())
    listed = [m for _, modules in layers for m in modules]
    modules = module_paths()
    twice = sorted({m for m in listed if listed.count(m) > 1})
    stale = sorted(set(listed) - set(modules))
    assert not twice, f"the ```layers block of docs/architecture.md names {twice} in more than one layer: keep one"
    assert not stale, f"the ```layers block of docs/architecture.md names {stale}, which are not modules of fmcli/: remove them"
    missing = [m for m in modules if m not in listed]
    assert not missing, "the ```layers block of docs/architecture.md (section 2) lacks:\n" + "\n".join(
        f"  {m}: {_suggest_layer(m, layers)}" for m in missing
    )


def _suggest_layer(module: str, layers: list[tuple[str, list[str]]]) -> str:
    """Where a new module fits: the lowest layer at or above everything it imports and below its importers."""
    index = {m: i for i, (_, ms) in enumerate(layers) for m in ms}
    edges = import_edges()
    below = [index[dst] for src, dst in edges if src == module and dst in index]
    above = [index[src] for src, dst in edges if dst == module and src in index]
    lowest = min(below, default=len(layers) - 1)
    highest = max(above, default=0)
    if highest <= lowest:
        return f"add it to the line `{layers[lowest][0]}: ...` (the lowest layer its imports allow)"
    return f"no layer fits: it imports from layer {layers[lowest][0]!r} and is imported from layer {layers[highest][0]!r}; change the imports"


def test_imports_point_down_the_documented_layers():
    """Every fmcli import goes to the importer's own layer or a lower one: no exceptions."""
    index = layer_index()
    names = [name for name, _ in parse_layers(_doc())]
    edges = {(s, d) for s, d in import_edges() if s in index and d in index}  # unlisted modules: the test above
    upward = sorted((s, d) for s, d in edges if index[d] < index[s])
    assert not upward, "imports that point up the layers of docs/architecture.md section 2:\n" + "\n".join(
        f"  {s} (layer {names[index[s]]}) imports {d} (layer {names[index[d]]}, above it)" for s, d in upward
    ) + "\nmove the code, or change the layer order in the ```layers block (code and doc in the same commit)"


def config_fields():
    """Every field of the config, dotted (`train.budget_fallback.min_steps`): (key, pydantic field, its section
    model or None); nested and optional sections are walked into."""
    from pydantic import BaseModel

    from fmcli.config import Config

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            section = next((a for a in (field.annotation, *typing.get_args(field.annotation)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
            yield prefix + name, field, section
            if section is not None:
                yield from walk(section, prefix + name + ".")

    yield from walk(Config, "")


def config_keys() -> dict[str, object]:
    """Every settable key, dotted (`train.budget_fallback.min_steps`), with its default ("required" if none)."""
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    return {key: "required" if field.default is PydanticUndefined else field.default
            for key, field, section in config_fields()
            if section is None or not isinstance(field.default, BaseModel)}  # a section table itself has no row


def test_config_key_walk_finds_nested_and_optional_sections():
    keys = config_keys()
    assert keys["train.budget_minutes"] is None and keys["eval.every"] == 0 and keys["name"] == "run"
    assert keys["train.budget_fallback.min_steps"] == "required" and "train" not in keys and "train.budget_fallback" in keys


def test_every_config_key_is_documented():
    doc = _doc()
    missing = {key: default for key, default in config_keys().items() if f"`{key}`" not in doc}
    assert not missing, "docs/architecture.md section 6 (Configuration) lacks these keys; add rows to its key table:\n" + "\n".join(
        f"  | `{key}` | {_default_cell(default)} | <values> | <meaning> |" for key, default in missing.items()
    )


def _documented_cells(values: dict, column: int):
    """(key, value, cell) for each key of `values` in section 6's key table, `cell` its `column`-th cell after the
    key (1: default, 2: values); a key missing from the table is reported by test_every_config_key_is_documented."""
    skipped = r" \| [^|]+?" * (column - 1)
    cells = dict(re.findall(r"^\| `([a-z_.]+)`" + skipped + r" \| ([^|]+?) \|", _doc(), re.M))
    return [(key, value, cells[key]) for key, value in values.items() if key in cells]


def test_documented_defaults_are_the_code_defaults():
    """The key table's default column (TOML values, `None`, or the word required) equals the pydantic default."""
    import tomllib

    wrong = []
    for key, default, cell in _documented_cells(config_keys(), column=1):
        text = cell.strip().strip("`")
        documented = None if text == "None" else "required" if text == "required" else tomllib.loads(f"v = {text}")["v"]
        expected = list(default) if isinstance(default, tuple) else default
        if documented != expected or type(documented) is not type(expected):
            wrong.append(f"  | `{key}` | {_default_cell(default)} |  (the table says {cell.strip()})")
    assert not wrong, "docs/architecture.md section 6 gives other defaults than config.py; fix these rows:\n" + "\n".join(wrong)


def config_choices() -> dict[str, list[str]]:
    """Every key whose type is (or includes) a Literal of words -> those words, e.g. `data.source` -> its sources."""

    def literals(annotation) -> list[str]:
        if typing.get_origin(annotation) is typing.Literal:
            return [a for a in typing.get_args(annotation) if isinstance(a, str)]
        return [w for a in typing.get_args(annotation) for w in literals(a)]

    return {key: words for key, field, section in config_fields() if section is None and (words := literals(field.annotation))}


def test_documented_values_name_every_choice():
    """The key table's values column names every word a Literal key accepts (`data.source = "sklearn-digits"`
    was accepted but missing from the table)."""
    assert "sklearn-digits" in config_choices()["data.source"] and config_choices()["train.compile"] == ["auto"]
    wrong = []
    for key, words, cell in _documented_cells(config_choices(), column=2):
        named = set(re.findall(r'`"?([^`"]+)"?`', cell))
        if missing := [w for w in words if w not in named]:
            wrong.append(f"  `{key}`: {', '.join(missing)} (the table says {cell.strip()})")
    assert not wrong, "docs/architecture.md section 6's values column lacks accepted values:\n" + "\n".join(wrong)


def test_resume_safe_keys_are_the_documented_ones():
    """Section 6's list of what `--set` may change on resume is `config.RESUME_SAFE_KEYS`, no more, no less."""
    from fmcli.config import RESUME_SAFE_KEYS

    sentence = re.search(r"On resume only `RESUME_SAFE_KEYS` may change: (.*?)\.\n", _doc(), re.S)
    assert sentence, "docs/architecture.md section 6 lost its RESUME_SAFE_KEYS sentence"
    documented = set(re.findall(r"`([a-z_]+\.[a-z_0-9]+)`", sentence.group(1)))
    assert documented == RESUME_SAFE_KEYS, f"undocumented: {sorted(RESUME_SAFE_KEYS - documented)}; not safe: {sorted(documented - RESUME_SAFE_KEYS)}"


def _default_cell(default) -> str:
    """A default as the key table writes it: `None`, `"auto"`, `false`, `[1, 2, 2]`; required stays a word."""
    import json

    if default == "required":
        return "required"
    return "`None`" if default is None else f"`{json.dumps(default)}`"


def fm_commands() -> list[str]:
    import typer.main

    from fmcli.cli import app

    return sorted(typer.main.get_command(app).commands)


def test_every_command_is_in_the_cli_contract():
    doc = _doc()
    commands = fm_commands()
    assert {"train", "sample", "prepare-data", "_train-resolved"} <= set(commands)
    missing = [c for c in commands if not re.search(rf"^fm {re.escape(c)}(\s|$)", doc, re.M)]
    assert not missing, "docs/architecture.md section 10 (Command-line contract) lacks a synopsis line for:\n" + "\n".join(
        f"  fm {c} [OPTIONS...]" for c in missing
    )


def synopses() -> dict[str, str]:
    """Section 10's synopsis of each command (its continuation lines included), `[SAMPLING]` expanded."""
    block = re.search(r"^## 10\..*?^```\n(.*?)^```", _doc(), re.M | re.S).group(1)
    parts = re.split(r"^(?=fm |SAMPLING = )", block, flags=re.M)
    sampling = next(p for p in parts if p.startswith("SAMPLING = "))
    return {p.split()[1]: p.replace("[SAMPLING]", sampling) for p in parts if p.startswith("fm ")}


def test_every_option_is_in_its_synopsis():
    """Each command's synopsis names every option it takes (`fm env --remeasure`, `fm plot --y` and the
    sampling commands' `--precision`/`--compile` were missing)."""
    import typer.main

    from fmcli.cli import app

    docs = synopses()
    assert "--rtol" in docs["sample"] and "--k" in docs["eval"]
    missing = []
    for name, command in typer.main.get_command(app).commands.items():
        for param in command.params:
            opts = [o for o in (*param.opts, *param.secondary_opts) if o.startswith("-") and o not in ("--help", "-h")]
            if opts and not any(re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", docs.get(name, "")) for o in opts):
                missing.append(f"  fm {name} {'/'.join(opts)}")
    assert not missing, "docs/architecture.md section 10's synopses lack these options:\n" + "\n".join(missing)


def test_every_preset_is_in_the_docs():
    """Section 6's preset list and the README's preset table name every `presets/*.toml`."""
    names = sorted(p.stem for p in (PACKAGE.parent / "presets").glob("*.toml"))
    assert {"quickstart", "debug", "quickstart-meanflow"} <= set(names)
    listed = re.search(r"^Presets \(`presets/`\): (.*?)\n\n", _doc(), re.M | re.S).group(1)
    table = set(re.findall(r"^\| `([\w-]+)`", (PACKAGE.parent / "README.md").read_text(encoding="utf-8"), re.M))
    table |= {n for row in re.findall(r"^\| (`[\w-]+`(?:, `[\w-]+`)+) \|", (PACKAGE.parent / "README.md").read_text(encoding="utf-8"), re.M)
              for n in re.findall(r"`([\w-]+)`", row)}
    assert not [n for n in names if f"`{n}`" not in listed], "docs/architecture.md section 6's preset list lacks some presets"
    assert not [n for n in names if n not in table], f"README's preset table lacks {[n for n in names if n not in table]}"


def environment_variables() -> dict[str, set[str]]:
    """Names fmcli reads from (or sets in) os.environ, and every FM_* string it names -> the modules naming them."""
    found: dict[str, set[str]] = {}

    def is_environ(node) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name) and node.value.id == "os"

    for module, path in module_paths().items():
        tree = ast.parse(path.read_text())
        # module-level NAME = "VALUE" constants, so that os.environ.get(ENV_VAE) counts too
        constants = {
            t.id: n.value.value
            for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
            for t in n.targets if isinstance(t, ast.Name)
        }  # fmt: skip

        def literal(node):
            if isinstance(node, ast.Name):
                return constants.get(node.id)
            return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"FM_[A-Z0-9_]+", node.value):
                name = node.value
            elif isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute):
                f = node.func
                if (is_environ(f.value) and f.attr in ("get", "setdefault", "pop")) or (f.attr == "getenv" and isinstance(f.value, ast.Name) and f.value.id == "os"):
                    name = literal(node.args[0])
            elif isinstance(node, ast.Subscript) and is_environ(node.value):
                name = literal(node.slice)
            elif isinstance(node, ast.Compare) and any(is_environ(c) for c in node.comparators):
                name = literal(node.left)
            if name is not None:
                found.setdefault(name, set()).add(module)
    return found


def test_every_environment_variable_is_documented():
    names = environment_variables()
    assert {"FM_PROBE_FORCE", "FM_DATA_WAIT", "FM_SHUTDOWN_TIMEOUT", "XDG_CACHE_HOME", "WORLD_SIZE"} <= set(names)
    doc = _doc()
    missing = sorted(n for n in names if f"`{n}`" not in doc)
    assert not missing, "docs/architecture.md section 9 (Environment variables) lacks these; add rows to its table:\n" + "\n".join(
        f"  | `{n}` | {', '.join(f'`{m}`' for m in sorted(names[n]))} | <meaning, default> |" for n in missing
    )


# ------------------------------------------------------------------------------------ function length


def function_lengths(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    return [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


@pytest.mark.parametrize("module", sorted(module_paths()))
def test_no_function_is_longer_than_80_lines(module):
    """Every module, every function (nested ones too): no exceptions."""
    too_long = [(name, length) for name, length in function_lengths(PACKAGE / module) if length > MAX_FUNCTION_LINES]
    assert not too_long, "\n".join(f"fmcli/{module}: {name} is {length} lines (limit {MAX_FUNCTION_LINES}): split it into named helpers" for name, length in too_long)


# ------------------------------------------------------------------------ attributes are made in __init__

ATTRIBUTE_MODULES = ("train.py", "budget.py", "step.py", "checkpoint.py")


def _self_targets(node: ast.AST, self_name: str) -> set[str]:
    """Attributes `self_name.x` that assignments anywhere under `node` write (tuples, annotations, += included)."""
    names = set()
    for n in ast.walk(node):
        targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, (ast.AnnAssign, ast.AugAssign)) else []
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == self_name and isinstance(t.ctx, ast.Store):
                    names.add(t.attr)
    return names


def attributes_made_outside_init(source: str) -> list[str]:
    """`Class.method: self.x` for every attribute a method assigns that neither __init__ nor the class body
    (dataclass fields, class attributes) assigns first."""
    found = []
    for cls in (n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef)):
        methods = [m for m in cls.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and m.args.args]
        declared = {t.id for n in cls.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                    for target in (n.targets if isinstance(n, ast.Assign) else [n.target]) for t in ast.walk(target) if isinstance(t, ast.Name)}
        declared |= {m.name for m in methods}  # properties and methods
        for m in methods:
            if m.name == "__init__":
                declared |= _self_targets(m, m.args.args[0].arg)
        for m in methods:
            if m.name != "__init__" and not any(isinstance(d, ast.Name) and d.id in ("staticmethod", "classmethod") for d in m.decorator_list):
                found += [f"{cls.name}.{m.name}: self.{a}" for a in sorted(_self_targets(m, m.args.args[0].arg) - declared)]
    return found


def test_the_attribute_check_finds_a_planted_attribute():
    planted = "class A:\n    def __init__(self):\n        self.a = 1\n    def later(self):\n        self.a, self.b = 2, 3\n        self.c += 1\n"
    assert attributes_made_outside_init(planted) == ["A.later: self.b", "A.later: self.c"]
    dataclass_like = "class B:\n    steps: int = 0\n    def refit(self):\n        self.steps = 1\n"
    assert attributes_made_outside_init(dataclass_like) == []


@pytest.mark.parametrize("module", ATTRIBUTE_MODULES)
def test_every_attribute_is_assigned_in_init(module):
    """Issue #29: a class's attributes are all made in its __init__ (or class body); methods only change them."""
    made_later = attributes_made_outside_init((PACKAGE / module).read_text())
    assert not made_later, f"fmcli/{module}: attributes first assigned outside __init__ (assign them in __init__): " + ", ".join(made_later)


def test_the_manifest_source_row_names_every_prepare_data_source():
    """docs/architecture.md's manifest table gives `source`'s values: every `fm prepare-data` source writes its own
    name there (`data.prepare.SOURCES`), and `fm reflow` writes `reflow`."""
    from fmcli.data.prepare import SOURCES

    row = next(line for line in _doc().splitlines() if line.startswith("| `source` |"))
    named = set(re.findall(r"`([\w-]+)`", row)) - {"source"}
    assert named == {*SOURCES, "reflow"}, f"the manifest's source row names {sorted(named)}; the sources are {sorted(SOURCES)} and reflow"
