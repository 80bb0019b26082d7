"""The provisioner's Prometheus metrics: what status.json says, plus facts of the cache.

Everything is read at scrape time from the daemon's live `ProvisionerStatus` (the status
document's own fields, provisioner/status.py: one definition) and from the cache on disk
(snapshots, holds, quarantine, free space), so no code path keeps a second copy of a
number. Counters count since the daemon started (Prometheus handles the reset at a
restart). Labels: `model` (the configured models), `cause` (FAILURE_CAUSES), `source`
(mirror, peers), `state` (STATES), `role` (trusted metadata roles): all bounded.

The metrics are served on a Unix socket (`metrics_socket`, tts_common/metrics_server.py);
docs/operations.md ("Metrics and alerts") lists them with the alerts that use them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import requests.exceptions
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from mirror.manifest import ManifestError
from mirror.remote import MirrorError
from mirror.signing import SignatureError
from tts_common.metrics_server import process_collector

from .aria2 import Aria2Error
from .cache import CacheError, CacheReader
from .download import DiskSpaceError, DownloadError
from .hold import read_hold
from .mirrors import ManifestRejected, NotFoundOnMirror
from .status import ProvisionerStatus

if TYPE_CHECKING:
    from .config import ProvisionerConfig

# Why a sync pass over a model failed, one word each (the label of
# tts_provisioner_sync_failures_total; the model's `error` in status says the rest).
FAILURE_CAUSES = ("unreachable", "credentials", "not_found", "manifest_rejected", "mirror", "download",
                  "disk_full", "cache", "aria2", "io", "internal")
STATES = ("ok", "downloading", "verifying", "damaged", "error", "waiting")
SOURCES = ("mirror", "peers")


def failure_cause(exc: BaseException) -> str:
    """The class of a failed pass, from the exception (order matters: subclasses first).
    Mirror errors are told apart by the one-line messages mirror/remote.py `describe` and
    provisioner/mirrors.py write (tests/test_metrics.py pins them)."""
    if isinstance(exc, DiskSpaceError):
        return "disk_full"
    if isinstance(exc, DownloadError):
        return "download"
    if isinstance(exc, NotFoundOnMirror):
        return "not_found"
    if isinstance(exc, (ManifestRejected, ManifestError, SignatureError)):
        return "manifest_rejected"
    if isinstance(exc, MirrorError):
        text = str(exc)
        if "rejected the credentials" in text or "access denied" in text:
            return "credentials"
        if "unreachable" in text or "cannot reach" in text:
            return "unreachable"
        return "mirror"
    if isinstance(exc, CacheError):
        return "cache"
    if isinstance(exc, (Aria2Error, requests.exceptions.RequestException)):
        return "aria2"
    if isinstance(exc, OSError):
        return "io"
    return "internal"


class ProvisionerCollector(Collector):
    def __init__(self, status: ProvisionerStatus, config: ProvisionerConfig):
        self.status = status
        self.models = [m.name for m in config.models]
        self.cache_dir = config.cache_dir
        self.cache = CacheReader(config.cache_dir)

    def collect(self) -> Iterator:
        yield from self._versions()
        yield from self._sync()
        yield from self._cache()
        yield from self._daemon()

    def _versions(self) -> Iterator:
        wanted = InfoMetricFamily("tts_provisioner_model_wanted",
                                  "The version the model should be at (its channel's, a pin, or a rollback hold)",
                                  labels=["model"])
        current = InfoMetricFamily("tts_provisioner_model_current",
                                   "The version current/<model> points at (what the runtime may load)",
                                   labels=["model"])
        held = GaugeMetricFamily("tts_provisioner_rollback_held", "1 while a rollback hold keeps the model on a "
                                 "version its channel does not name", labels=["model"])
        for name in self.models:
            m = self.status.model(name)
            if m.wanted_version:
                wanted.add_metric([name], {"version": m.wanted_version})
            if m.current_version:
                current.add_metric([name], {"version": m.current_version})
            held.add_metric([name], 1.0 if read_hold(self.cache_dir, name) else 0.0)
        yield from (wanted, current, held)

    def _sync(self) -> Iterator:
        state = GaugeMetricFamily("tts_provisioner_model_state", "1 for the model's sync state", labels=["model", "state"])
        success = GaugeMetricFamily("tts_provisioner_last_success_timestamp_seconds",
                                    "When a sync pass last left the model at its wanted version", labels=["model"])
        failures = CounterMetricFamily("tts_provisioner_sync_failures", "Failed sync passes by cause",
                                       labels=["model", "cause"])
        verify = CounterMetricFamily("tts_provisioner_verification_failures",
                                     "Downloaded files whose bytes failed the manifest's sha256", labels=["model"])
        fetched = CounterMetricFamily("tts_provisioner_fetched_bytes", "Bytes that arrived for the model's files, "
                                      "by source (mirror: HTTP, or a web seed while one was used)",
                                      labels=["model", "source"])
        for name in self.models:
            m = self.status.model(name)
            for s in STATES:
                state.add_metric([name, s], 1.0 if m.state == s else 0.0)
            if m.last_success is not None:
                success.add_metric([name], m.last_success)
            counts = dict(m.failures)
            for cause in FAILURE_CAUSES:  # every cause present from the start: increase() sees the first
                failures.add_metric([name, cause], counts.get(cause, 0))
            verify.add_metric([name], m.verify_failures)
            got = dict(m.fetched)
            for source in SOURCES:
                fetched.add_metric([name, source], got.get(source, 0))
        yield from (state, success, failures, verify, fetched)

    def _cache(self) -> Iterator:
        snapshots = GaugeMetricFamily("tts_provisioner_snapshots", "Complete snapshots kept (current included)",
                                      labels=["model"])
        for name in self.models:
            snapshots.add_metric([name], len(self.cache.snapshots(name)))
        yield snapshots
        quarantined = 0
        try:
            for path in self.cache.quarantine_dir.iterdir():
                if not path.name.startswith(".") and path.suffix != ".json":
                    quarantined += path.stat().st_size
        except OSError:
            pass
        yield GaugeMetricFamily("tts_provisioner_quarantine_bytes",
                                "Bytes kept in quarantine/ (files that failed verification)", value=quarantined)
        try:
            usage = shutil.disk_usage(self.cache_dir)
        except OSError:
            return
        yield GaugeMetricFamily("tts_provisioner_cache_free_bytes", "Free bytes on the cache's filesystem "
                                "(for the tts user)", value=usage.free)
        yield GaugeMetricFamily("tts_provisioner_cache_size_bytes", "Size of the cache's filesystem",
                                value=usage.total)

    def _daemon(self) -> Iterator:
        s = self.status
        yield GaugeMetricFamily("tts_provisioner_ready", "1 when every model has a complete current snapshot",
                                value=1.0 if s.ready else 0.0)
        yield CounterMetricFamily("tts_provisioner_sync_passes", "Sync passes finished", value=s.syncs_completed)
        if s.p2p is not None:
            yield CounterMetricFamily("tts_provisioner_uploaded_bytes", "Bytes sent to peers (all models)",
                                      value=s.p2p.get("uploaded", 0))
            yield GaugeMetricFamily("tts_provisioner_seeding_files", "Blobs being seeded to peers",
                                    value=s.p2p.get("seeding", 0))
        expiry = GaugeMetricFamily("tts_provisioner_trusted_metadata_expiry_timestamp_seconds",
                                   "When the trusted update metadata of each role expires (status.json "
                                   "trust.expires)", labels=["role"])
        for role, when in sorted(((s.trust or {}).get("expires") or {}).items()):
            if (seconds := _unix_seconds(when)) is not None:
                expiry.add_metric([role], seconds)
        yield expiry


def _unix_seconds(value) -> float | None:
    """An expiry from the status document: ISO 8601 (the trust client's) or unix seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def registry_for(status: ProvisionerStatus, config: ProvisionerConfig) -> CollectorRegistry:
    """The daemon's registry: its collector and the process metrics."""
    registry = CollectorRegistry()
    registry.register(ProvisionerCollector(status, config))
    process_collector(registry)
    return registry
