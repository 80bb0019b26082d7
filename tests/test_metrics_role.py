"""The role's metrics side without a host: the socket drop-in over the shipped units passes
systemd's parser, the paths the relay units hard-code are the ones the role writes into
both configs, and the role refuses a scraper that is not an IP address."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import jinja2
import pytest
import yaml

from tests.ops_helpers import ANSIBLE_DIR, SYSTEMD_DIR, make_fake_root

pytestmark = pytest.mark.integration
ROLE = ANSIBLE_DIR / "roles/tts_node"
ANALYZE = shutil.which("systemd-analyze")


def render(template: Path, **variables) -> str:
    return jinja2.Template(template.read_text(), keep_trailing_newline=True).render(ansible_managed="test", **variables)


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze missing (Debian package systemd)")
@pytest.mark.parametrize("address", ["", "10.0.0.5", "fd00::5"])
def test_metrics_socket_drop_in_parses(tmp_path, address):
    root = make_fake_root(tmp_path / "root")
    units = root / "etc/systemd/system"
    dropin = units / "tts-runtime-metrics.socket.d"
    dropin.mkdir()
    text = render(ROLE / "templates/metrics-socket.conf.j2", item={"unit": "tts-runtime-metrics.socket", "port": 9772},
                  tts_node_metrics_listen_address=address, tts_node_prometheus_allow=["10.0.9.10", "10.0.8.0/24"])
    (dropin / "listen.conf").write_text(text)
    expected = {"": "ListenStream=9772", "10.0.0.5": "ListenStream=10.0.0.5:9772",
                "fd00::5": "ListenStream=[fd00::5]:9772"}[address]
    assert expected + "\n" in text and "IPAddressAllow=localhost 10.0.9.10 10.0.8.0/24\n" in text
    out = subprocess.run([ANALYZE, "verify", f"--root={root}", "--man=no", "--generators=no",
                          "tts-runtime-metrics.socket", "tts-runtime-metrics.service"],
                         cwd=units, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr


def test_relays_point_at_the_sockets_the_role_configures():
    role_vars = yaml.safe_load((ROLE / "vars/main.yml").read_text())
    for daemon in ("provisioner", "runtime"):
        path = role_vars[f"tts_node_{daemon}_metrics_socket"].replace("{{ tts_node_root }}", "")
        service = (SYSTEMD_DIR / f"tts-{daemon}-metrics.service").read_text()
        assert f"systemd-socket-proxyd --connections-max=16 {path}\n" in service
        assert f"tts_node_{daemon}_metrics_socket" in (ROLE / f"templates/{daemon}.toml.j2").read_text()
    # The runtime's socket lives in its own RuntimeDirectory=, the provisioner's in its.
    assert "RuntimeDirectory=tts-runtime\n" in (SYSTEMD_DIR / "tts-runtime.service").read_text()
    assert "RuntimeDirectory=tts-provisioner\n" in (SYSTEMD_DIR / "tts-provisioner.service").read_text()


def test_role_refuses_a_scraper_that_is_not_an_address(tmp_path):
    import os
    import sys

    inventory = {"prometheus": {"hosts": {"prom.internal": {}}},
                 "tts_nodes": {"hosts": {"node-a": {"ansible_connection": "local", "ansible_become": False,
                                                    "ansible_python_interpreter": sys.executable}}}}
    (tmp_path / "inv.yml").write_text(yaml.safe_dump(inventory))
    env = dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_LOCAL_TEMP=str(tmp_path / "t"), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    out = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(tmp_path / "inv.yml"),
                          "site.yml", "-e", "tts_node_service_manager=none", "-e", "tts_node_install_packages=false",
                          "-e", '{"tts_node_mirror_credentials": {"primary": {"access_key": "a", "secret_key": "b"}}}'],
                         cwd=ANSIBLE_DIR, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode != 0
    flat = " ".join(out.stdout.split())
    assert "Who may scrape must be IP addresses or networks" in flat and "prom.internal" in flat, out.stdout[-3000:]
