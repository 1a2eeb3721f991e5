"""The Typer app `fm`: the one error handler (exit codes 0/1/2, one line, --debug) and helpers every command uses."""

from __future__ import annotations

import os
import signal
import sys
from typing import Annotated

import typer

from .. import __version__
from ..console import RANK_ERRORS_ENV, print_error, report_rank_exit, stderr_console
from ..errors import FmError
from .options import fill_lazy_help


def _raise_terminated(signum, frame):
    """SIGTERM raises what Ctrl-C raises, so that every command's clean-up for an interrupt (temporary files and
    folders removed, nothing half-written) runs for it too; the exit code still tells them apart (click may
    re-raise the interrupt as a new exception, so the signal is remembered here, not in the exception's type)."""
    _STATE["terminated"] = True
    raise KeyboardInterrupt


class _App(typer.Typer):
    """Typer app whose errors meant for users become one stderr line and exit code 2 (usage) or 1."""

    def __call__(self, *args, **kwargs):
        kwargs["standalone_mode"] = False  # click's errors come here, to be printed as one line too
        argv = kwargs.get("args")
        if any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else map(str, argv))):
            fill_lazy_help()
        # Training installs its own handlers for its run (a stop checkpoint), and restores this one after.
        try:
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
        except ValueError:  # not the main thread (an embedding caller): leave signals alone
            previous = None
        try:
            result = super().__call__(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - the one error handler of every command
            code = _exit_code(err)
            _report_to_launcher(err, code)
            sys.exit(code)
        except KeyboardInterrupt:
            result = 130
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        code = result if isinstance(result, int) else 0
        if code == 130:  # typer turns the interrupt into exit code 130 itself, silently
            terminated = _STATE.pop("terminated", False)
            if "TORCHELASTIC_RUN_ID" not in os.environ:  # a torchrun worker: its launcher prints the run's one line
                print_error("terminated" if terminated else "interrupted")
            code = 143 if terminated else 130
        sys.exit(code)


def _exit_code(err: Exception) -> int:
    """Print `err` as one line (or re-raise it under --debug) and return the exit code: 2 for usage errors
    (FmError's own code, click's parse errors), 1 for anything unexpected."""
    from typer._click import exceptions as click  # typer >= 0.24 vendors click; its errors live here

    if isinstance(err, FmError):
        print_error(str(err))
        return err.exit_code
    if isinstance(err, click.NoArgsIsHelpError):
        err.show()  # `fm` alone: the help text, as click prints it
        return err.exit_code
    if isinstance(err, click.ClickException):  # bad option, out-of-range value, missing argument
        where = f" (see `fm {err.ctx.info_name} --help`)" if isinstance(err, click.UsageError) and err.ctx and err.ctx.parent else ""
        print_error(err.format_message().replace("\n", " ") + where)
        return err.exit_code
    if isinstance(err, typer.Abort):
        print_error("aborted")
        return 1
    if _STATE["debug"]:
        raise err
    from ..distributed import is_peer_failure

    if not is_peer_failure(err):  # else another rank failed first and printed the cause; stay quiet
        print_error(f"{type(err).__name__}: {err} (rerun with --debug for the traceback)")
    return 1


def _report_to_launcher(err: Exception, code: int) -> None:
    """A rank relaunched by `--nproc/--gpus N` tells its launcher how it failed (console.report_rank_exit): its own
    usage error (2) or runtime error (1), or a collective broken by another rank's failure (that rank's cause counts)."""
    if not os.environ.get(RANK_ERRORS_ENV):
        return
    from ..distributed import is_peer_failure

    peer = code == 1 and not isinstance(err, FmError) and is_peer_failure(err)
    report_rank_exit(None if peer else code, peer_error=f"{type(err).__name__}: {err}" if peer else None)


app = _App(
    name="fm",
    help="Flow-matching image generation: prepare data, train, sample, evaluate, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_STATE = {"debug": False}


def _version(value: bool):
    if value:
        print(f"fm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
):
    """fm: a flow-matching image-generation toolkit."""
    _STATE["debug"] = debug


def log_line(message: str) -> None:
    """One log line on stderr (commands' notes: the sampling precision and compile choice, warnings)."""
    stderr_console().print(message, highlight=False, markup=False)


def torch_device(name: str):
    """--device auto|cpu|cuda as a torch.device (hardware.resolve_device, imported only when a command runs)."""
    from ..hardware import resolve_device

    return resolve_device(name)
