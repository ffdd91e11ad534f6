"""Errors a user can cause, and the exit codes that scripts can rely on."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # the job ran but some requests failed (error lines were written)
EXIT_USAGE = 2  # bad options or arguments (typer's own code)
EXIT_INPUT = 3  # the input, plan or model cannot be used; nothing was done
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it); run again to resume
EXIT_TERMINATED = 143  # SIGTERM (128 + 15), handled as Ctrl-C is


class UserError(Exception):
    """A mistake the user can fix; the CLI prints the message (no traceback) and exits with `exit_code`."""

    def __init__(self, message: str, *, exit_code: int = EXIT_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code
