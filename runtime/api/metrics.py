"""The Prometheus metrics of one runtime (GET /metrics on the API socket, and alone on
`metrics_socket` for the metrics socket unit: tts_common/metrics_server.py).

Request metrics are observed by the access layer (access.py) when a request ends; the
state of the scheduler, the engines and the model manager is read at scrape time by
`RuntimeCollector`, so no hot path pays for it. Labels are bounded: `endpoint` (the
known paths and "other"), `status`, `kind` (error kinds), `voice` (the configured
voices), `device`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from tts_common.metrics_server import process_collector

if TYPE_CHECKING:
    from ..models import LoadedModel, ModelManager
    from ..scheduler import Scheduler
    from .record import AccessRecord

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
RTF_BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5)


class Metrics:
    """One registry per app, so several apps (tests) never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tts_requests_total", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("tts_request_duration_seconds", "Request latency", ["endpoint"], registry=r,
                                 buckets=LATENCY_BUCKETS)
        self.queue_depth = Gauge("tts_queue_depth", "Sentences waiting for the inference worker", registry=r)
        self.batch_size = Histogram("tts_batch_size", "Sentences per batch", registry=r,
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
        self.batch_seconds = Histogram("tts_batch_duration_seconds", "Engine time per batch", registry=r,
                                       buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.audio_seconds = Counter("tts_audio_seconds_total", "Audio produced", ["voice"], registry=r)
        self.errors = Counter("tts_errors_total", "Errors by kind", ["kind"], registry=r)
        self.ready = Gauge("tts_ready", "1 when every configured voice can synthesize", registry=r)
        self.first_audio = Histogram(
            "tts_time_to_first_audio_seconds", "Request received to its first audio sent (a stream: its first "
            "piece; a whole answer: the answer)", ["voice"], registry=r, buckets=LATENCY_BUCKETS)
        self.queue_wait = Histogram("tts_queue_wait_seconds", "Longest wait of a request's sentences for the "
                                    "inference worker", registry=r, buckets=LATENCY_BUCKETS)
        self.real_time = Histogram("tts_real_time_factor_ratio", "Synthesis wall time per second of audio "
                                   "(real-time factor) of answered requests", ["voice"], registry=r,
                                   buckets=RTF_BUCKETS)
        process_collector(r)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def observe_synthesis(self, record: AccessRecord, seconds: float) -> None:
        """An answered synthesis request (status 200), `seconds` after it arrived."""
        voice = record.voice or "?"
        first = record.first_audio_ms / 1000 if record.first_audio_ms is not None else seconds
        self.first_audio.labels(voice).observe(first)
        if record.queue_ms is not None:
            self.queue_wait.observe(record.queue_ms / 1000)
        if record.synth_ms and record.audio_s:
            self.real_time.labels(voice).observe(record.synth_ms / 1000 / record.audio_s)

    def watch(self, scheduler: Scheduler, manager: ModelManager) -> None:
        """Read the scheduler's and the models' state at every scrape."""
        self.queue_depth.set_function(lambda: scheduler.depth)
        self.ready.set_function(lambda: 1.0 if manager.ready else 0.0)
        self.registry.register(RuntimeCollector(scheduler, manager))


class RuntimeCollector(Collector):
    def __init__(self, scheduler: Scheduler, manager: ModelManager):
        self.scheduler = scheduler
        self.manager = manager
        # Engine counters restart with each engine a hot swap loads: what the engines
        # before counted is carried, so the series only grows.
        self._carried: dict[tuple[str, str], int] = {}
        self._last: dict[str, tuple[tuple | None, dict]] = {}  # voice -> (its engine, its stats last seen)
        self._lock = threading.Lock()

    def collect(self) -> Iterator:
        s = self.scheduler
        yield GaugeMetricFamily("tts_queue_capacity", "Sentences the queue admits (beyond: 503)", value=s.queue_size)
        yield CounterMetricFamily("tts_overtakes", "Short requests that ran while a long batch was paused",
                                  value=s.overtakes)
        yield CounterMetricFamily("tts_batches", "Batches the engines ran", value=s.batches_served)
        yield from self._voices()

    def _voices(self) -> Iterator:
        info = InfoMetricFamily("tts_voice", "The version of each loaded voice and its device",
                                labels=["voice"])
        failing = GaugeMetricFamily("tts_voice_load_failed", "1 while the version current/<voice> names failed "
                                    "to load (the old version, if any, keeps serving)", labels=["voice"])
        failures = CounterMetricFamily("tts_voice_load_failures", "Loads of a voice that failed", labels=["voice"])
        oom = CounterMetricFamily("tts_oom_splits", "Batches halved after running out of memory", labels=["voice"])
        fallback = CounterMetricFamily("tts_cpu_fallbacks", "Requests moved to the CPU after a device OOM",
                                       labels=["voice"])
        manager = self.manager
        for name in manager.names:
            loaded = manager.holder.get(name)
            if loaded is not None:
                info.add_metric([name], {"version": loaded.snapshot.version, "device": str(loaded.engine.device)})
            failing.add_metric([name], 1.0 if manager.failed_version(name) else 0.0)
            failures.add_metric([name], manager.load_failures.get(name, 0))
            stats = self._engine_stats(name, loaded)
            oom.add_metric([name], stats["oom_splits"])
            fallback.add_metric([name], stats["cpu_fallbacks"])
        yield from (info, failing, failures, oom, fallback)

    def _engine_stats(self, voice: str, loaded: LoadedModel | None) -> dict[str, int]:
        keys = ("oom_splits", "cpu_fallbacks")
        with self._lock:  # two scrapes at once (API socket and metrics socket)
            last_id, last = self._last.get(voice, (None, {}))
            if loaded is None:  # closed: its last count stays
                now = last
            else:
                now = dict(getattr(loaded.engine, "stats", None) or {})
                engine_id = (str(loaded.snapshot.path), loaded.loaded_at)
                if engine_id != last_id:  # a new engine: the old one's count is carried
                    for key in keys:
                        self._carried[(voice, key)] = self._carried.get((voice, key), 0) + last.get(key, 0)
                self._last[voice] = (engine_id, now)
            return {key: self._carried.get((voice, key), 0) + now.get(key, 0) for key in keys}
