"""A real Prometheus (Debian's) scraping a simulated fleet, its alerts and the dashboard (issue 28).

The fleet harness (tts_testkit/fleet/harness.py) boots 3 nodes (systemd-nspawn containers,
systemd as PID 1); site.yml installs them with the
metrics relays bound to each node's address; monitoring.yml renders the scrape targets,
the alert rules (every `for:` shortened to seconds by the role's tts_node_alert_for, not by
waiting longer) and the dashboard; Prometheus runs on the controller (the bridge's
address) and scrapes every node over TCP every second.

1. Healthy: every target is up, no alert is pending or firing, and every dashboard panel's
   expression returns data (Grafana does not install here: the expressions are what a
   panel would ask).
2. Faults: node01 is cut off from the mirror (an iptables REJECT in its namespace) and
   asked to sync; node02's provisioner is pinned to a version whose weights do not load.
   Prometheus's own /api/v1/alerts then shows TtsSyncFailing for node01 (cause
   unreachable) and TtsVoiceLoadFailed for node02, and nothing on node03.

Every wait is for a condition (alerts, targets, query results), bounded as a safety net.
"""

from __future__ import annotations

import json
import re
import socket
import time

import pytest

from tts_testkit.fleet import harness
from tts_testkit.fleet import rollout as fr
from tts_testkit.wheel import build_wheel
from tests.monitoring_helpers import PROMETHEUS, Prometheus, render_monitoring

REASON = harness.unavailable()
pytestmark = [
    pytest.mark.fleet,
    pytest.mark.skipif(REASON is not None, reason=f"fleet harness unavailable: {REASON}"),
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus missing: run scripts/setup.sh (Debian package prometheus)"),
    pytest.mark.skipif(not (harness.VENV / "bin/ansible-playbook").exists(), reason="ansible is not installed"),
]
NODES = 3
# Seconds instead of minutes: the test's setting of the role's `for:` durations (all of them).
SHORT_FOR = {key: "5s" for key in ("sync_failing", "version_mismatch", "runtime_not_ready", "voice_load_failed",
                                    "target_down", "errors_5xx", "queue_full", "cache_disk_full", "trust_expiring",
                                    "restarts", "mirror_instead_of_peers", "rollback_held")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    from tts_testkit.provisioner_setup import make_keys

    work = tmp_path_factory.mktemp("prom-fleet")
    wheel = build_wheel(work / "wheel")
    with harness.Fleet(work, NODES) as fleet:
        (work / "keys").mkdir()
        keys = make_keys(work / "keys")
        bucket = fleet.mirror.server.new_bucket()
        fr.publish(fleet, bucket, keys, "1.0.0", channel="stable")
        fr.publish(fleet, bucket, keys, "2.0.1", "broken")
        fleet.inventory(fr.group_vars(fleet, bucket, keys, wheel,
                                      tts_node_metrics_listen_address="{{ ansible_host }}",
                                      # Prometheus scrapes from the controller's bridge address
                                      tts_node_prometheus_networks=[f"{fleet.subnet}.1"]))
        site = fleet.playbook("site.yml", log="site.log")
        assert site.returncode == 0, site.stdout[-6000:]
        monitoring = render_monitoring(work / "monitoring", {n.name: n.address for n in fleet.nodes},
                                       tts_node_alert_for=SHORT_FOR, tts_node_alert_rate_window="1m",
                                       tts_node_alert_restart_window="5m")
        (work / "prometheus").mkdir()
        prometheus = Prometheus(work / "prometheus", monitoring, free_port()).start()
        try:
            yield fleet, prometheus, monitoring
        finally:
            prometheus.stop()


def wait_for(what: str, predicate, timeout: float = 180, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


def active(prometheus: Prometheus) -> list[dict]:
    return [a for a in prometheus.alerts() if a["state"] in {"pending", "firing"}]


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expression) of every target, Grafana's variables filled in as a
    dashboard showing all nodes would."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$node", ".*").replace("$__rate_interval", "1m")
            out.append((panel["title"], expr))
    return out


def test_healthy_fleet_all_targets_up_no_alert_and_every_panel_has_data(observed):
    fleet, prometheus, monitoring = observed
    wait_for("every target up", lambda: len(prometheus.query("up == 1")) == 2 * NODES
             or None, timeout=120)
    # Traffic, so the request, latency and RTF panels have something to show.
    for node in fleet.nodes:
        node.sh("for i in 1 2 3; do /opt/tts-fleet/venv/bin/tts-ctl --config /etc/tts-fleet/runtime.toml synth "
                "'Observed by Prometheus.' -o /var/tmp/p.wav; done", timeout=300)
    dashboard = json.loads(monitoring.dashboard.read_text())
    queries = panel_queries(dashboard)
    assert len(queries) >= 16

    def empty_panels():
        missing = [(title, expr) for title, expr in queries if not prometheus.query(expr)]
        return missing or None

    # rate() needs two scrapes of the counters after the requests: wait until no panel is empty.
    deadline = time.monotonic() + 120
    missing = empty_panels()
    while missing and time.monotonic() < deadline:
        time.sleep(1)
        missing = empty_panels()
    assert not missing, f"panels without data: {missing}"
    versions = prometheus.query('tts_voice_info{voice="joe"}')
    assert sorted((r["metric"]["node"], r["metric"]["version"]) for r in versions) == \
        [(n.name, "1.0.0") for n in fleet.nodes]
    # Healthy: the rules were evaluated every second meanwhile; nothing pending or firing.
    assert active(prometheus) == [], active(prometheus)


def test_faults_raise_their_alerts_on_their_nodes_only(observed):
    fleet, prometheus, _ = observed
    cut, broken, healthy = fleet.nodes
    fleet.mirror.block(cut)
    try:
        cut.systemctl("reload", "tts-provisioner.service")  # a pass now, not at the next poll
        conf = broken.path("/etc/tts-fleet/provisioner.toml")
        conf.write_text(re.sub(r'channel = "stable"', 'version = "2.0.1"', conf.read_text()))
        broken.systemctl("restart", "tts-provisioner.service")

        def both_firing():
            alerts = active(prometheus)
            found = {(a["labels"]["alertname"], a["labels"].get("node")): a for a in alerts if a["state"] == "firing"}
            if ("TtsSyncFailing", cut.name) in found and ("TtsVoiceLoadFailed", broken.name) in found:
                return found
            return None

        found = wait_for("TtsSyncFailing on the cut node and TtsVoiceLoadFailed on the broken one", both_firing,
                         timeout=300)
        alerts = active(prometheus)
        print("alerts:", json.dumps([{**a["labels"], "state": a["state"], "summary": a["annotations"]["summary"]}
                                     for a in alerts], indent=1))
        sync = found[("TtsSyncFailing", cut.name)]
        assert sync["labels"]["model"] == "joe"
        assert "cause: unreachable" in sync["annotations"]["summary"], sync
        load = found[("TtsVoiceLoadFailed", broken.name)]
        assert load["annotations"]["summary"] == f"{broken.name}: joe 2.0.1 does not load; the runtime keeps serving 1.0.0."
        # Nothing on the healthy node, and on the faulty nodes only what their fault explains.
        assert [a for a in alerts if a["labels"].get("node") == healthy.name] == []
        explained = {cut.name: {"TtsSyncFailing"}, broken.name: {"TtsVoiceLoadFailed", "TtsVersionMismatch"}}
        for a in alerts:
            assert a["labels"]["alertname"] in explained.get(a["labels"].get("node"), set()), a
    finally:
        fleet.mirror.block(cut, blocked=False)
