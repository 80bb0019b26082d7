"""The daemons' metrics on their metrics-only Unix sockets, with real daemons (issue 28).

- the metrics socket serves GET /metrics and nothing else, gzip when asked, replaces a
  stale socket file and refuses to take over a live one;
- the provisioner (real daemon, real aria2c and S3 server): versions as info metrics,
  last success, fetched bytes from the mirror, snapshots, cache free space; a mirror that
  cannot be reached is counted as a sync failure with cause "unreachable"; a rollback
  hold shows;
- the runtime (real server, real voice): per-voice version, time to first audio, queue
  wait and real-time factor after requests, the queue's capacity; a version that does not
  load sets tts_voice_load_failed while the old version keeps serving.
"""

from __future__ import annotations

import gzip
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from tests.provisioner_helpers import BIN, run_cli, stop
from tts_testkit.provisioner_setup import make_keys, model_files, publish_raw, set_channel, wait_status, write_config
from tts_testkit.runtime_server import publish_to_cache, start_server, voice_bundle_dir
from tts_common.metrics_server import MetricsServer, MetricsSocketError

pytestmark = pytest.mark.integration

SIZES = {"model.safetensors": 1_500_000, "voice.json": 1_000}


def scrape(path: Path, timeout: float = 10.0) -> dict[tuple[str, tuple], float]:
    """Every sample of GET /metrics on a Unix socket: {(name, sorted labels): value}."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://metrics", timeout=timeout) as c:
        resp = c.get("/metrics")
    assert resp.status_code == 200, resp.text
    samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels) -> float | None:
    want = tuple(sorted(labels.items()))
    return samples.get((name, want))


def series(samples: dict, name: str) -> dict[tuple, float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


# -- the socket server ------------------------------------------------------------------

def test_metrics_socket_serves_only_metrics_and_replaces_a_stale_socket(tmp_path):
    registry = CollectorRegistry()
    Counter("demo_things", "Things", registry=registry).inc(3)
    path = tmp_path / "m.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: what a crash leaves
    server = MetricsServer(path, registry).start()
    try:
        assert oct(path.stat().st_mode & 0o777) == oct(0o660)
        assert value(scrape(path), "demo_things_total") == 3.0
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://m", timeout=10) as c:
            assert c.get("/v1/synthesize").status_code == 404
            assert c.post("/metrics").status_code == 501
            raw = c.get("/metrics", headers={"Accept-Encoding": "gzip"})
            assert raw.headers["content-encoding"] == "gzip" and b"demo_things_total 3.0" in raw.content
        with pytest.raises(MetricsSocketError, match="another process serves metrics"):
            MetricsServer(path, registry).start()
    finally:
        server.stop()
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(MetricsSocketError, match="not a socket"):
        MetricsServer(path, registry).start()


# -- the provisioner ---------------------------------------------------------------------

@pytest.fixture
def provisioner(tmp_path, s3_server, bucket):
    keys = make_keys(tmp_path)
    creds = s3_server.write_credentials(tmp_path / "creds.toml")
    mirror = dict(name="primary", endpoint=s3_server.endpoint, bucket=bucket, credentials_file=creds)
    sock = tmp_path / "run" / "metrics.sock"
    config = write_config(tmp_path, [mirror], keys, extra=f'metrics_socket = "{sock}"')
    config.write_text(config.read_text().replace("poll_interval = 1", "poll_interval = 3600"))
    client = s3_server.client()
    publish_raw(client, bucket, "joe", "1.0.0", model_files(1, SIZES), keys, channel="stable")
    publish_raw(client, bucket, "joe", "0.9.0", model_files(2, SIZES), keys, channel=None)
    ctx = dict(tmp=tmp_path, config=config, sock=sock, client=client, bucket=bucket, keys=keys, mirror=mirror,
               status=tmp_path / "run" / "status.json", procs=[])

    def start():
        proc = subprocess.Popen([str(BIN / "tts-provisioner"), "--config", str(config), "run"],
                                stderr=subprocess.PIPE, text=True, env=dict(os.environ, TTS_LOG_FORMAT="json"))
        ctx["procs"].append(proc)
        return proc

    ctx["start"] = start
    try:
        yield ctx
    finally:
        for proc in ctx["procs"]:
            stop(proc)


def test_provisioner_metrics_after_a_sync_a_hold_and_an_unreachable_mirror(provisioner):
    p = provisioner
    proc = p["start"]()
    wait_status(p["status"], lambda s: s.get("pid") == proc.pid and s.get("ready"), proc=proc)
    before = time.time()
    m = scrape(p["sock"])
    assert value(m, "tts_provisioner_model_wanted_info", model="joe", version="1.0.0") == 1.0
    assert value(m, "tts_provisioner_model_current_info", model="joe", version="1.0.0") == 1.0
    assert value(m, "tts_provisioner_model_state", model="joe", state="ok") == 1.0
    assert value(m, "tts_provisioner_ready") == 1.0
    assert 0 < value(m, "tts_provisioner_last_success_timestamp_seconds", model="joe") <= before
    # Every byte of the model came from the mirror (sparse partials: at least the sizes).
    assert value(m, "tts_provisioner_fetched_bytes_total", model="joe", source="mirror") >= sum(SIZES.values())
    assert value(m, "tts_provisioner_fetched_bytes_total", model="joe", source="peers") == 0
    # Every cause is there from the start, at 0, so increase() sees the first failure.
    assert set(series(m, "tts_provisioner_sync_failures_total").values()) == {0.0}
    assert len(series(m, "tts_provisioner_sync_failures_total")) == 11
    assert value(m, "tts_provisioner_snapshots", model="joe") == 1
    assert value(m, "tts_provisioner_rollback_held", model="joe") == 0
    assert value(m, "tts_provisioner_cache_free_bytes") > 0
    assert value(m, "tts_provisioner_cache_size_bytes") >= value(m, "tts_provisioner_cache_free_bytes")
    assert value(m, "process_start_time_seconds") > 0

    # A hold: sync 0.9.0 by pinning nothing - roll back needs a kept snapshot, so first
    # make 0.9.0 the channel's and sync, then back to 1.0.0, then roll back to 0.9.0.
    set_channel(p["client"], p["bucket"], "joe", "stable", "0.9.0")
    assert run_cli("sync", config=p["config"], timeout=120).returncode == 0
    set_channel(p["client"], p["bucket"], "joe", "stable", "1.0.0")
    assert run_cli("sync", config=p["config"], timeout=120).returncode == 0
    result = run_cli("rollback", "joe", "0.9.0", config=p["config"], timeout=120)
    assert result.returncode == 0, result.stderr
    m = scrape(p["sock"])
    assert value(m, "tts_provisioner_rollback_held", model="joe") == 1
    assert value(m, "tts_provisioner_snapshots", model="joe") == 2
    assert value(m, "tts_provisioner_model_current_info", model="joe", version="0.9.0") == 1.0

    # The mirror unreachable (a port nobody listens on): a failure with its cause.
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert not p["sock"].exists()
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    p["config"].write_text(p["config"].read_text().replace(p["mirror"]["endpoint"], f"http://127.0.0.1:{port}"))
    proc = p["start"]()
    wait_status(p["status"], lambda s: s.get("pid") == proc.pid and s.get("syncs_completed", 0) >= 1, proc=proc)
    m = scrape(p["sock"])
    assert value(m, "tts_provisioner_sync_failures_total", model="joe", cause="unreachable") == 1, \
        series(m, "tts_provisioner_sync_failures_total")
    assert value(m, "tts_provisioner_model_state", model="joe", state="error") == 1.0
    # Still serving the held version; no success since this daemon started.
    assert value(m, "tts_provisioner_model_current_info", model="joe", version="0.9.0") == 1.0
    assert value(m, "tts_provisioner_last_success_timestamp_seconds", model="joe") is None


# -- the runtime -------------------------------------------------------------------------

def test_runtime_metrics_socket_versions_latencies_and_a_failed_load(tmp_path, voice_cache):  # noqa: F811
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(voice_cache, cache, symlinks=True)
    sock = tmp_path / "metrics.sock"
    srv = start_server(tmp_path / "srv", cache, metrics_socket=str(sock))
    try:
        srv.wait_ready()
        m = scrape(sock)
        assert value(m, "tts_voice_info", voice="joe", version="1.0.0", device="cpu") == 1.0
        assert value(m, "tts_ready") == 1.0
        assert value(m, "tts_queue_capacity") > 0
        assert value(m, "tts_voice_load_failed", voice="joe") == 0.0
        with srv.client() as c:
            assert c.post("/v1/synthesize", json={"text": "Metrics for a whole answer."}).status_code == 200
            with c.stream("POST", "/v1/synthesize", json={"text": "One. Two, streamed.", "stream": True}) as r:
                assert r.status_code == 200
                r.read()
        m = scrape(sock)
        assert value(m, "tts_time_to_first_audio_seconds_count", voice="joe") == 2
        assert value(m, "tts_queue_wait_seconds_count") == 2
        assert value(m, "tts_real_time_factor_ratio_count", voice="joe") == 2
        assert value(m, "tts_real_time_factor_ratio_sum", voice="joe") > 0
        # The API socket still has /metrics too (the same registry).
        assert srv.metric("tts_time_to_first_audio_seconds_count", voice="joe") == 2
        assert value(m, "tts_oom_splits_total", voice="joe") == 0
        assert value(m, "tts_cpu_fallbacks_total", voice="joe") == 0
        assert value(m, "tts_overtakes_total") is not None

        # A version that does not load: the old one keeps serving, the gauge says so.
        bundle = tmp_path / "broken"
        shutil.copytree(voice_bundle_dir(tmp_path), bundle)
        weights = bundle / "model.safetensors"
        weights.write_bytes(b"\0" * weights.stat().st_size)
        publish_to_cache(cache, "joe", "2.0.0", bundle)
        with srv.client() as c:
            assert c.post("/v1/reload").status_code == 200
        m = scrape(sock)
        assert value(m, "tts_voice_load_failed", voice="joe") == 1.0
        # at least one: a failed version is tried again at every filesystem event in the cache
        assert value(m, "tts_voice_load_failures_total", voice="joe") >= 1.0
        assert value(m, "tts_voice_info", voice="joe", version="1.0.0", device="cpu") == 1.0
        # current back at what serves (a rollback): nothing failing any more.
        from provisioner.cache import CacheWriter

        CacheWriter(cache).set_current("joe", "1.0.0")
        with srv.client() as c:
            assert c.post("/v1/reload").status_code == 200
        assert value(scrape(sock), "tts_voice_load_failed", voice="joe") == 0.0
    finally:
        srv.stop()
    assert not sock.exists()
