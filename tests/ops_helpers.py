"""Helpers for the operations tests (systemd units, ansible): fake roots, an sd_notify
listener, and mount-namespace sandboxes.

Every wait here is bounded in time; every network address is 127.0.0.1 or a Unix socket.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tts_testkit.paths import REPO, SANDBOX_VENV, VENV

SYSTEMD_DIR = REPO / "systemd"
ANSIBLE_DIR = REPO / "ansible"
UNITS = ["tts-provisioner.service", "tts-runtime.socket", "tts-runtime.service",
         "tts-tracker.service", "tts-tracker-whitelist.service", "tts-tracker-whitelist.timer",
         "tts-provisioner-metrics.socket", "tts-provisioner-metrics.service",
         "tts-runtime-metrics.socket", "tts-runtime-metrics.service",
         "tts-trust-refresh.service", "tts-trust-refresh.timer"]
SERVICES = ["tts-provisioner.service", "tts-runtime.service", "tts-tracker.service", "tts-tracker-whitelist.service",
            "tts-provisioner-metrics.service", "tts-runtime-metrics.service", "tts-trust-refresh.service"]
# Where the ansible role installs the venv; the units' ExecStart= point into it.
INSTALLED_VENV = Path("/opt/tts-fleet/venv")


# -- fake root for systemd-analyze ------------------------------------------------------

def make_fake_root(root: Path, gpu: bool = False) -> Path:
    """A root directory holding the units as the role installs them, plus what they
    reference (targets, the ExecStart binaries as stubs), for `--root=`."""
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(SYSTEMD_DIR / unit, unit_dir / unit)
    if gpu:
        (unit_dir / "tts-runtime.service.d").mkdir()
        shutil.copy(SYSTEMD_DIR / "dropins/gpu.conf", unit_dir / "tts-runtime.service.d/gpu.conf")
    lib = root / "usr/lib/systemd/system"
    lib.mkdir(parents=True)
    # Default dependencies (sysinit.target, shutdown.target, ...) must resolve.
    for pattern in ("*.target", "*.slice"):
        for src in Path("/lib/systemd/system").glob(pattern):
            if src.is_file():
                shutil.copy(src, lib / src.name)
    for stub in ("opt/tts-fleet/venv/bin/tts-provisioner", "opt/tts-fleet/venv/bin/tts-runtime",
                 "opt/tts-fleet/venv/bin/tts-mirror", "usr/bin/opentracker", "bin/systemctl",
                 "usr/lib/systemd/systemd-socket-proxyd"):
        path = root / stub
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(0o755)
    (root / "bin").mkdir(exist_ok=True)
    shutil.copy("/bin/sh", root / "bin/sh")  # ExecReload= (the shell's own kill)
    return root


# -- sd_notify listener -----------------------------------------------------------------

@dataclass
class Message:
    at: float
    fields: dict[str, str]
    observed: object = None  # what on_message returned at receipt time


@dataclass
class NotifyListener:
    """A NOTIFY_SOCKET datagram socket (what systemd listens on), recording every message.

    `on_message(fields)` runs in the receiving thread the moment a datagram arrives,
    so a test can check the world at that instant (e.g. "is the cache complete when
    READY=1 arrives?").
    """

    path: Path
    on_message: object = None
    messages: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._sock.settimeout(0.2)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            fields = {}
            for line in data.decode("utf-8", "replace").splitlines():
                key, _, value = line.partition("=")
                fields[key] = value
            observed = self.on_message(fields) if self.on_message else None
            with self._cond:
                self.messages.append(Message(time.monotonic(), fields, observed))
                self._cond.notify_all()

    def find(self, key: str, value: str | None = None) -> list[Message]:
        with self._cond:
            return [m for m in self.messages if key in m.fields and (value is None or m.fields[key] == value)]

    def wait_for(self, key: str, value: str | None = None, timeout: float = 60.0, count: int = 1) -> list[Message]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self.messages if key in m.fields and (value is None or m.fields[key] == value)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [m.fields for m in self.messages][-15:]
                    raise AssertionError(f"no {count}x {key}={value or '*'} within {timeout}s; last messages: {seen}")
                self._cond.wait(min(left, 0.5))

    def statuses(self) -> list[str]:
        return [m.fields["STATUS"] for m in self.find("STATUS")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


# -- mount namespaces ---------------------------------------------------------------------

_NS_REASON: str | None | bool = False


def namespace_unavailable() -> str | None:
    """None when `unshare --mount` plus an overlay on /etc works here, else the reason."""
    global _NS_REASON
    if _NS_REASON is not False:
        return _NS_REASON
    if not shutil.which("unshare"):
        _NS_REASON = "unshare(1) is not installed"
        return _NS_REASON
    probe_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"ns-probe-{os.getpid()}"
    for sub in ("u", "w"):
        (probe_dir / sub).mkdir(parents=True, exist_ok=True)
    script = (f"mount -t overlay overlay -o lowerdir=/etc,upperdir={probe_dir}/u,workdir={probe_dir}/w /etc"
              " && mount -t tmpfs tmpfs /run && echo ok")
    try:
        out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                             capture_output=True, text=True, timeout=120)
        _NS_REASON = None if out.returncode == 0 and "ok" in out.stdout else (
            f"cannot build a mount-namespace sandbox here (unshare --mount + overlayfs on /etc + tmpfs on /run "
            f"exited {out.returncode}: {(out.stderr or out.stdout).strip()[:300]})")
    except (OSError, subprocess.TimeoutExpired) as exc:
        _NS_REASON = f"unshare --mount failed: {exc}"
    shutil.rmtree(probe_dir, ignore_errors=True)
    return _NS_REASON


def sandbox_prelude(work: Path, overlays: tuple[str, ...] = ("/etc", "/opt", "/var")) -> str:
    """Shell lines that turn a fresh `unshare --mount` into a sandbox: overlays (upper
    dirs under `work`) on the given trees, a tmpfs on /run, the test venv at the
    installed venv path (read-only), and the checkout's venv read-only so nothing in the
    sandbox can change the shared checkout's environment."""
    lines = ["set -eu", "mount --make-rprivate /"]
    for tree in overlays:
        name = tree.strip("/").replace("/", "_")
        upper, wdir = work / f"{name}-upper", work / f"{name}-work"
        lines.append(f"mkdir -p {upper} {wdir}")
        lines.append(f"mount -t overlay overlay -o lowerdir={tree},upperdir={upper},workdir={wdir} {tree}")
    lines += [
        "mount -t tmpfs -o mode=0755 tmpfs /run",
        f"mount --bind {VENV} {VENV} && mount -o remount,bind,ro {VENV}",
        # The units' PrivateTmp/ProtectHome hide a checkout under /tmp, /home or /root:
        # show the test venv to the services at a fixed path inside the /opt overlay.
        f"mkdir -p {SANDBOX_VENV} && mount --bind {VENV} {SANDBOX_VENV} && mount -o remount,bind,ro {SANDBOX_VENV}",
    ]
    return "\n".join(lines)


def run_in_sandbox(script: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                          capture_output=True, text=True, timeout=timeout, env=env)

