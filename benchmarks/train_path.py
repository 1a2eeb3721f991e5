"""Which orchestration functions `fm train` passes through before its first kept optimizer step (issue #29).

Runs `fm train ARGS` in this process under `sys.setprofile`, records every distinct fmcli function called from
`cli/train.py:train` on, and stops at the first `TrainingStep.__call__` that returns into `Trainer._loop` (the
first step the run keeps: the budget's timing steps, taken and undone before the loop, do not end it, but
what they call counts). Counted: the orchestration modules (cli/, launch, train, budget, step, checkpoint,
runlog, distributed, measure, autotune, console, tracking); not counted: module and class bodies, lambdas
and comprehensions, and budget's pure arithmetic (`StepBudget`, `Work`). Properties count: they are calls.
Which functions run depends on the machine (a budget that lowers the steps calls `set_total_steps`).

    PYTHONPATH=$PWD python benchmarks/train_path.py --list -- --preset quickstart --data data/shapes-32-n20000-s0 --run-dir /tmp/path-run

Prints the count (and with --list each function as file:qualname, in call order) on stdout, then exits.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fmcli"
ORCHESTRATION = ("cli/", "launch.py", "train.py", "budget.py", "checkpoint.py", "runlog.py", "distributed.py",
                 "measure.py", "autotune.py", "console.py", "tracking.py", "step.py")
PURE = ("StepBudget", "Work")


def counted(path: str, name: str) -> bool:
    """Whether fmcli/`path`:`name` is an orchestration function (see the module's docstring)."""
    if not path.startswith(ORCHESTRATION) or name == "<module>" or "<locals>" in name or name.split(".")[0] in PURE:
        return False
    module = importlib.import_module("fmcli." + path[:-3].replace("/", "."))
    return not isinstance(getattr(module, name, None), type)  # a class body runs once, it is no function


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="print every function, in call order")
    ap.add_argument("fm_args", nargs=argparse.REMAINDER, help="-- then `fm train`'s arguments")
    args = ap.parse_args()
    fm_args = args.fm_args[1:] if args.fm_args[:1] == ["--"] else args.fm_args
    seen: dict[tuple[str, str], None] = {}
    state = {"started": False}

    def report() -> None:
        kept = [f"fmcli/{p}:{n}" for p, n in seen if counted(p, n)]
        if args.list:
            print("\n".join(kept))
        modules = {k.split(":")[0] for k in kept}
        print(f"{len(kept)} functions in {len(modules)} modules", flush=True)

    def profile(frame, event, arg):
        code = frame.f_code
        if not code.co_filename.startswith(str(PACKAGE) + os.sep):
            return
        path, name = os.path.relpath(code.co_filename, PACKAGE), getattr(code, "co_qualname", code.co_name)
        if event == "call":
            state["started"] = state["started"] or (path == "cli/train.py" and name == "train")
            if state["started"]:
                seen.setdefault((path, name), None)
        elif event == "return" and path == "step.py" and code.co_name == "__call__" and frame.f_back and frame.f_back.f_code.co_name == "_loop":
            sys.setprofile(None)
            report()
            os._exit(0)  # the first kept step is where the count ends: the run itself is not needed

    from fmcli.cli import app

    sys.argv = ["fm", "train", *fm_args]
    sys.setprofile(profile)
    app()
    sys.setprofile(None)
    print("the run ended before its first kept step", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
