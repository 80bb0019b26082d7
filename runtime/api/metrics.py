"""The Prometheus metrics of one runtime (served at GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """One registry per app, so several apps (tests) never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tts_requests_total", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram(
            "tts_request_duration_seconds", "Request latency", ["endpoint"], registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
        )
        self.queue_depth = Gauge("tts_queue_depth", "Sentences waiting for the inference worker", registry=r)
        self.batch_size = Histogram("tts_batch_size", "Sentences per batch", registry=r,
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
        self.batch_seconds = Histogram("tts_batch_duration_seconds", "Engine time per batch", registry=r,
                                       buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.audio_seconds = Counter("tts_audio_seconds_total", "Audio produced", ["voice"], registry=r)
        self.errors = Counter("tts_errors_total", "Errors by kind", ["kind"], registry=r)
        self.ready = Gauge("tts_ready", "1 when every configured voice can synthesize", registry=r)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
