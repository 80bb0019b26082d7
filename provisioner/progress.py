"""Progress reporting: one place that turns download progress into the status file,
systemd's STATUS= line, throttled log lines and (on a terminal) a rich progress bar."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import structlog
from rich.progress import (BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

from tts_common.notify import notify
from .status import ProvisionerStatus

log = structlog.get_logger(__name__)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class ProgressReporter:
    def __init__(self, status: ProvisionerStatus, runtime_dir: Path, console: bool = False,
                 log_every: float = 5.0, status_every: float = 1.0):
        self.status = status
        self.runtime_dir = Path(runtime_dir)
        self.log_every = log_every
        self.status_every = status_every
        self._last_log = 0.0
        self._last_write = 0.0
        self._rate: dict[str, tuple[float, int, float]] = {}  # model -> (t, bytes, smoothed rate)
        self._bar: Progress | None = None
        self._lock = threading.Lock()
        self.last_tick = time.monotonic()  # the daemon's watchdog reads this while downloads run
        self._tasks: dict[str, TaskID] = {}
        if console:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), transient=False)

    def __enter__(self) -> "ProgressReporter":
        if self._bar:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar:
            self._bar.stop()

    def publish(self, message: str | None = None, force: bool = True) -> None:
        """Write status.json and send STATUS= (throttled unless forced)."""
        now = time.monotonic()
        if message is not None:
            self.status.message = message
        if not force and now - self._last_write < self.status_every:
            return
        self._last_write = now
        with self._lock:  # the watcher thread may publish damage while the main loop works
            self.status.write(self.runtime_dir)
        notify(STATUS=self.status.message[:200])

    def begin(self, model: str, version: str, total: int, files: int) -> None:
        m = self.status.model(model)
        m.wanted_version, m.state, m.error = version, "downloading", None
        m.bytes_done, m.bytes_total, m.files_done, m.files_total = 0, total, 0, files
        m.rate_bps, m.eta_s = 0.0, None
        self._rate[model] = (time.monotonic(), 0, 0.0)
        if self._bar:
            self._tasks[model] = self._bar.add_task(f"{model} {version}", total=total)
        log.info("download started", model=model, version=version, files=files, bytes=total)
        self.publish(f"{model} {version}: downloading {files} files, {human_bytes(total)}")

    # -- the download loop's accounting (download.DownloadAccount) -------------------------
    def fetched(self, model: str, source: str, nbytes: int) -> None:
        """Bytes that arrived for the model's files, from "mirror" or "peers"."""
        fetched = self.status.model(model).fetched
        fetched[source] = fetched.get(source, 0) + nbytes

    def mismatch(self, model: str) -> None:
        """A downloaded file of the model failed its sha256 check."""
        self.status.model(model).verify_failures += 1

    def update(self, model: str, done: int, total: int, files_done: int) -> None:
        m = self.status.model(model)
        now = self.last_tick = time.monotonic()
        t0, b0, rate = self._rate.get(model, (now, 0, 0.0))
        if now - t0 >= 0.5:
            inst = (done - b0) / (now - t0)
            rate = inst if rate == 0 else 0.7 * rate + 0.3 * inst
            self._rate[model] = (now, done, rate)
        m.bytes_done, m.bytes_total, m.files_done = done, total, files_done
        m.rate_bps = round(rate, 1)
        m.eta_s = round((total - done) / rate, 1) if rate >= 1 else None
        if self._bar and model in self._tasks:
            self._bar.update(self._tasks[model], completed=done)
        pct = 100.0 * done / total if total else 100.0
        eta = f", ETA {m.eta_s:.0f}s" if m.eta_s is not None else ""
        message = (f"{model} {m.wanted_version}: {pct:.0f}% of {human_bytes(total)} "
                   f"at {human_bytes(rate)}/s{eta} ({files_done}/{m.files_total} files)")
        if now - self._last_log >= self.log_every:
            self._last_log = now
            log.info("download progress", model=model, version=m.wanted_version, bytes_done=done,
                     bytes_total=total, rate_bps=m.rate_bps, eta_s=m.eta_s, files_done=files_done)
        self.status.message = message
        self.publish(force=False)

    def finish(self, model: str, current_version: str | None, error: str | None = None,
               cause: str | None = None) -> None:
        """A pass over the model ended: at its wanted version, or failed with `error`
        (`cause`: its class, provisioner/metrics.py FAILURE_CAUSES, counted)."""
        m = self.status.model(model)
        m.current_version = current_version
        m.state = "error" if error else "ok"
        m.error = error
        if error:
            key = cause or "internal"
            m.failures[key] = m.failures.get(key, 0) + 1
        else:
            m.last_success = time.time()
        m.rate_bps, m.eta_s = 0.0, None
        if not error:
            m.bytes_done = m.bytes_total
            m.files_done = m.files_total
        if self._bar and model in self._tasks:
            self._bar.update(self._tasks[model], completed=m.bytes_total)
