"""Peer-to-peer distribution: real provisioner daemons, a real aria2c each, a real
opentracker, a real S3 server (both of the matrix), on 127.0.0.1.

Every node reaches the mirror through its own counting proxy, so mirror egress is
measured at the mirror's side of each node, not taken from the nodes' own claims.
Nothing here waits for a speed: nodes that must not use the mirror get a stall window
(300 s) no test reaches, and the one test of the fallback has no peer at all.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlparse

import pytest

from mirror import layout
from mirror.publish import publish_dir
from mirror.remote import Mirror
from provisioner.cache import CacheReader
from provisioner.p2p import rank
from tests.cut_proxy import CuttingProxy
from tests.provisioner_helpers import BIN, wait_status
from tts_testkit.provisioner_setup import make_keys, write_config
from tts_testkit.s3servers import free_port
from tts_testkit.tracker import OPENTRACKER, run_tracker

pytestmark = [pytest.mark.integration, pytest.mark.skipif(OPENTRACKER is None, reason="opentracker missing: run scripts/setup.sh (Debian package opentracker)")]

MiB = 1024 * 1024
FLEET = ["node-a", "node-b", "node-c"]
NEVER = 300  # stall_seconds no test waits for


def publish_model(tmp: Path, s3_server, bucket: str, keys, name: str = "joe") -> dict[str, dict]:
    model = tmp / f"model-{name}"
    model.mkdir()
    (model / "model.bin").write_bytes(os.urandom(6 * MiB + 123))
    (model / "config.json").write_text('{"sample_rate": 22050}\n')
    mirror = Mirror.connect(s3_server.endpoint, bucket, s3_server.credentials)
    publish_dir(model, name=name, version="1.0", mirror=mirror, signing_key=keys.private, channel="stable")
    return {f.path: f for f in mirror.manifest(name, "1.0")[0].files}


def node_config(root: Path, s3_server, bucket, keys, proxy_port: int, tracker_url: str, node: str,
                stall: float, fleet: list[str] = FLEET, model: str = "joe") -> Path:
    root.mkdir()
    creds = s3_server.write_credentials(root / "creds.toml")
    mirror = dict(name="primary", endpoint=f"http://127.0.0.1:{proxy_port}", bucket=bucket, credentials_file=creds)
    p2p = (f'[p2p]\nenabled = true\ntrackers = ["{tracker_url}"]\nlisten_port = {free_port()}\n'
           f'node_id = "{node}"\nfleet = {json.dumps(fleet)}\nstall_seconds = {stall}\nupload_limit = "0"\n')
    config = write_config(root, [mirror], keys, models=f'name = "{model}"\nchannel = "stable"', extra=p2p)
    config.write_text(config.read_text().replace("poll_interval = 1", "poll_interval = 3600"))
    return config


def start_daemon(config: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "tts-provisioner"), "--config", str(config), "run"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, TTS_LOG_FORMAT="json"))


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def ready(proc: subprocess.Popen):
    return lambda s: s.get("pid") == proc.pid and s.get("ready")


def run_until(config: Path, condition=None) -> tuple[dict, str]:
    """Start a daemon, wait until it is ready (and `condition`), stop it: (status, stderr)."""
    proc = start_daemon(config)
    try:
        status = wait_status(config.parent / "run/status.json",
                             lambda s: ready(proc)(s) and (condition is None or condition(s)), 180, proc)
    finally:
        err = stop(proc)
    return status, err


def swap_torrent(s3_server, bucket: str, victim, donor) -> bytes:
    """Put `donor`'s torrent on the mirror in place of `victim`'s; returns victim's own."""
    client = s3_server.client()
    own = client.get_object(Bucket=bucket, Key=layout.torrent_key(victim.sha256))["Body"].read()
    other = client.get_object(Bucket=bucket, Key=layout.torrent_key(donor.sha256))["Body"].read()
    client.put_object(Bucket=bucket, Key=layout.torrent_key(victim.sha256), Body=other)
    return own


def counting_proxy(s3_server) -> CuttingProxy:
    # Never cuts, no rate limit: it only counts the bytes the mirror sends this node.
    return CuttingProxy(urlparse(s3_server.endpoint).port, cut_after=1 << 62, rate=1e12)


def test_a_fleet_pulls_a_model_while_the_mirror_sends_it_once(tmp_path, s3_server, bucket) -> None:
    keys = make_keys(tmp_path)
    files = publish_model(tmp_path, s3_server, bucket, keys)
    total = sum(f.size for f in files.values())
    first = {path: min(FLEET, key=lambda n: rank(n, FLEET, f.sha256)) for path, f in files.items()}
    with ExitStack() as stack:
        tracker = stack.enter_context(run_tracker())
        tracker.allow(sorted(f.btih for f in files.values()))
        proxies = {n: stack.enter_context(counting_proxy(s3_server)) for n in FLEET}
        configs = {n: node_config(tmp_path / n, s3_server, bucket, keys, proxies[n].port, tracker.url, n, NEVER)
                   for n in FLEET}
        procs = {n: start_daemon(configs[n]) for n in FLEET}
        try:
            status = {n: wait_status(tmp_path / n / "run/status.json", ready(procs[n]), 180, procs[n]) for n in FLEET}
            # Every node holds the model; what the seeds sent shows in the totals the
            # daemons refresh every few seconds: at least the two copies peers fetched.
            uploaded = 0
            for _ in range(300):
                status = {n: json.loads((tmp_path / n / "run/status.json").read_text()) for n in FLEET}
                uploaded = sum(s["p2p"]["uploaded"] for s in status.values())
                if uploaded >= 2 * total:
                    break
                time.sleep(0.2)
        finally:
            logs = {n: stop(p) for n, p in procs.items()}

    for n in FLEET:
        cache = CacheReader(tmp_path / n / "cache")
        snap = cache.current("joe")
        assert snap is not None and snap.version == "1.0", logs[n][-2000:]
        assert cache.check_snapshot(snap, full_hash=True) == []
    # Each file went out of the mirror's data path once, to the node ranked first for it;
    # the others got it from peers (what their proxies passed is small metadata reads).
    # The first node's web seed may be sent more than the file: aria2 drops an HTTP
    # connection once a piece is complete, and what was in flight (at most its 1 MiB
    # receive buffer per connection, 4 connections here) still left the mirror.
    metadata = 64 * 1024
    in_flight = 4 * (MiB + 256 * 1024)
    for n in FLEET:
        web_seeded = sum(f.size for path, f in files.items() if first[path] == n)
        allowed = web_seeded + in_flight + metadata if web_seeded else metadata
        assert proxies[n].bytes_down <= allowed, (n, proxies[n].bytes_down, web_seeded)
        p2p = status[n]["p2p"]
        assert p2p["from_peers"] + p2p["from_mirror"] == total, p2p
        if web_seeded == 0:
            assert p2p["from_mirror"] == 0 and p2p["from_peers"] == total, p2p
        assert p2p["seeding"] == len(files), p2p
    egress = sum(p.bytes_down for p in proxies.values())
    assert total <= egress <= total + len(files) * in_flight + 3 * metadata, (egress, total)
    assert uploaded >= 2 * total, uploaded


def test_seeding_resumes_after_a_restart_without_the_mirror(tmp_path, s3_server, bucket) -> None:
    keys = make_keys(tmp_path)
    files = publish_model(tmp_path, s3_server, bucket, keys)
    with run_tracker() as tracker, counting_proxy(s3_server) as proxy:
        tracker.allow(sorted(f.btih for f in files.values()))
        config = node_config(tmp_path / "solo", s3_server, bucket, keys, proxy.port, tracker.url, "solo", 0.5,
                             fleet=["solo"])
        run_until(config)
        fetched = proxy.bytes_down
        assert fetched >= sum(f.size for f in files.values())
        again, _ = run_until(config, lambda s: (s.get("p2p") or {}).get("seeding") == 2)
        # The torrents are kept in the cache: seeding again needed no model bytes.
        assert proxy.bytes_down - fetched < 64 * 1024
        assert again["p2p"]["seeding"] == 2
        assert sorted(p.name for p in (tmp_path / "solo/cache/torrents").iterdir()) == sorted(
            f"{f.sha256}.torrent" for f in files.values())


def test_with_no_peer_a_node_falls_back_to_the_mirror(tmp_path, s3_server, bucket) -> None:
    keys = make_keys(tmp_path)
    files = publish_model(tmp_path, s3_server, bucket, keys)
    big = files["model.bin"]
    fleet = ["first", "second"]
    # This node is not the one ranked to web-seed the big file, and no peer ever shows up.
    node = max(fleet, key=lambda n: rank(n, fleet, big.sha256))
    assert rank(node, fleet, big.sha256) == 1
    with run_tracker() as tracker, counting_proxy(s3_server) as proxy:
        tracker.allow(sorted(f.btih for f in files.values()))
        config = node_config(tmp_path / node, s3_server, bucket, keys, proxy.port, tracker.url, node, 1.0, fleet)
        status, err = run_until(config)
    assert "no progress from peers: adding the mirror" in err
    assert status["p2p"]["from_mirror"] > 0
    assert proxy.bytes_down >= big.size


def test_a_swapped_torrent_is_refused_and_the_file_comes_over_http(tmp_path, s3_server, bucket) -> None:
    keys = make_keys(tmp_path)
    files = publish_model(tmp_path, s3_server, bucket, keys)
    big, small = files["model.bin"], files["config.json"]
    swap_torrent(s3_server, bucket, big, small)
    with run_tracker() as tracker, counting_proxy(s3_server) as proxy:
        tracker.allow(sorted(f.btih for f in files.values()))
        config = node_config(tmp_path / "solo", s3_server, bucket, keys, proxy.port, tracker.url, "solo", 0.5,
                             fleet=["solo"])
        status, err = run_until(config)
    assert "no usable torrent" in err and big.sha256 in err
    cache = CacheReader(tmp_path / "solo/cache")
    assert cache.check_snapshot(cache.current("joe"), full_hash=True) == []
    assert not (tmp_path / "solo/cache/torrents" / f"{big.sha256}.torrent").exists()
    assert status["p2p"]["seeding"] == 1  # only the file whose torrent checked out


def test_a_taken_listen_port_is_a_clear_error_at_start(tmp_path) -> None:
    """Another process listens on [p2p] listen_port: `tts-provisioner run` exits 1 at
    once with one line naming the port - not a daemon whose every torrent fails later
    (aria2 binds the port only when it adds a torrent). No mirror is contacted."""
    import socket

    keys = make_keys(tmp_path)
    creds = tmp_path / "creds.toml"
    creds.write_text('access_key = "AK"\nsecret_key = "not-a-real-secret"\n')
    mirror = dict(name="primary", endpoint="http://127.0.0.1:9", bucket="b", credentials_file=creds)
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p2p = (f'[p2p]\nenabled = true\ntrackers = ["http://127.0.0.1:9/announce"]\nlisten_port = {port}\n'
               f'node_id = "solo"\nfleet = ["solo"]\n')
        (tmp_path / "node").mkdir()
        config = write_config(tmp_path / "node", [mirror], keys, extra=p2p)
        out = subprocess.run([str(BIN / "tts-provisioner"), "--config", str(config), "run"], capture_output=True,
                             text=True, timeout=120)
    assert out.returncode == 1, (out.returncode, out.stderr[-2000:])
    assert f"[p2p] listen_port {port} is in use by another process" in out.stderr, out.stderr[-2000:]


def test_a_blob_kept_from_an_earlier_version_is_seeded_under_the_new_one(tmp_path, s3_server, bucket) -> None:
    keys = make_keys(tmp_path)
    files = publish_model(tmp_path, s3_server, bucket, keys)
    big, small = files["model.bin"], files["config.json"]
    # Version 1.0's big file comes over HTTP only (its torrent is unusable), so no torrent is kept for it.
    good = swap_torrent(s3_server, bucket, big, small)
    with run_tracker() as tracker, counting_proxy(s3_server) as proxy:
        config = node_config(tmp_path / "solo", s3_server, bucket, keys, proxy.port, tracker.url, "solo", 0.5,
                             fleet=["solo"])
        tracker.allow(sorted(f.btih for f in files.values()))
        first, _ = run_until(config, lambda s: (s.get("p2p") or {}).get("seeding") == 1)
        assert first["p2p"]["seeding"] == 1
        # 2.0 keeps model.bin and changes config.json; the mirror's torrent is right again.
        s3_server.client().put_object(Bucket=bucket, Key=layout.torrent_key(big.sha256), Body=good)
        (tmp_path / "model-joe/config.json").write_text('{"sample_rate": 16000}\n')
        mirror = Mirror.connect(s3_server.endpoint, bucket, s3_server.credentials)
        publish_dir(tmp_path / "model-joe", name="joe", version="2.0", mirror=mirror, signing_key=keys.private,
                    channel="stable")
        v2 = {f.path: f for f in mirror.manifest("joe", "2.0")[0].files}
        assert v2["model.bin"].sha256 == big.sha256
        tracker.allow(sorted({f.btih for f in [*files.values(), *v2.values()]}))
        fetched = proxy.bytes_down
        second, err = run_until(config, lambda s: (s.get("p2p") or {}).get("seeding") == 3)
    # model.bin was not fetched again (only its torrent and the new config), and is seeded now:
    # both configs and model.bin
    assert proxy.bytes_down - fetched < big.size // 4, err[-2000:]
    assert second["p2p"]["seeding"] == 3
    assert (tmp_path / "solo/cache/torrents" / f"{big.sha256}.torrent").is_file()
