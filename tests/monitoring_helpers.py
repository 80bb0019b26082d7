"""The monitoring side as the role installs it: monitoring.yml run against this machine as
the Prometheus host (ansible_connection local), writing the rule file, the file_sd
targets and the dashboard into a work directory; and a real Prometheus (Debian's package)
started on them. Used by tests/test_alert_rules.py and tests/test_fleet.py (TestPrometheus)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
ANSIBLE_DIR = REPO / "ansible"
VENV_BIN = Path(sys.executable).parent
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")


@dataclass
class Monitoring:
    rules: Path  # the rendered rule file
    file_sd: Path  # <job>.yml target files
    dashboard: Path


def render_monitoring(work: Path, nodes: dict[str, str], **role_vars) -> Monitoring:
    """monitoring.yml for `nodes` ({inventory name: address}); role_vars override the role's
    defaults (ports, alert `for:` durations ...)."""
    out = work / "prometheus-files"
    variables = {
        "tts_node_prometheus_rules_dir": str(out / "rules"),
        "tts_node_prometheus_file_sd_dir": str(out / "file_sd"),
        "tts_node_prometheus_dashboard_dir": str(out / "dashboards"),
        "tts_node_prometheus_reload": False,
        **role_vars,
    }
    inventory = {
        "prometheus": {"hosts": {"prometheus-test": {"ansible_connection": "local", "ansible_become": False,
                                                     "ansible_python_interpreter": sys.executable}}},
        "tts_nodes": {"hosts": {name: {"ansible_host": address} for name, address in nodes.items()}},
    }
    work.mkdir(parents=True, exist_ok=True)
    (work / "monitoring-inventory.yml").write_text(yaml.safe_dump(inventory))
    (work / "monitoring-vars.yml").write_text(yaml.safe_dump(variables))
    env = dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"), ANSIBLE_LOCAL_TEMP=str(work / "ansible-tmp"),
               ANSIBLE_REMOTE_TEMP=str(work / "ansible-tmp"), ANSIBLE_NOCOLOR="1",
               PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    result = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(work / "monitoring-inventory.yml"),
                             "-e", f"@{work / 'monitoring-vars.yml'}", "monitoring.yml"],
                            cwd=ANSIBLE_DIR, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    return Monitoring(out / "rules/tts-fleet.rules.yml", out / "file_sd", out / "dashboards/tts-fleet-dashboard.json")


PROMETHEUS_CONFIG = """\
# Written by tests/monitoring_helpers.py: what docs/operations.md tells an operator to add.
global:
  scrape_interval: {scrape}
  evaluation_interval: {evaluation}
rule_files:
  - {rules}
scrape_configs:
  - job_name: tts-provisioner
    file_sd_configs:
      - files: [{file_sd}/tts-provisioner.yml]
  - job_name: tts-runtime
    file_sd_configs:
      - files: [{file_sd}/tts-runtime.yml]
"""


class Prometheus:
    """Debian's prometheus on 127.0.0.1:<port> with the role's files; its HTTP API."""

    def __init__(self, work: Path, monitoring: Monitoring, port: int, scrape: str = "1s", evaluation: str = "1s"):
        self.work, self.port = work, port
        self.config = work / "prometheus.yml"
        self.config.write_text(PROMETHEUS_CONFIG.format(scrape=scrape, evaluation=evaluation, rules=monitoring.rules,
                                                        file_sd=monitoring.file_sd))
        self.log = work / "prometheus.log"
        self.process: subprocess.Popen | None = None

    def start(self, wrap: tuple[str, ...] = (), preexec_fn=None) -> "Prometheus":
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [*wrap, PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={self.work / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle",
                 f"--web.console.templates={self.work}", f"--web.console.libraries={self.work}"],
                stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # safety net only: ready is a condition
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited {self.process.returncode}: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready in 60 s: {self.log.read_text()[-3000:]}")

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=30) as resp:
            doc = json.loads(resp.read())
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


# Seconds instead of minutes: a test's setting of the role's `for:` durations (all of them).
SHORT_FOR = {key: "5s" for key in ("sync_failing", "version_mismatch", "runtime_not_ready", "voice_load_failed",
                                    "target_down", "errors_5xx", "queue_full", "cache_disk_full", "trust_expiring",
                                    "restarts", "mirror_instead_of_peers", "rollback_held")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
