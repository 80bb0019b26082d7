"""One mapping from errors to command-line output, for every tts-fleet CLI.

Commands raise; they never print their own error lines. An expected failure - any
`TtsError` (its `exit_code`: 1 operational, 2 usage) or an `OSError` from the system -
ends the command with exactly one line on stderr, `<program>: error: <message>`, and
no traceback. click's own usage errors keep click's format (usage + exit 2).
"""

from __future__ import annotations

import sys
from typing import NoReturn

import click

from .errors import TtsError
from .logs import journal_prefix


class CommandFailed(TtsError):
    """A command could not do what was asked; the message says why."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def _program() -> str:
    ctx = click.get_current_context(silent=True)
    return (ctx.find_root().info_name if ctx else None) or "tts-fleet"


def exit_with_error(message: str, code: int = 1) -> NoReturn:
    # At PRIORITY=3 in the journal (a service's last words are an error, not info).
    click.echo(f"{journal_prefix(40)}{_program()}: error: {message}", err=True)
    sys.exit(code)


def describe_os_error(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


class CliGroup(click.Group):
    """The root group of each CLI: maps expected errors raised anywhere below it."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("context_settings", {"help_option_names": ["-h", "--help"]})
        super().__init__(*args, **kwargs)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TtsError as exc:
            exit_with_error(str(exc), exc.exit_code)
        except OSError as exc:
            exit_with_error(describe_os_error(exc), 1)
