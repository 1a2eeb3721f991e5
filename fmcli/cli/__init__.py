"""The `fm` command line: parse, validate, dispatch. No training or math logic lives here.

Results (and --json) go to stdout; logs and progress go to stderr. Exit codes: 0 ok, 1 runtime failure,
2 bad usage or input (one line, no traceback unless --debug).

One module per command group, each registering its commands on the one app (`app.py`, which holds the one
error handler); `options.py` declares the options several commands share. Importing this package imports
no torch: commands import the library inside their bodies.
"""

from __future__ import annotations

# Imported for their @app.command registrations, in the order `fm --help` lists the commands.
from . import prepare_data, train, sample, evaluate, tools  # noqa: F401  (isort: skip)
from .app import app
from .options import parse_interval

__all__ = ["app", "parse_interval"]
