"""The Runtime: model manager + scheduler + metrics + the systemd watchdog, started together.

Every front end (the HTTP app today) serves through one Runtime: one scheduler, so all their
requests batch together, and one frontend thread for text work.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from tts_common.metrics_server import MetricsServer
from tts_common.notify import notify, watchdog_interval

from ..config import RuntimeConfig
from ..models import ModelManager
from ..scheduler import Scheduler
from .metrics import Metrics

log = structlog.get_logger(__name__)


class Runtime:
    def __init__(self, config: RuntimeConfig, loader=None):
        self.config = config
        self.metrics = Metrics()
        self.manager = ModelManager(config, loader)
        self.scheduler = Scheduler(
            self.manager.holder,
            max_batch_size=config.max_batch_size,
            max_batch_ids=config.max_batch_ids,
            express_max_ids=config.express_max_ids,
            max_wait_ms=config.max_wait_ms,
            queue_size=config.queue_size,
            queue_ids=config.queue_ids,
            on_batch=self.metrics.observe_batch,
        )
        self.metrics.watch(self.scheduler, self.manager)
        self._metrics_server: MetricsServer | None = None
        # espeak (inside the frontend) keeps global state: one thread does all text work
        self.frontend_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="frontend")
        self.started_at = time.time()
        self.requests_served = 0
        self._stop = threading.Event()
        self._pinger: threading.Thread | None = None

    def start(self) -> None:
        self.scheduler.start()
        self.manager.start()
        if self.config.metrics_socket:  # metrics alone, for the metrics socket unit (docs/operations.md)
            self._metrics_server = MetricsServer(Path(self.config.metrics_socket), self.metrics.registry).serve()
        interval = watchdog_interval()
        if interval:
            self._pinger = threading.Thread(target=self._watchdog, args=(interval,), name="watchdog", daemon=True)
            self._pinger.start()

    def stop(self) -> None:
        notify(STOPPING=1)
        self._stop.set()
        self.scheduler.stop()
        self.manager.stop()
        if self._metrics_server:
            self._metrics_server.stop()
        self.frontend_pool.shutdown(wait=False, cancel_futures=True)

    def _watchdog(self, interval: float) -> None:
        # Ping only while the inference worker is alive; a dead or wedged worker stops
        # the pings and systemd restarts the service.
        while not self._stop.wait(interval):
            if self.scheduler.alive(stuck_after=max(60.0, 2 * self.config.deadline_s)):
                notify(WATCHDOG=1)
            else:
                log.error("inference worker is not alive; withholding watchdog ping")

    async def frontend(self, fn, *args, **kwargs):
        """Run text work (espeak) on the one frontend thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.frontend_pool, lambda: fn(*args, **kwargs))

    def status(self) -> dict[str, Any]:
        s = self.scheduler
        return {
            "ready": self.manager.ready,
            "reason": self.manager.reason or None,
            "default_voice": self.config.default_voice,
            "models": self.manager.describe(),
            "queue": {
                "depth": s.depth,  # queued utterances
                "capacity": s.queue_size,  # queued requests
                "requests": s.queued_requests,
                "ids": s.queued_ids,  # queued work, phoneme ids
                "capacity_ids": s.queue_ids,
                "max_batch_size": s.max_batch_size,
                "max_batch_ids": s.max_batch_ids,
                "largest_batch_ids": s.largest_batch_ids,  # since start: padded size of the largest batch
                "longest_utterance_ids": s.longest_utterance,  # since start: longest utterance synthesized
                "max_wait_ms": s.max_wait * 1000,
                "held": s.held(),  # $TTS_RUNTIME_HOLD_FILE exists: no batch starts (drills, tests)
                "express_max_ids": s.express_max_ids,
                "overtakes": s.overtakes,  # short requests that ran while a long batch was paused
            },
            "worker_alive": s.alive(),
            "batches_served": s.batches_served,
            "sentences_served": s.jobs_served,
            "requests_served": self.requests_served,
            "uptime_s": round(time.time() - self.started_at, 1),
        }
