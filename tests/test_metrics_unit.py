"""In-process checks of issue 28's pieces: the failure causes the provisioner counts, its
collector over a status document and a cache, and the journal priority prefix."""

from __future__ import annotations

import logging
import os
import sys

import pytest
from prometheus_client import generate_latest

from mirror.remote import MirrorError, describe
from provisioner.download import DiskSpaceError, DownloadError
from provisioner.metrics import FAILURE_CAUSES, failure_cause, registry_for
from provisioner.mirrors import ManifestRejected, NotFoundOnMirror
from provisioner.status import ProvisionerStatus
from tts_common import logs

pytestmark = pytest.mark.unit


def test_failure_causes_from_the_errors_the_provisioner_raises():
    from botocore.exceptions import ClientError, EndpointConnectionError

    denied = ClientError({"Error": {"Code": "InvalidAccessKeyId"}}, "GetObject")
    cases = {
        "credentials": MirrorError("cannot resolve channel joe/stable: mirror a: reading x: "
                                   + describe(denied, "http://m:9000", "b")),
        "unreachable": MirrorError("cannot resolve channel joe/stable: mirror a is unreachable: ConnectTimeoutError"),
        "not_found": NotFoundOnMirror("version joe/9.9.9 has no manifest on any mirror"),
        "manifest_rejected": ManifestRejected("signature does not verify"),
        "download": DownloadError("joe/1.0.0: checksum mismatch ..."),
        "disk_full": DiskSpaceError("not enough disk space"),
        "mirror": MirrorError("S3 error from http://m (HTTP 500 InternalError)"),
        "io": PermissionError(13, "Permission denied"),
        "internal": KeyError("bug"),
    }
    for cause, exc in cases.items():
        assert failure_cause(exc) == cause, (cause, exc)
        assert cause in FAILURE_CAUSES
    assert failure_cause(MirrorError(describe(EndpointConnectionError(endpoint_url="http://m"), "http://m"))) \
        == "unreachable"


def test_collector_reads_the_status_document_and_the_cache(tmp_path):
    from provisioner.config import ProvisionerConfig
    from provisioner.hold import Hold, write_hold

    config = ProvisionerConfig.model_validate({
        "cache_dir": str(tmp_path / "cache"), "runtime_dir": str(tmp_path / "run"), "require_signature": False,
        "mirrors": [{"name": "a", "endpoint": "http://m:9000", "bucket": "b", "credentials_file": "/c.toml"}],
        "models": [{"name": "joe", "channel": "stable"}, {"name": "amy", "version": "2.0.0"}]})
    (tmp_path / "cache/quarantine").mkdir(parents=True)
    (tmp_path / "cache/quarantine" / ("a" * 64)).write_bytes(b"x" * 1000)
    (tmp_path / "cache/quarantine/known-bad.json").write_text("{}")
    write_hold(tmp_path / "cache", "joe", Hold("1.0.0", "1.1.0"))
    # trust as the update-trust work (branch r27-tuf) writes it: ISO 8601 expiries per role
    trust = {"timestamp_version": 42, "expires": {"timestamp": "2026-01-01T00:00:00+00:00", "root": "bad date"}}
    status = ProvisionerStatus(ready=True, syncs_completed=4, trust=trust,
                               p2p={"from_peers": 1, "from_mirror": 2, "uploaded": 30, "seeding": 2})
    joe = status.model("joe")
    joe.wanted_version, joe.current_version, joe.state = "1.0.0", "1.0.0", "ok"
    joe.failures, joe.verify_failures, joe.fetched = {"unreachable": 2}, 1, {"mirror": 10, "peers": 90}
    status.model("amy").state = "error"
    text = generate_latest(registry_for(status, config)).decode()
    for line in ['tts_provisioner_model_wanted_info{model="joe",version="1.0.0"} 1.0',
                 'tts_provisioner_rollback_held{model="joe"} 1.0', 'tts_provisioner_rollback_held{model="amy"} 0.0',
                 'tts_provisioner_model_state{model="amy",state="error"} 1.0',
                 'tts_provisioner_sync_failures_total{cause="unreachable",model="joe"} 2.0',
                 'tts_provisioner_sync_failures_total{cause="disk_full",model="amy"} 0.0',
                 'tts_provisioner_verification_failures_total{model="joe"} 1.0',
                 'tts_provisioner_fetched_bytes_total{model="joe",source="peers"} 90.0',
                 "tts_provisioner_quarantine_bytes 1000.0", "tts_provisioner_uploaded_bytes_total 30.0",
                 'tts_provisioner_trusted_metadata_expiry_timestamp_seconds{role="timestamp"} 1.7672256e+09',
                 # (an expiry that does not parse is left out, not a scrape error)
                 "tts_provisioner_sync_passes_total 4.0", "tts_provisioner_ready 1.0"]:
        assert line in text, line
    assert 'model_wanted_info{model="amy"' not in text  # nothing wanted yet: no series
    assert 'expiry_timestamp_seconds{role="root"}' not in text
    # process_* works under ProcSubset=pid too (boot time from CLOCK_BOOTTIME).
    assert "process_start_time_seconds" in text


def test_journal_prefix_only_when_stderr_is_the_journal(monkeypatch, capfd):
    assert [logs.journal_priority(level) for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR,
                                                        logging.CRITICAL)] == [7, 6, 4, 3, 2]
    st = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert logs.stderr_is_journal() and logs.journal_prefix(logging.ERROR) == "<3>"
    formatter = logs._JournalPrefix(logging.Formatter("%(message)s"))
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "first\nsecond", None, None)
    assert formatter.format(record) == "<4>first\n<4>second"
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")  # another stream: a child redirected
    assert not logs.stderr_is_journal() and logs.journal_prefix(logging.ERROR) == ""


def test_status_pointers_name_alerts_and_metrics_that_exist():
    """tts-ctl status points at an alert of the shipped rules and a metric a daemon exports."""
    from pathlib import Path

    from runtime.alerts import POINTERS, diagnose

    repo = Path(__file__).resolve().parent.parent
    rules = (repo / "ansible/roles/tts_node/templates/tts-fleet.rules.yml.j2").read_text()
    sources = "".join((repo / p).read_text() for p in ("provisioner/metrics.py", "runtime/api/metrics.py",
                                                        "tts_common/metrics_server.py"))
    for what, (alert, metric) in POINTERS.items():
        assert f"- alert: {alert}\n" in rules, (what, alert)
        for name in metric.replace(" ", "").split(","):
            base = name.split("{")[0].removesuffix("_total").removesuffix("_info")
            assert base == "up" or base == "process_start_time_seconds" or f'"{base}' in sources, (what, name)
    prov = {"state": "error", "models": {"joe": {"state": "error", "wanted_version": "2.0.1"}}}
    rt = {"ready": True, "worker_alive": True, "queue": {"depth": 64, "capacity": 64},
          "models": {"joe": {"loaded": True, "version": "1.0.0", "last_error": "loading joe 2.0.1 failed: ..."}}}
    assert [(w, m, a) for w, m, a, _ in diagnose(prov, rt)] == [
        ("sync failed", "joe", "TtsSyncFailing"), ("queue full", "-", "TtsQueueFull"),
        ("voice does not load", "joe", "TtsVoiceLoadFailed")]
    assert diagnose({"state": "idle", "models": {"joe": {"state": "ok", "wanted_version": "1.0.0"}}},
                    {"ready": True, "worker_alive": True, "models": {"joe": {"loaded": True, "version": "1.0.0"}}}) == []
