"""Every `fm ...` command line in the README's code blocks parses: its command and options exist, option values
have the right types, and nothing required is missing (click parses them without running anything)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_blocks() -> list[list[str]]:
    """The `fm` invocations of each of the README's fenced shell blocks, continuation lines joined, comments,
    pipes and redirections cut off (`srun fm ...` and `pip install -e . && fm ...` count too)."""
    found, blocks, fence = [], [], None
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            if fence in ("bash", "sh", ""):
                blocks.append("")
        elif fence in ("bash", "sh", ""):
            blocks[-1] += line + "\n"
    for block in blocks:
        commands: list[str] = []
        found.append(commands)
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split, lexer.commenters = True, "#"
            part: list[str] = []
            for word in [*lexer, "|"]:
                if word and set(word) <= set("|&;<>()"):  # the end of a command: a pipe, &&, a redirection
                    if "fm" in part:
                        commands.append(shlex.join(part[part.index("fm"):]))
                    part = [] if "<" not in word and ">" not in word else ["(redirected)"]
                elif part != ["(redirected)"]:
                    part.append(word)
    return found


def readme_commands() -> list[str]:
    return [c for block in readme_blocks() for c in block]


def test_the_readme_has_its_examples():
    commands = readme_commands()
    assert len(commands) > 40 and "fm train --preset quickstart" in commands
    assert any(c.startswith("fm train --preset cifar10 --data data/cifar10 --run-dir runs/cifar10 --gpus 8") for c in commands)


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command, monkeypatch):
    import typer.main

    from fmcli.cli import app

    group = typer.main.get_command(app)
    args = shlex.split(command)[1:]
    monkeypatch.setenv("SLURM_NNODES", "2")
    args = [a.replace("$SLURM_NNODES", "2").replace("$SLURM_NODEID", "0").replace("$head", "node0").replace("$SLURM_JOB_ID", "1") for a in args]
    name = args[0]
    assert name in group.commands, f"{command}: no command {name!r}"
    group.commands[name].make_context(name, args[1:])  # raises click's usage errors


def test_a_misspelled_option_is_refused():
    import typer.main
    from typer._click import exceptions

    from fmcli.cli import app

    with pytest.raises(exceptions.NoSuchOption):
        typer.main.get_command(app).commands["sample"].make_context("sample", ["--ckpt", "x", "--num-sample", "4"])


def written_paths(command: str) -> list[str]:
    """What a README command writes that must not exist yet: its --out (fm sample's default: samples/), --gif
    and --save-stats paths."""
    args = shlex.split(command)
    paths = [args[i + 1].rstrip("/") for i, a in enumerate(args[:-1]) if a in ("--out", "--gif", "--save-stats")]
    if args[1] == "sample" and "--out" not in args:
        paths.append("samples")
    return paths


@pytest.mark.parametrize("block", [b for b in readme_blocks() if b], ids=lambda b: b[0][:40])
def test_a_readme_block_runs_in_order(block):
    """Commands shown together can be run one after the other: no two write the same path (the second would
    stop with exit 2, as no command overwrites without --force)."""
    seen: dict[str, str] = {}
    for command in block:
        for path in written_paths(command):
            assert path not in seen, f"{command!r} writes {path}, which {seen[path]!r} above it wrote"
            seen[path] = command


def test_resume_examples_extend_the_quickstart():
    """`fm resume runs/quickstart --set train.steps=N` (README and `fm resume --help`) is shown as extending the run,
    so N must be above every step a quickstart run can reach: the preset's train.steps (a budget only lowers it).
    A smaller N is refused on a run that trained past it ("nothing would train")."""
    import typer.main

    from fmcli.cli import app
    from fmcli.config import load_config

    help_text = typer.main.get_command(app).commands["resume"].help
    examples = [c for c in readme_commands() if c.startswith("fm resume runs/quickstart ")]
    examples += [line.strip() for line in help_text.splitlines() if line.strip().startswith("fm resume runs/quickstart ")]
    steps = [int(m.group(1)) for c in examples if (m := re.search(r"--set train\.steps=(\d+)", c))]
    assert len(steps) >= 2, examples  # one in the README, one in --help
    most = load_config("quickstart", []).train.steps
    assert all(n > most for n in steps), f"resume examples {steps} do not extend the quickstart's {most} steps"
