"""Run any model server on the verified cache: `tts-provisioner supervise NAME -- COMMAND...`.

The main process of `tts-model@NAME.service` (systemd/tts-model@.service). It

1. waits (filesystem events, `modelwait.CacheWatch`) until `current/NAME` is a complete
   snapshot, then starts the operator's COMMAND, which reads the model from
   `<cache>/current/NAME` (also in $TTS_MODEL_DIR; $TTS_MODEL_VERSION says which version);
2. tells systemd READY only once the health check passes (an HTTP URL answering 2xx, or
   a command exiting 0, e.g. `tts-ctl check --url ...`, the audio gate);
3. when `current/NAME` moves, either sends the server the configured signal
   (`--on-change reload`) or stops and starts it (`--on-change restart`), and checks
   health again;
4. when the new version fails (the command exits, or health never passes), rolls the
   provisioner back to the version that served before (`tts-provisioner rollback`:
   current switched back and held until the channel moves) and starts that again.

Every state change is one line in the journal, systemd's STATUS= and
`<status_root>/NAME/status.json` (what `tts-provisioner wait --serving` reads). Nothing
is ever deleted: a snapshot removed under a running server is reported and the server
keeps what it loaded.

Why one supervising process inside the model's unit rather than a `.path` unit that
restarts it: restarting another unit needs the service manager's privileges (root or a
polkit rule), while the supervisor needs only to signal its own child; the health gate
can hold READY back (systemctl start returns when the server answers, not when it
forked); the rollback runs as the same user that serves; and it works the same with no
service manager at all (containers, the multi-host rollout test).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from tts_common.atomic import write_atomic
from tts_common.errors import TtsError
from tts_common.notify import notify

from .cache import CacheReader, Snapshot
from .config import ProvisionerConfig
from .daemon import LOCK_FILE
from .status import PID_FILE
from .modelwait import DEFAULT_STATUS_ROOT, CacheWatch, current_state, provisioner_says, status_path

log = structlog.get_logger(__name__)

ON_CHANGE = ("restart", "reload", "none")


@dataclass(frozen=True)
class HealthCheck:
    """How to tell the server answers. Without url or command: it stays up `grace` seconds."""
    url: str | None = None
    command: tuple[str, ...] = ()
    timeout: float = 120.0  # how long a start (or reload) may take to pass it
    grace: float = 2.0

    def describe(self) -> str:
        if self.url:
            return f"GET {self.url}"
        if self.command:
            return f"command {' '.join(self.command)!r}"
        return f"the command staying up {self.grace:g}s"

    def probe(self) -> str | None:
        """None when healthy, else why not (one line)."""
        if self.url:
            try:
                with urllib.request.urlopen(self.url, timeout=10) as response:
                    return None if 200 <= response.status < 300 else f"HTTP {response.status}"
            except urllib.error.HTTPError as exc:
                return f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError) as exc:
                return str(getattr(exc, "reason", exc))
        if self.command:
            try:
                out = subprocess.run(self.command, capture_output=True, text=True, timeout=max(self.timeout, 5.0),
                                     stdin=subprocess.DEVNULL)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return str(exc)
            lines = [line for line in (out.stderr + out.stdout).splitlines() if line.strip()]
            return None if out.returncode == 0 else (lines[-1] if lines else f"exit status {out.returncode}")
        return None


@dataclass(frozen=True)
class ServeOptions:
    name: str
    command: tuple[str, ...]
    on_change: str = "restart"
    reload_signal: int = signal.SIGHUP
    health: HealthCheck = field(default_factory=HealthCheck)
    stop_timeout: float = 30.0
    status_root: Path = DEFAULT_STATUS_ROOT


class ServeFailed(TtsError):
    """The server could not be started (or kept) on any version; exit non-zero."""


class Supervisor:
    def __init__(self, config: ProvisionerConfig, config_path: Path, opts: ServeOptions):
        self.config, self.config_path, self.opts = config, Path(config_path), opts
        self.cache = CacheReader(config.cache_dir)
        self.stop = threading.Event()
        self.child: subprocess.Popen | None = None
        self.serving: Snapshot | None = None
        self.watch: CacheWatch | None = None
        self._said: tuple[str, str] | None = None
        self._status_warned = False

    # -- reporting -------------------------------------------------------------------
    def report(self, state: str, line: str, error: bool = False, **fields) -> None:
        """One line in the journal, STATUS= and the status file; repeats are not logged."""
        if (state, line) != self._said:
            (log.error if error else log.info)(line, model=self.opts.name, state=state, **fields)
            self._said = (state, line)
        notify(STATUS=line)
        doc = {"name": self.opts.name, "state": state, "message": line, "pid": os.getpid(),
               "version": self.serving.version if self.serving else None,
               "server_pid": self.child.pid if self.child and self.child.poll() is None else None,
               "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
        try:
            write_atomic(status_path(self.opts.status_root, self.opts.name), json.dumps(doc, indent=2) + "\n")
        except OSError as exc:
            if not self._status_warned:
                log.warning("cannot write the model status file", error=str(exc))
                self._status_warned = True

    # -- the child -------------------------------------------------------------------
    def _launch(self, snap: Snapshot) -> None:
        env = dict(os.environ, TTS_MODEL_NAME=self.opts.name, TTS_MODEL_VERSION=snap.version,
                   TTS_MODEL_DIR=str(self.cache.current_dir / self.opts.name))
        env.pop("NOTIFY_SOCKET", None)  # READY is the supervisor's to say, after the health check
        self.child = subprocess.Popen(self.opts.command, stdin=subprocess.DEVNULL, env=env)
        child = self.child
        # Its exit wakes the main loop at once (no polling of the child).
        threading.Thread(target=lambda: (child.wait(), self.watch and self.watch.changed.set()),
                         name="child-wait", daemon=True).start()

    def _stop_child(self) -> None:
        child, self.child = self.child, None
        if child is None or child.poll() is not None:
            return
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=self.opts.stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning("the server did not stop on SIGTERM; killing it", model=self.opts.name,
                        seconds=self.opts.stop_timeout)
            child.kill()
            child.wait(timeout=30)

    def _await_health(self) -> str | None:
        """None once the health check passes; else why the server is not healthy."""
        health = self.opts.health
        started = time.monotonic()
        last = "no answer yet"
        while True:
            rc = self.child.poll()
            if rc is not None:
                how = f"signal {-rc}" if rc < 0 else f"status {rc}"
                return f"the command exited with {how} before it answered"
            if health.url or health.command:
                last = health.probe()
                if last is None and self.child.poll() is None:
                    return None
            elif time.monotonic() - started >= health.grace:
                return None
            if time.monotonic() - started > health.timeout:
                return f"health check ({health.describe()}) did not pass within {health.timeout:g}s (last: {last})"
            if self.stop.wait(0.5):
                return "stopped while starting"

    def _start(self, snap: Snapshot) -> str | None:
        self.report("starting", f"starting {self.opts.name} {snap.version}", version_starting=snap.version)
        self._launch(snap)
        reason = self._await_health()
        if reason is None:
            self.serving = snap
        else:
            self._stop_child()
        return reason

    # -- the main loop ---------------------------------------------------------------
    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: (self.stop.set(), self.watch and self.watch.changed.set()))
        # `systemctl reload tts-model@NAME`: look at current/NAME now.
        signal.signal(signal.SIGHUP, lambda *_: self.watch and self.watch.changed.set())
        with CacheWatch(self.cache, self.config.runtime_dir, self.opts.name) as self.watch:
            try:
                snap = self._first_snapshot()
                if snap is None:
                    return 0
                reason = self._start(snap)
                if reason is not None:
                    raise ServeFailed(f"{self.opts.name} {snap.version} did not start: {reason}")
                self._serving_line()
                notify(READY=1)
                return self._follow()
            except ServeFailed as exc:
                self.report("failed", str(exc), error=True)
                return 1
            finally:
                notify(STOPPING=1)
                self._stop_child()

    def _serving_line(self, note: str = "") -> None:
        snap = self.serving
        self.report("serving", f"serving {self.opts.name} {snap.version} (pid {self.child.pid}){note}")

    def _first_snapshot(self) -> Snapshot | None:
        while not self.stop.is_set():
            state = current_state(self.cache, self.opts.name)
            if state.snapshot is not None:
                return state.snapshot
            self.report("waiting", f"waiting for {self.opts.name}: {state.why}; "
                        f"{provisioner_says(self.config.runtime_dir, self.opts.name)}")
            self.watch.wait(3600)
        return None

    def _follow(self) -> int:
        while not self.stop.is_set():
            self.watch.wait(3600)
            if self.stop.is_set():
                break
            rc = self.child.poll()
            if rc is not None:
                raise ServeFailed(f"the server of {self.opts.name} {self.serving.version} exited with status {rc}")
            state = current_state(self.cache, self.opts.name)
            if state.snapshot is None:
                self.report("degraded", f"{state.why}; the server keeps serving {self.opts.name} "
                            f"{self.serving.version} as loaded; nothing was deleted", error=True)
            elif state.version != self.serving.version:
                self._swap(state.snapshot)
            elif self._said and self._said[0] == "degraded":
                self._serving_line()
        return 0

    # -- hot swap and fallback ---------------------------------------------------------
    def _swap(self, new: Snapshot) -> None:
        old, mode = self.serving, self.opts.on_change
        if mode == "none":
            self.report("serving", f"current/{self.opts.name} moved to {new.version}; still serving {old.version} "
                        "(on-change none: restart the unit to switch)")
            return
        self.report("swapping", f"{self.opts.name}: current moved {old.version} -> {new.version}, {mode}ing the server")
        reason = self._reload(new) if mode == "reload" else self._restart(new)
        if reason is None:
            self._serving_line()
            return
        self.report("rolling-back", f"{self.opts.name} {new.version} failed: {reason}; rolling back to {old.version}",
                    error=True, failed_version=new.version)
        self._roll_back(old, new, reason)

    def _reload(self, new: Snapshot) -> str | None:
        self.child.send_signal(self.opts.reload_signal)
        reason = self._await_health()
        if reason is None:
            self.serving = new
        return reason

    def _restart(self, new: Snapshot) -> str | None:
        self._stop_child()
        return self._start(new)

    def _await_cache_lock(self, limit: float = 300.0) -> None:
        """A one-shot `tts-provisioner sync` (no daemon: a container, a rollout by hand) may
        still hold the cache: the rollback command would take it for the daemon and signal it.
        Wait until the lock is free or held by the daemon itself (bounded)."""
        lock = Path(self.config.cache_dir) / LOCK_FILE
        daemon = Path(self.config.runtime_dir) / PID_FILE
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and not self.stop.is_set():
            try:
                fd = os.open(lock, os.O_RDONLY)
            except OSError:
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return
            except OSError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                if daemon.is_file() and daemon.read_text().strip() == holder:
                    return
            finally:
                os.close(fd)
            self.stop.wait(0.2)

    def _roll_back(self, old: Snapshot, new: Snapshot, reason: str) -> None:
        self._await_cache_lock()
        argv = [sys.executable, "-m", "provisioner", "--config", str(self.config_path), "rollback",
                self.opts.name, old.version]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        state = current_state(self.cache, self.opts.name, old.version)
        if out.returncode != 0 or state.snapshot is None:
            said = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
            raise ServeFailed(f"{self.opts.name} {new.version} failed ({reason}) and the rollback to {old.version} "
                              f"failed too: {said}; {state.why}")
        if self.opts.on_change == "reload" and self.child is not None and self.child.poll() is None:
            why = self._reload(state.snapshot)
        else:
            self._stop_child()
            why = self._start(state.snapshot)
        if why is not None:
            raise ServeFailed(f"rolled back to {self.opts.name} {old.version}, but it did not come back: {why}")
        self._serving_line(f"; rolled back from {new.version} ({reason}), held there until the channel moves")
        self.report("serving", self._said[1], rolled_back_from=new.version, rollback_reason=reason)
