"""Every tts-* command docs/operations.md shows parses with the real CLI.

An operator copies these lines; one that the CLI refuses (`tts-provisioner rollback joe
--release` once exited 2: Missing argument 'VERSION') is a defect of the docs or of the
CLI. Commands are parsed by click itself (the same parser as a real run: arguments,
options, types, required values), without running them: no daemon or mirror is needed.
A span naming only a command (`tts-provisioner rollback`) is a reference, not a command
line: it must name a command that exists. A path argument that does not exist here
(`./joe-1.1.0/`) is the example's, not an error; an upper-case word (`ROLE`, `V`) is a
placeholder for any valid value; a required option that can come from the environment
(`--endpoint`: TTS_MIRROR_ENDPOINT, docs/mirror.md) is taken as set there.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from mirror.cli import main as mirror_main
from provisioner.cli import main as provisioner_main
from runtime.cli import main as runtime_main
from runtime.ctl import main as ctl_main

pytestmark = pytest.mark.unit

DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
CLIS = {"tts-provisioner": provisioner_main, "tts-ctl": ctl_main, "tts-mirror": mirror_main,
        "tts-runtime": runtime_main}
_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")
_INLINE = re.compile(r"`((?:sudo -u \S+ )?(?:/\S+/)?tts-(?:provisioner|ctl|mirror|runtime)(?=[ `])[^`]*)`")


def _code_block_commands(text: str) -> list[str]:
    """The lines of ```sh blocks (continuations joined, comments dropped) that run a tts-* CLI."""
    out = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split, lexer.commenters = True, "#"
            words = list(lexer)
            # each simple command of the line (split at ; && || |)
            command: list[str] = []
            for word in [*words, ";"]:
                if word in (";", "&&", "||", "|"):
                    if _cli_of(command):
                        out.append(shlex.join(command))
                    command = []
                else:
                    command.append(word)
    return out


def _cli_of(words: list[str]) -> tuple[str, list[str]] | None:
    """(cli name, its arguments) when the command runs one of ours (directly, by path, or
    through `sudo -u USER`), else None."""
    if words[:1] == ["sudo"]:
        words = words[3:] if words[1:2] == ["-u"] else words[1:]
    if words and Path(words[0]).name in CLIS:
        return Path(words[0]).name, [w for w in words[1:] if not w.startswith(">")]
    return None


def _check(cli_name: str, args: list[str]) -> None:
    """Parse ARGS the way the CLI would; raises click's UsageError as a run would."""
    cmd: click.Command = CLIS[cli_name]
    if not args:  # the program named in the text: it exists
        return
    ctx = cmd.make_context(cli_name, list(args))
    named_only = True
    while isinstance(cmd, click.Group):
        rest = [*ctx._protected_args, *ctx.args]
        if not rest:
            return
        name, sub, rest = cmd.resolve_command(ctx, rest)
        named_only = not rest
        try:
            ctx = sub.make_context(name, list(rest), parent=ctx)  # click consumes the list it parses
        except click.MissingParameter:
            if named_only:  # a reference to the command, not a command line
                return
            raise
        except click.BadParameter as exc:
            placeholders = [a for a in rest if _PLACEHOLDER.match(a)]
            if "does not exist" not in str(exc) and not any(f"'{p}'" in str(exc) for p in placeholders):
                raise
            return
        cmd = sub


def _documented() -> list[str]:
    text = DOC.read_text()
    commands = _code_block_commands(text)
    commands += [m.group(1) for m in _INLINE.finditer(text)]
    return sorted(set(commands))


def test_the_doc_shows_commands_of_every_kind():
    found = _documented()
    # The extraction itself is checked: these are in the doc today.
    for expected in ("tts-provisioner rollback joe --release", "tts-ctl check --reload --expect-version V",
                     "/opt/tts-fleet/venv/bin/tts-ctl wait-ready --timeout 900"):
        assert expected in found, found


def _commands(cmd: click.Command):
    yield cmd
    for sub in getattr(cmd, "commands", {}).values():
        yield from _commands(sub)


@pytest.fixture
def operator_environment(monkeypatch):
    """What an operator exports once (docs/mirror.md): every required option that reads an
    environment variable gets one."""
    for cli in CLIS.values():
        for cmd in _commands(cli):
            for param in cmd.params:
                if isinstance(param, click.Option) and param.required and param.envvar:
                    for name in [param.envvar] if isinstance(param.envvar, str) else param.envvar:
                        monkeypatch.setenv(name, "set-in-the-environment")


@pytest.mark.parametrize("line", _documented())
def test_documented_command_parses(line, operator_environment):
    words = shlex.split(line)
    found = _cli_of(words)
    assert found, line
    try:
        _check(*found)
    except click.UsageError as exc:
        raise AssertionError(f"docs/operations.md: `{line}`: {exc.format_message()}") from None


def test_the_check_catches_a_missing_argument():
    # The check bites: a command line that lacks a required argument fails it.
    with pytest.raises(click.MissingParameter, match="name"):
        _check("tts-provisioner", ["rollback"] + ["--release"])
