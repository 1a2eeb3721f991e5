"""The one exception type for mistakes a user can fix; fmcli.cli (cli/app.py) turns it into one line and an exit code."""


class FmError(Exception):
    """A user-facing error: `str(err)` is the whole message, `exit_code` 2 = bad usage/input, 1 = runtime."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(FmError):
    def __init__(self, message: str):
        super().__init__(message, exit_code=2)


class RuntimeFailure(FmError):
    def __init__(self, message: str):
        super().__init__(message, exit_code=1)


class Stopped(FmError):
    """A command stopped by a signal (Ctrl-C, SIGTERM) and already cleaned up: exit code 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message, exit_code=128 + signum)
