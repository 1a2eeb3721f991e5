"""fmcli.console: what goes to stderr off a terminal (a log file, CI) is written line for line as given."""

import contextlib
import io

from fmcli.cli.app import log_line
from fmcli.console import RankLog

LONG = "checkpoint: /runs/" + "a-rather-long-folder-name/" * 6 + "checkpoints/step-0000020.pt (a note after the path)"


def test_log_lines_are_not_folded_off_a_terminal():
    """rich assumes 80 columns when stderr is not a terminal and folded a long path across lines."""
    assert len(LONG) > 160
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        log_line(LONG)
        RankLog().info(LONG)
    assert err.getvalue() == LONG + "\n" + LONG + "\n"
