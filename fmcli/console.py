"""Where output goes: logs and rich progress bars on stderr (rank 0 only), results and --json on stdout."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys

# Set by distributed.relaunch for the ranks it starts: a folder in which each error line is claimed by the first
# rank to print it, so that an error every rank hits (a batch larger than the dataset) is printed once.
RANK_ERRORS_ENV = "FM_RANK_ERRORS"


def stderr_console():
    """Logs on stderr. soft_wrap: a line is written whole, never folded at the 80 columns rich assumes off a
    terminal (a log file, `2> log`, CI), which broke a long path in a message across lines."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def emit_json(obj) -> None:
    """One JSON document on stdout (the only thing a --json command prints there). A non-finite float (a
    diverged FID, say) is written as null: Python's NaN/Infinity tokens are not JSON and break `jq`."""
    sys.stdout.write(json.dumps(finite_json(obj), allow_nan=False) + "\n")
    sys.stdout.flush()


def finite_json(obj):
    """`obj` with every non-finite float (NaN, inf) as None: what a strict JSON reader (`jq`) accepts."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def print_error(message: str) -> None:
    """`error: MESSAGE` on stderr; under `--nproc/--gpus N` only by the first rank to report this message."""
    line = f"error: {message}"
    if _first_to_report(line):
        print(line, file=sys.stderr)


def _first_to_report(line: str) -> bool:
    """False when another rank of this launch already printed `line` (claimed atomically, O_EXCL)."""
    folder = os.environ.get(RANK_ERRORS_ENV)
    if not folder:
        return True
    try:
        os.close(os.open(os.path.join(folder, hashlib.sha256(line.encode()).hexdigest()[:32]), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:  # the folder is gone or unwritable: rather twice than never
        return True
    return True


def report_rank_exit(code: int | None, peer_error: str | None = None) -> None:
    """A rank of `--nproc/--gpus N` that fails tells its launcher why, in the RANK_ERRORS_ENV folder: `code` (2 usage,
    1 runtime), or None when it failed only because another rank did (a dead peer), with what it saw (`peer_error`,
    unprinted: printed by the launcher only where no rank had a cause of its own). The launcher's exit code is
    then the run's cause, not whichever rank's exit torchrun happened to see first (`distributed.relaunch`)."""
    folder = os.environ.get(RANK_ERRORS_ENV)
    if folder:
        try:
            with open(os.path.join(folder, f"exit-rank-{int(os.environ.get('RANK', '0'))}"), "w") as f:
                f.write(("peer\n" + " ".join((peer_error or "").split())).strip() if code is None else str(code))
        except (OSError, ValueError):  # the folder is gone (or RANK is not a number): the launcher falls back to the first failure
            pass


def reported_rank_exits(folder: str) -> list[int | None]:
    """What the failed ranks of a launch reported through `report_rank_exit` (None: a dead peer's consequence)."""
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if name.startswith("exit-rank-"):
            with open(os.path.join(folder, name)) as f:
                text = f.read().strip()
            found.append(int(text) if text.isdigit() else None)  # "peer" (or a report cut short): no cause of its own
    return found


def reported_peer_errors(folder: str) -> list[str]:
    """The errors that ranks reporting a dead peer (`report_rank_exit(None, ...)`) saw, in rank order, one line each."""
    found = []
    for name in sorted(os.listdir(folder) if os.path.isdir(folder) else (), key=lambda n: (len(n), n)):
        if name.startswith("exit-rank-"):
            with open(os.path.join(folder, name)) as f:
                head, _, message = f.read().partition("\n")
            if head.strip() == "peer" and message.strip():
                found.append(message.strip())
    return found


class Bar:
    """A transient rich progress bar on stderr, drawn only on a terminal: label, bar, done/total, any `fields`
    (shown as "name value"), time left. The one progress idiom: commands use it through `progress`, the
    training log starts and stops it itself."""

    def __init__(self, label: str, total: int | None = None, *, completed: int = 0, console=None, **fields):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = console or stderr_console()
        shown = [TextColumn(f"{name} {{task.fields[{name}]}}") for name in fields]
        columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), *shown, TimeRemainingColumn())
        self._progress = Progress(*columns, console=console, transient=True, disable=not console.is_terminal)
        self._task = self._progress.add_task(label, total=total, completed=completed, **fields)

    def start(self) -> "Bar":
        self._progress.start()
        return self

    def stop(self) -> None:
        self._progress.stop()

    def __enter__(self) -> "Bar":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def advance(self, n: int) -> None:
        self._progress.advance(self._task, n)

    def update(self, **changes) -> None:
        """`completed`, `total` or a field's new value."""
        self._progress.update(self._task, **changes)


@contextlib.contextmanager
def progress(console, label: str, total: int | None):
    """A `Bar` as a context manager yielding advance(n)."""
    with Bar(label, total, console=console) as bar:
        yield bar.advance


class RankLog:
    """A training run's log: rank 0 prints to stderr and shows a progress bar (stdout stays for results).

    Any object with `info(message)` and `progress(total, start) -> update(step, loss)` can stand in
    (tests pass a quiet one).
    """

    def __init__(self, is_main: bool = True):
        from rich.console import Console

        self.is_main = is_main
        self.console = Console(stderr=True, soft_wrap=True)  # whole lines, as stderr_console()

    def info(self, message: str) -> None:
        if self.is_main:
            self.console.print(message, highlight=False, markup=False)

    def progress(self, total: int, start: int):
        if not self.is_main or not self.console.is_terminal:
            return lambda step, loss, total=None: None
        bar = Bar("train", total, completed=start, console=self.console, loss="-").start()

        def update(step, loss, total=None):  # total: a budget refit changed train.steps
            if step is None:
                bar.stop()
            else:
                bar.update(completed=step, loss=f"{loss:.4f}", **({"total": total} if total else {}))

        return update
