"""`python -m fmcli.cli`: the `fm` command (what benchmarks and tests run from a checkout)."""

from . import app

app()
