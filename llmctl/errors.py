"""Errors a user can cause, each mapped to the exit code documented in the README.

Only these are turned into one-line messages by the CLI; anything else is a bug and keeps
its traceback.
"""


class LlmctlError(Exception):
    """A failure we can explain in one line. Exit code 1 (runtime failure).

    `hint`: the command that fixes it or resumes (also in the message), for `--json`.
    `result`: what the command measured or did before it failed (eval's metrics next to the
    thresholds they missed), merged into the `--json` object.
    """

    exit_code = 1

    def __init__(self, message: str = "", *, hint: str | None = None, result: dict | None = None):
        super().__init__(message)
        self.hint = hint
        self.result = result


class ConfigError(LlmctlError):
    """Bad config, bad override, bad command-line usage. Exit code 2."""

    exit_code = 2


class DataError(LlmctlError):
    """Bad input data: a missing file, invalid UTF-8, a malformed record. Exit code 2."""

    exit_code = 2


class StageInputError(LlmctlError):
    """A stage this one reads is missing, incomplete or stale. Exit code 3."""

    exit_code = 3


class ThresholdError(LlmctlError):
    """An eval threshold was not met (CI gate). Exit code 4."""

    exit_code = 4


class LockedError(LlmctlError):
    """Another process is writing the same stage. Exit code 1."""

    exit_code = 1


class Interrupted(LlmctlError):
    """SIGINT (exit 130) or SIGTERM (exit 143), raised after saving what can be saved."""

    def __init__(self, signum: int, message: str = "", *, hint: str | None = None, result: dict | None = None):
        import signal

        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(message or f"interrupted by {name}", hint=hint, result=result)
