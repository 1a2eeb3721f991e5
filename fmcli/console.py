"""Where output goes: logs and rich progress bars on stderr (rank 0 only), results and --json on stdout."""

from __future__ import annotations

import contextlib
import json
import math
import sys


def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def emit_json(obj) -> None:
    """One JSON document on stdout (the only thing a --json command prints there). A non-finite float (a
    diverged FID, say) is written as null: Python's NaN/Infinity tokens are not JSON and break `jq`."""
    sys.stdout.write(json.dumps(_finite(obj), allow_nan=False) + "\n")
    sys.stdout.flush()


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def print_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def progress(console, label: str, total: int | None):
    """A context manager yielding advance(n) for a transient rich progress bar on stderr."""
    from rich.progress import Progress

    @contextlib.contextmanager
    def bar():
        with Progress(console=console, transient=True, disable=not console.is_terminal) as p:
            task = p.add_task(label, total=total)
            yield lambda n: p.advance(task, n)

    return bar()


class RankLog:
    """A training run's log: rank 0 prints to stderr and shows a progress bar (stdout stays for results).

    Any object with `info(message)` and `progress(total, start) -> update(step, loss)` can stand in
    (tests pass a quiet one).
    """

    def __init__(self, is_main: bool = True):
        self.is_main = is_main
        self.console = stderr_console()

    def info(self, message: str) -> None:
        if self.is_main:
            self.console.print(message, highlight=False, markup=False)

    def progress(self, total: int, start: int):
        if not self.is_main or not self.console.is_terminal:
            return lambda step, loss, total=None: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
        bar = Progress(*columns, console=self.console, transient=True)
        task = bar.add_task("train", total=total, completed=start, loss="-")
        bar.start()

        def update(step, loss, total=None):  # total: a budget refit changed train.steps
            if step is None:
                bar.stop()
            else:
                bar.update(task, completed=step, loss=f"{loss:.4f}", **({"total": total} if total else {}))

        return update
