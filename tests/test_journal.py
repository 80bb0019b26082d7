"""Log lines reach the journal at their level (issue 28, item 6), under a real journald.

Not systemd as PID 1 (it is not here, and the nspawn harness is another branch's): the test
starts Debian's own `systemd-journald` in a private mount namespace (tmpfs on
/run/systemd and /run/log, so it owns a private /run/systemd/journal/stdout), puts the
command in a cgroup named `.../tts-provisioner.service` (journald derives _SYSTEMD_UNIT, what
`journalctl -u` matches, from the sender's cgroup), and connects its output to the
journal with `systemd-cat`, setting JOURNAL_STREAM to that stream's device:inode as a
service manager does for StandardError=journal (systemd-cat does not set it).

The provisioner runs `sync` against a mirror nobody listens on at log_level debug: it
logs debug lines, a warning (mirror unavailable) and an error (sync failed), then its
command's report (`joe: FAILED: ...`). Every line must be stored at its level's PRIORITY (debug 7, info 6,
warning 4, error 3) with the JSON event as MESSAGE (journald stripped the `<N>`), and
`journalctl -p err -u tts-provisioner` must show exactly the errors. The same command
without JOURNAL_STREAM (stderr not known to be the journal) stores everything at 6: the
fault the issue reported, and proof that the check bites.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tts_testkit.paths import VENV_BIN as BIN
from tts_testkit.provisioner_setup import make_keys, write_config

pytestmark = pytest.mark.integration

JOURNALD = Path("/lib/systemd/systemd-journald")
CGROUP_ROOT = Path("/sys/fs/cgroup/unified") if Path("/sys/fs/cgroup/unified").is_dir() else Path("/sys/fs/cgroup")


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mount namespace, journald, cgroups)"
    missing = [t for t in ("unshare", "systemd-cat", "journalctl") if not shutil.which(t)]
    if missing or not JOURNALD.exists():
        return f"missing {missing or JOURNALD} (Debian package systemd)"
    if not (CGROUP_ROOT / "cgroup.procs").exists() or not os.access(CGROUP_ROOT, os.W_OK):
        return f"no writable unified cgroup hierarchy at {CGROUP_ROOT}"
    return None


SCRIPT = r"""
set -u
mount --make-rprivate /
mkdir -p /run/systemd /run/log
mount -t tmpfs tmpfs /run/systemd
mount -t tmpfs tmpfs /run/log
mkdir -p /run/systemd/journal
{journald} >{work}/journald.log 2>&1 &
jpid=$!
for i in $(seq 1 100); do [ -S /run/systemd/journal/stdout ] && break; sleep 0.1; done
cg={cgroup}/system.slice/tts-journaltest-$$.slice/tts-provisioner.service
mkdir -p $cg
echo $$ > $cg/cgroup.procs
run() {{
  systemd-cat -t "$1" sh -c "$2"' exec {bin}/tts-provisioner --config {config} sync' >/dev/null 2>&1
  echo "rc=$?" >>{work}/rcs
}}
# As systemd does for StandardError=journal: JOURNAL_STREAM names the stream.
run tts-provisioner 'export JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) TTS_LOG_FORMAT=json;'
run without-stream 'unset JOURNAL_STREAM; export TTS_LOG_FORMAT=json;'
journalctl -D /run/log/journal --sync 2>/dev/null || sleep 1
journalctl -D /run/log/journal -o json --no-pager >{work}/all.json
journalctl -D /run/log/journal -p err -u tts-provisioner -o cat --no-pager >{work}/err.txt
echo $$ > {cgroup}/cgroup.procs
kill $jpid; wait $jpid 2>/dev/null
rmdir $cg {cgroup}/system.slice/tts-journaltest-$$.slice
rmdir {cgroup}/system.slice 2>/dev/null || true
"""

LEVEL_PRIORITY = {"debug": "7", "info": "6", "warning": "4", "error": "3", "critical": "2"}


def entries(path: Path, identifier: str) -> list[dict]:
    return [e for e in map(json.loads, path.read_text().splitlines()) if e.get("SYSLOG_IDENTIFIER") == identifier]


@pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))
def test_each_line_reaches_the_journal_at_its_level(tmp_path):
    keys = make_keys(tmp_path)
    with socket.socket() as s:  # a port nobody listens on: the mirror is unreachable
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    creds = tmp_path / "creds.toml"
    creds.write_text('access_key = "AK"\nsecret_key = "not-a-secret-at-all"\n')
    creds.chmod(0o600)
    config = write_config(tmp_path, [dict(name="primary", endpoint=f"http://127.0.0.1:{port}", bucket="b",
                                          credentials_file=creds)], keys, extra='log_level = "debug"')
    work = tmp_path / "out"
    work.mkdir()
    script = SCRIPT.format(journald=JOURNALD, work=work, cgroup=CGROUP_ROOT, bin=BIN, config=config)
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (work / "rcs").read_text().split() == ["rc=1", "rc=1"]  # the sync failed, both times

    with_stream = entries(work / "all.json", "tts-provisioner")
    assert with_stream, (work / "journald.log").read_text()
    seen = set()
    for entry in with_stream:
        message = entry["MESSAGE"]
        assert not message.startswith("<"), entry  # journald took the prefix off
        if not message.startswith("{"):  # the command's own report: "joe: FAILED: <cause>"
            assert message.startswith("joe: FAILED: ") and entry["PRIORITY"] == "3", entry
            seen.add("cli-error")
            continue
        event = json.loads(message)  # the documented format: one JSON event per line
        assert entry["PRIORITY"] == LEVEL_PRIORITY[event["level"]], (entry["PRIORITY"], event)
        assert entry["_SYSTEMD_UNIT"] == "tts-provisioner.service"
        seen.add(event["level"])
    assert {"debug", "warning", "error", "cli-error"} <= seen, seen  # (info is 6 either way)

    # journalctl -p err -u tts-provisioner: the errors, and nothing less severe.
    errors = (work / "err.txt").read_text().splitlines()
    assert any('"event": "sync failed"' in line for line in errors), errors
    assert any(line.startswith("joe: FAILED: ") for line in errors), errors
    for line in errors:
        if line.startswith("{"):
            assert json.loads(line)["level"] in {"error", "critical"}, line

    # Without JOURNAL_STREAM nothing says stderr is the journal: no prefix, all at 6.
    without = entries(work / "all.json", "without-stream")
    assert without and {e["PRIORITY"] for e in without} == {"6"}, [e["PRIORITY"] for e in without]
    assert not any(e["MESSAGE"].startswith("<") for e in without)
