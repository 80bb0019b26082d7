"""The one base of every error tts-fleet raises on purpose.

An error's message is written for the operator: one line, naming what was wrong and
what to do. `exit_code` is what a CLI exits with when the error ends a command
(`tts_common.cli` maps errors to output): 1 for an operational failure (a mirror
down, a damaged cache), 2 for a usage error (bad configuration, bad arguments).
"""

from __future__ import annotations


class TtsError(Exception):
    """An expected failure with a message fit for one line on a terminal."""

    exit_code = 1


class UsageError(TtsError):
    """The input is wrong (configuration, arguments): the operator must change it."""

    exit_code = 2
