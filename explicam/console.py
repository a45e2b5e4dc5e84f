"""Command-line plumbing shared by every command: one-line errors and progress bars."""
from __future__ import annotations

import functools
import os
import sys

import click

# Errors a user can cause (bad paths, bad data, bad options): one line, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, RuntimeError)


def friendly(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            if os.environ.get("EXPLICAM_DEBUG"):
                raise
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise click.ClickException(msg) from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)
    return wrapper


class Progress:
    """A click progress bar usable as a callback(n) or callback(done, total)."""

    def __init__(self, total: int, label: str):
        self.bar = click.progressbar(length=total, label=label, file=sys.stderr)
        self.done = 0

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def __call__(self, n: int = 1, total: int | None = None):
        if total is not None:  # (done, total) form
            n, self.done = n - self.done, n
        self.bar.update(n)
