"""The ansible role and playbooks, run for real.

- ansible-lint (production profile) and --syntax-check on every playbook.
- site.yml against localhost inside a mount-namespace sandbox: overlays on /etc, /opt
  and /var, a tmpfs on /run, the shared venv read-only - the host is untouched. The
  services are managed by a real `systemd --user` manager started inside the sandbox
  (systemd is not PID 1 here, so a system manager is impossible; the user manager of
  root still applies User=, the namespaces, seccomp filters and sd_notify). In order:
  a --check run on the fresh node (must change nothing), the real run (installs the
  venv from a wheel built from this checkout, creates the tts user with the sysusers
  snippet, templates configs and credentials, installs the shipped units, starts them
  and waits for `tts-ctl wait-ready` while the provisioner downloads the real voice
  from nanio), then a second run that must report changed=0.
- the role's p2p, network and trust settings rendered from an inventory.

rollout-model.yml and rollback.yml run in tests/test_fleet.py, over the fleet's hosts
(a good version canary then waves; bad versions - one that does not load, silence, a
mirror cut off - roll the canary back and touch nobody else).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import s3_kinds
from tests.ops_helpers import ANSIBLE_DIR, namespace_unavailable, run_in_sandbox, sandbox_prelude
from tts_testkit.paths import REPO, SANDBOX_VENV, VENV, VENV_BIN
from tts_testkit.provisioner_setup import Keys, make_keys, publish_raw
from tts_testkit.wheel import build_wheel

PLAYBOOKS = ["site.yml", "rollout-model.yml", "rollback.yml", "mirror.yml", "monitoring.yml"]
ANSIBLE_PLAYBOOK = VENV_BIN / "ansible-playbook"
pytestmark = pytest.mark.skipif(not ANSIBLE_PLAYBOOK.exists(),
                                reason="ansible is not installed: run scripts/setup.sh (pyproject dev extra)")


def ansible_env(tmp: Path) -> dict:
    return dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"), ANSIBLE_LOCAL_TEMP=str(tmp / "ansible-tmp"),
                ANSIBLE_REMOTE_TEMP=str(tmp / "ansible-tmp"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
                PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP lines -> {host: {ok: n, changed: n, failed: n, ...}}"""
    hosts = {}
    for m in re.finditer(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", output, re.M):
        hosts[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return hosts


@pytest.mark.integration
def test_ansible_lint_production_profile(tmp_path):
    lint = VENV_BIN / "ansible-lint"
    if not lint.exists():
        pytest.skip("ansible-lint is not installed: run scripts/setup.sh")
    out = subprocess.run([str(lint), "--offline", "--profile", "production", "--nocolor", *PLAYBOOKS, "roles"],
                         cwd=ANSIBLE_DIR, capture_output=True, text=True, timeout=240, env=ansible_env(tmp_path))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]


@pytest.mark.integration
def test_syntax_check(tmp_path):
    out = subprocess.run([str(ANSIBLE_PLAYBOOK), "--syntax-check", *PLAYBOOKS], cwd=ANSIBLE_DIR,
                         capture_output=True, text=True, timeout=120, env=ansible_env(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr


def publish_voice(s3_server, bucket: str, tmp: Path, bundle: Path, version: str = "1.0.0",
                  channel: str | None = "stable", broken: bool = False):
    keys_dir = tmp / "keys"
    if (keys_dir / "mirror.key").exists():
        keys = Keys(keys_dir / "mirror.key", keys_dir / "mirror.pub")
    else:
        keys_dir.mkdir()
        keys = make_keys(keys_dir)
    files = {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}
    if broken:
        # Passes every checksum (the manifest lists these bytes) but cannot be loaded:
        # the failure a bad export or a wrong conversion would cause.
        for name in files:
            if name.endswith(".safetensors"):
                files[name] = b"\0" * len(files[name])
    publish_raw(s3_server.client(), bucket, "joe", version, files, keys, channel=channel)
    return keys


def node_vars(s3_server, bucket: str, keys, **extra) -> dict:
    base = {
        "tts_node_mirrors": [{"name": "primary", "endpoint": s3_server.endpoint, "bucket": bucket, "priority": 10}],
        "tts_node_mirror_credentials": {"primary": {"access_key": s3_server.credentials.access_key,
                                                    "secret_key": s3_server.credentials.secret_key}},
        "tts_node_public_keys": {"mirror.pub": keys.public.read_text()},
        "tts_node_models": [{"name": "joe", "channel": "stable"}],
        "tts_node_poll_interval": 5,
        "tts_node_install_packages": False,
        "tts_node_runtime_device": "cpu",
        "tts_node_runtime_settings": {"threads": 1, "max_batch_size": 4, "queue_size": 16},
        "tts_node_aria2": {"connections": 2, "min_split_size": "1M", "max_concurrent_downloads": 2,
                           "max_download_limit": "0"},
        "tts_node_wait_ready_timeout": 240,
    }
    base.update(extra)
    return base


# -- site.yml in a sandbox under a real (user) service manager ---------------------------

SANDBOX_SCRIPT = r"""
{prelude}
mkdir -p /run/systemd/system /etc/systemd/user
# The manager's directories: /run as XDG_RUNTIME_DIR puts RuntimeDirectory=, the
# credentials and the socket exactly where a system manager would; StateDirectory= of
# a v252 user manager lives in $XDG_CONFIG_HOME.
export XDG_RUNTIME_DIR=/run XDG_CACHE_HOME=/var/cache XDG_CONFIG_HOME=/var/lib
systemd --user >{work}/manager.log 2>&1 &
manager=$!
for i in $(seq 1 100); do [ -S /run/systemd/private ] && break; sleep 0.1; done
# A user manager creates its notify socket 0755 (only its own user is expected to
# talk to it); services with User=tts need the mode a system manager gives it.
chmod 0777 /run/systemd/notify
cd {ansible}
play() {{ ansible-playbook -i {work}/inventory.yml -e @{work}/vars.yml site.yml "$@"; }}
rc=0
play --check --diff >{work}/check.out 2>&1 || rc=$?; echo "check=$rc" >>{work}/rcs
[ -e /etc/tts-fleet/provisioner.toml ] && echo "check-wrote-config" >>{work}/rcs
rc=0; play >{work}/first.out 2>&1 || rc=$?; echo "first=$rc" >>{work}/rcs
rc=0; play >{work}/second.out 2>&1 || rc=$?; echo "second=$rc" >>{work}/rcs
for u in tts-provisioner.service tts-runtime.socket tts-runtime.service; do
  echo "$u=$(systemctl --user is-active $u)" >>{work}/rcs
done
systemctl --user show tts-runtime.service -p User -p NRestarts -p StatusText >{work}/runtime-show.txt || true
systemctl --user show tts-provisioner.service -p User -p NRestarts -p StatusText >{work}/provisioner-show.txt || true
stat -c '%U:%G %a %n' /run/tts/runtime.sock /var/cache/tts-fleet /etc/tts-fleet/provisioner.toml \
  /etc/tts-fleet/private/mirror-primary.toml >{work}/stat.txt 2>&1 || true
rc=0; /opt/tts-fleet/venv/bin/tts-ctl --config /etc/tts-fleet/runtime.toml synth "Installed by ansible." \
  -o {work}/synth.wav >{work}/synth.out 2>&1 || rc=$?; echo "synth=$rc" >>{work}/rcs
/opt/tts-fleet/venv/bin/python -c 'import provisioner, sys; print(provisioner.__file__)' >{work}/import.txt 2>&1 || true
# Prometheus's view: each daemon's metrics over TCP, through its socket unit's relay.
for port in {metrics_ports}; do
  /opt/tts-fleet/venv/bin/python -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=30).read().decode())' \
    "http://127.0.0.1:$port/metrics" >{work}/metrics-$port.txt 2>&1 || true
done
systemctl --user stop tts-provisioner-metrics.socket tts-runtime-metrics.socket tts-provisioner-metrics.service \
  tts-runtime-metrics.service || true
systemctl --user stop tts-runtime.service tts-runtime.socket tts-provisioner.service || true
systemctl --user exit || true
for i in $(seq 1 100); do kill -0 $manager 2>/dev/null || break; sleep 0.1; done
kill -9 $manager 2>/dev/null || true
"""


def one_server(s3_server) -> None:
    """The role and playbooks run against the first server of the matrix only: what they
    add over the provisioner's own tests (run on every server) is ansible's side, and the
    fleet test (tests/test_fleet.py) runs them again over SSH - twice would cost CI minutes."""
    if s3_server.kind != s3_kinds()[0]:
        pytest.skip(f"role tests run on {s3_kinds()[0]} only; the provisioner's tests cover {s3_server.kind}")


@pytest.mark.fleet
def test_site_in_sandbox_under_user_manager(tmp_path, s3_server, bucket, bundle_dir):
    one_server(s3_server)
    reason = namespace_unavailable()
    if reason:
        pytest.skip(reason)
    if not shutil.which("systemd"):
        pytest.skip("systemd binary missing: cannot start a user manager (Debian package systemd)")
    work = tmp_path / "work"
    work.mkdir()
    keys = publish_voice(s3_server, bucket, tmp_path, bundle_dir)
    wheel = build_wheel(tmp_path / "wheel")
    purelib = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    metrics_ports = free_ports(2)
    variables = node_vars(
        s3_server, bucket, keys,
        tts_node_service_manager="user",
        tts_node_user_manager_runtime_dir="/run",
        tts_node_package_wheel_src=str(wheel),
        # The wheel without its dependencies; torch and friends come from the test venv
        # through a .pth file instead of a download (see docs/operations.md).
        tts_node_pip_extra_args="--no-index --no-deps",
        tts_node_venv_extra_site_dirs=[str(SANDBOX_VENV / Path(purelib).relative_to(VENV))],
        # The sandbox shares the host's network: loopback, ports nobody uses.
        tts_node_metrics_listen_address="127.0.0.1",
        tts_node_metrics_provisioner_port=metrics_ports[0],
        tts_node_metrics_runtime_port=metrics_ports[1],
    )
    (work / "vars.yml").write_text(yaml.safe_dump(variables))
    (work / "inventory.yml").write_text(yaml.safe_dump(
        {"tts_nodes": {"hosts": {"sandbox": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}}))
    script = SANDBOX_SCRIPT.format(prelude=sandbox_prelude(work), work=work, ansible=ANSIBLE_DIR,
                                   metrics_ports=" ".join(map(str, metrics_ports)))
    started = time.monotonic()
    out = run_in_sandbox(script, timeout=600, env=ansible_env(tmp_path))
    elapsed = time.monotonic() - started
    rcs = dict(line.split("=", 1) for line in (work / "rcs").read_text().split() if "=" in line) \
        if (work / "rcs").exists() else {}
    first = (work / "first.out").read_text() if (work / "first.out").exists() else ""
    second = (work / "second.out").read_text() if (work / "second.out").exists() else ""
    check = (work / "check.out").read_text() if (work / "check.out").exists() else ""
    print(f"sandbox run: {elapsed:.0f}s; recap first={recap(first)} second={recap(second)} check={recap(check)}")
    diagnostics = f"script rc={out.returncode}\n{out.stderr[-2000:]}\nrcs={rcs}\nFIRST:\n{first[-6000:]}"

    # The host is untouched: nothing of this leaked out of the namespace.
    assert not Path("/etc/tts-fleet/provisioner.toml").exists() or Path("/etc/tts-fleet").stat().st_mtime < started
    assert not Path("/etc/systemd/user/tts-provisioner.service").exists()

    assert rcs.get("check") == "0", f"--check failed:\n{check[-4000:]}"
    assert "check-wrote-config" not in (work / "rcs").read_text(), "--check changed the node"
    assert recap(check)["sandbox"]["changed"] > 0
    assert rcs.get("first") == "0", diagnostics
    assert recap(first)["sandbox"]["changed"] > 0
    assert rcs.get("second") == "0", second[-4000:]
    assert recap(second)["sandbox"]["changed"] == 0, \
        "second run not idempotent:\n" + "\n".join(re.findall(r"^changed: .*$", second, re.M))
    # no_log: the mirror secret never appears in ansible's output.
    secret = s3_server.credentials.secret_key
    assert secret not in first and secret not in second and secret not in check

    for unit in ("tts-provisioner.service", "tts-runtime.socket", "tts-runtime.service"):
        assert rcs.get(unit) == "active", f"{unit}: {rcs.get(unit)}\n{(work / 'runtime-show.txt').read_text()}"
    show = (work / "runtime-show.txt").read_text() + (work / "provisioner-show.txt").read_text()
    assert show.count("User=tts") == 2, show
    assert "NRestarts=0" in show, show
    stats = (work / "stat.txt").read_text()
    assert "root:tts 660 /run/tts/runtime.sock" in stats, stats
    assert "tts:tts 600 /etc/tts-fleet/private/mirror-primary.toml" in stats, stats
    assert rcs.get("synth") == "0", (work / "synth.out").read_text()
    assert (work / "synth.wav").read_bytes()[:4] == b"RIFF"
    # The venv runs the package from the wheel, not the checkout.
    assert "/opt/tts-fleet/venv/" in (work / "import.txt").read_text()
    # Both daemons' metrics reach TCP through the relays (socket units + systemd-socket-proxyd).
    provisioner_metrics = (work / f"metrics-{metrics_ports[0]}.txt").read_text()
    runtime_metrics = (work / f"metrics-{metrics_ports[1]}.txt").read_text()
    assert "tts_provisioner_ready 1.0" in provisioner_metrics, provisioner_metrics[-2000:]
    assert 'tts_provisioner_model_current_info{model="joe",version="1.0.0"} 1.0' in provisioner_metrics
    assert "tts_ready 1.0" in runtime_metrics, runtime_metrics[-2000:]


def free_ports(count: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# The role writing files only (service manager none, the checkout's venv, no packages, root),
# with a mirror that is never reached: what the tests that read the rendered files start from.
FILES_ONLY = {
    "tts_node_mirrors": [{"name": "primary", "endpoint": "http://127.0.0.1:9", "bucket": "b", "priority": 10}],
    "tts_node_mirror_credentials": {"primary": {"access_key": "AK", "secret_key": "not-a-real-secret"}},
    "tts_node_service_manager": "none", "tts_node_create_user": False, "tts_node_user": "root",
    "tts_node_group": "root", "tts_node_install_venv": False, "tts_node_install_packages": False,
    "tts_node_venv": str(VENV), "tts_node_require_signature": False,
}


# -- [p2p] from the inventory ----------------------------------------------------------------

@pytest.mark.fleet
def test_role_writes_p2p_from_the_inventory_and_refuses_bad_settings(tmp_path):
    """site.yml (files only: service manager none) over three local "hosts" with p2p on:
    each provisioner.toml gets [p2p] with the fleet = the tts_nodes group, the trackers =
    the tts_tracker group's hosts at the tracker port, its own node id; the provisioner
    accepts the file. Bad settings stop the play before anything is written, with a
    message naming the variable. No mirror is contacted: nothing syncs here."""
    import tomllib

    from provisioner.config import load_config

    names = ["node-c", "node-a", "node-b"]
    roots = {n: tmp_path / n for n in names}
    variables = {
        **FILES_ONLY,
        "tts_node_p2p_enabled": True, "tts_node_p2p_listen_port": 16881, "tts_node_p2p_upload_limit": "20M",
        "tts_node_p2p_stall_seconds": 2.5, "tts_node_p2p_networks": ["10.20.0.0/16"],
    }
    hosts = {n: {"ansible_connection": "local", "ansible_become": False, "ansible_python_interpreter": sys.executable,
                 "tts_node_root": str(roots[n])} for n in names}
    inventory = {"tts_nodes": {"vars": variables, "hosts": hosts},
                 "tts_tracker": {"hosts": {"tracker-1": {"ansible_host": "10.20.0.2"}, "tracker-2": {}}}}
    path = tmp_path / "inventory.yml"
    path.write_text(yaml.safe_dump(inventory))
    env = ansible_env(tmp_path)

    def site(*args: str, inv: Path = path) -> subprocess.CompletedProcess:
        return subprocess.run([str(ANSIBLE_PLAYBOOK), "-i", str(inv), "site.yml", *args], cwd=ANSIBLE_DIR,
                              capture_output=True, text=True, timeout=300, env=env)

    out = site()
    assert out.returncode == 0, out.stdout[-5000:]
    for name in names:
        conf = roots[name] / "etc/tts-fleet/provisioner.toml"
        p2p = tomllib.loads(conf.read_text())["p2p"]
        assert p2p == {"enabled": True, "trackers": ["http://10.20.0.2:6969/announce", "http://tracker-2:6969/announce"],
                       "listen_port": 16881, "upload_limit": "20M", "node_id": name,
                       "fleet": ["node-a", "node-b", "node-c"], "web_seed_nodes": 1, "stall_seconds": 2.5}, p2p
        assert load_config(conf).p2p.enabled  # the provisioner's own schema takes it
    before = (roots["node-a"] / "etc/tts-fleet/provisioner.toml").read_text()

    # Each bad value: the play stops at the check, names the variable, writes nothing.
    bad = {"tts_node_p2p_listen_port=80": "tts_node_p2p_listen_port must be a port number from 1024 to 65535, not '80'",
           "tts_node_p2p_upload_limit=fast": "tts_node_p2p_upload_limit must be bytes per second",
           "tts_node_p2p_stall_seconds=0": "tts_node_p2p_stall_seconds must be a number of seconds above 0",
           "tts_node_p2p_node_id=elsewhere": "node id 'elsewhere' is not in the fleet",
           'tts_node_p2p_networks=["10.20.0.0/16","eth0"]': "tts_node_p2p_networks must be a list of IP networks"}
    for arg, message in bad.items():
        out = site("--limit", "node-a", "-e", arg)
        flat = " ".join(out.stdout.split())
        assert out.returncode != 0 and message in flat, (arg, out.stdout[-3000:])
    no_tracker = tmp_path / "inventory-no-tracker.yml"
    no_tracker.write_text(yaml.safe_dump({"tts_nodes": inventory["tts_nodes"]}))
    out = site("--limit", "node-a", inv=no_tracker)
    assert out.returncode != 0 and "needs a tracker: no host in inventory group 'tts_tracker'" in " ".join(
        out.stdout.split()), out.stdout[-3000:]
    assert (roots["node-a"] / "etc/tts-fleet/provisioner.toml").read_text() == before

    # Off again: no [p2p] section, the provisioner's default (off).
    out = site("--limit", "node-a", "-e", "tts_node_p2p_enabled=false")
    assert out.returncode == 0, out.stdout[-3000:]
    assert "[p2p]" not in (roots["node-a"] / "etc/tts-fleet/provisioner.toml").read_text()


# -- only the fleet joins the swarm (issue 27) --------------------------------------------------

def firewall_playbook(roles: Path, out: Path) -> list[dict]:
    """The roles' address checks and drop-ins alone, rendered by ansible itself (its filters
    and tests), written under `out` instead of a unit directory: no handler, no service manager."""
    def play(hosts: str, role: str, checks: str, template: str, name: str, **variables) -> dict:
        return {"hosts": hosts, "gather_facts": False, "vars": variables,
                "vars_files": [str(roles / role / "defaults/main.yml"), str(roles / role / "vars/main.yml")],
                "tasks": [{"ansible.builtin.import_tasks": str(roles / role / "tasks" / checks)},
                          {"ansible.builtin.template": {"src": str(roles / role / "templates" / template),
                                                        "dest": f"{out}/{{{{ inventory_hostname }}}}-{name}",
                                                        "mode": "0644"}}]}

    return [play("tts_nodes", "tts_node", "p2p-firewall-checks.yml", "provisioner-p2p.conf.j2", "p2p.conf",
                 tts_node_service_manager="system"),
            play("tts_tracker", "tts_tracker", "fleet-firewall-checks.yml", "tracker-fleet.conf.j2", "fleet.conf")]


def render_firewall(tmp: Path, nodes: dict, node_vars: dict | None = None, tracker_vars: dict | None = None,
                    trackers: dict | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the roles' p2p address checks and render their drop-ins for an inventory of
    `nodes` ({name: ansible_host}) and `trackers` (default: tracker-1 at 10.20.0.2)."""
    out = tmp / f"render-{len(list(tmp.glob('render-*')))}"
    out.mkdir()
    variables = {"tts_node_p2p_enabled": True, "tts_node_mirrors": [
        {"name": "primary", "endpoint": "http://10.20.0.5:9000", "bucket": "b"}], **(node_vars or {})}
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inventory = {
        "tts_nodes": {"hosts": {n: dict(local, ansible_host=a) for n, a in nodes.items()}},
        "tts_tracker": {"hosts": {n: dict(local, ansible_host=a)
                                  for n, a in (trackers or {"tracker-1": "10.20.0.2"}).items()}}}
    (out / "inventory.yml").write_text(yaml.safe_dump(inventory))
    # As extra vars: the play loads the role defaults as vars_files, which inventory vars would not beat.
    (out / "vars.json").write_text(json.dumps({**variables, **(tracker_vars or {})}))
    (out / "render.yml").write_text(yaml.safe_dump(firewall_playbook(ANSIBLE_DIR / "roles", out)))
    result = subprocess.run([str(ANSIBLE_PLAYBOOK), "-i", str(out / "inventory.yml"), "-e", f"@{out / 'vars.json'}",
                             str(out / "render.yml")],
                            cwd=ANSIBLE_DIR, capture_output=True, text=True, timeout=300, env=ansible_env(tmp))
    return result, out


def effective_allow(*dropins: str, unit: str = "") -> list[str]:
    """IPAddressAllow= as systemd reads it from a unit and its drop-ins: lists add up, an
    empty assignment resets."""
    allowed: list[str] = []
    for text in (unit, *dropins):
        for line in text.splitlines():
            if line.startswith("IPAddressAllow="):
                value = line.split("=", 1)[1].split()
                allowed = allowed + value if value else []
    return allowed


FLEET = {"node-a": "10.20.0.11", "node-b": "10.20.0.12", "node-c": "10.20.0.13"}


@pytest.mark.integration
def test_only_the_fleet_its_trackers_and_its_mirrors_are_admitted(tmp_path):
    """With p2p on, the provisioner's drop-in admits exactly localhost, the mirrors, the
    trackers and the fleet's nodes by address (no private range: a host beside the fleet is
    refused), and the tracker's admits localhost and the fleet's nodes; systemd's own parser
    accepts both over the shipped units (any stderr line fails: `verify` only warns)."""
    from tests.ops_helpers import make_fake_root

    result, out = render_firewall(tmp_path, FLEET)
    assert result.returncode == 0, result.stdout[-4000:]
    unit = (REPO / "systemd/tts-provisioner.service").read_text()
    for node in FLEET:
        dropin = (out / f"{node}-p2p.conf").read_text()
        assert effective_allow(dropin, unit=unit) == ["localhost", "10.20.0.5", "10.20.0.2", *FLEET.values()], dropin
    tracker = (out / "tracker-1-fleet.conf").read_text()
    assert effective_allow(tracker, unit=(REPO / "systemd/tts-tracker.service").read_text()) == [
        "localhost", *FLEET.values()], tracker

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze missing: run scripts/setup.sh (Debian package systemd)")
    root = make_fake_root(tmp_path / "root")
    units = root / "etc/systemd/system"
    for unit_name, name, source in (("tts-provisioner.service", "p2p.conf", out / "node-a-p2p.conf"),
                                    ("tts-tracker.service", "fleet.conf", out / "tracker-1-fleet.conf")):
        (units / f"{unit_name}.d").mkdir()
        shutil.copy(source, units / f"{unit_name}.d" / name)
    verified = subprocess.run([analyze, "verify", f"--root={root}", "--man=no", "--generators=no",
                               "tts-provisioner.service", "tts-tracker.service"],
                              cwd=units, capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0 and verified.stderr.strip() == "", verified.stderr


@pytest.mark.integration
def test_fleet_addresses_that_are_not_ip_addresses_are_refused_by_name(tmp_path):
    """systemd admits addresses, not names: a node, tracker or mirror known only by name
    stops the play with a message saying what to set; mirrors named by host are fine once
    their addresses are in tts_node_provisioner_ip_allow; extra networks are added."""
    cases = {
        "node": (dict(FLEET, **{"node-b": "node-b.internal"}), {}, None, "set each node's ansible_host to its IP"),
        "tracker": (FLEET, {}, {"tracker-1": "tracker.internal"}, "announce URLs with IP addresses"),
        "mirror": (FLEET, {"tts_node_mirrors": [{"name": "m", "endpoint": "http://minio.internal:9000", "bucket": "b"}]},
                   None, "a mirror endpoint names a host (['minio.internal']): list the mirrors' addresses"),
    }
    for case, (nodes, node_vars, trackers, message) in cases.items():
        result, out = render_firewall(tmp_path, nodes, node_vars, trackers=trackers)
        flat = " ".join(result.stdout.split())
        assert result.returncode != 0 and message in flat, (case, result.stdout[-3000:])
        assert not list(out.glob("*-p2p.conf")), case
    named = {"tts_node_mirrors": [{"name": "m", "endpoint": "http://minio.internal:9000", "bucket": "b"}],
             "tts_node_provisioner_ip_allow": ["10.20.0.5", "10.20.0.6"], "tts_node_p2p_networks": ["10.30.0.0/24"]}
    result, out = render_firewall(tmp_path, FLEET, named)
    assert result.returncode == 0, result.stdout[-3000:]
    assert effective_allow((out / "node-a-p2p.conf").read_text()) == [
        "localhost", "10.20.0.5", "10.20.0.6", "10.20.0.2", *FLEET.values(), "10.30.0.0/24"]
    # The tracker with no fleet to admit: refused, it would answer nobody.
    result, out = render_firewall(tmp_path, FLEET, tracker_vars={"tts_tracker_fleet_group": "nobody"})
    assert result.returncode != 0 and "no host in inventory group 'nobody': the tracker would answer nobody" in \
        " ".join(result.stdout.split()), result.stdout[-3000:]


@pytest.mark.fleet
def test_role_opens_the_runtime_to_the_network_only_as_configured(tmp_path):
    """site.yml (files only) with the runtime's network settings: runtime.toml gets the
    listeners, the tokens file (0600, labels and tokens) and the allow list, and the runtime's
    own config loader takes the file; bad settings stop the play before anything is written,
    naming the variable; the tokens never appear in ansible's output (no_log)."""
    from runtime.config import load_config

    root = tmp_path / "node"
    token = "0123456789abcdef0123456789abcdef"
    variables = {
        **FILES_ONLY,
        "tts_node_runtime_http_listen": "0.0.0.0:8088", "tts_node_runtime_wyoming_listen": "[::]:10200",
        "tts_node_runtime_tokens": {"home-assistant": token}, "tts_node_runtime_client_networks": ["192.168.1.0/24"],
    }
    inventory = {"tts_nodes": {"vars": variables, "hosts": {"node": {
        "ansible_connection": "local", "ansible_become": False, "ansible_python_interpreter": sys.executable,
        "tts_node_root": str(root)}}}}
    path = tmp_path / "inventory.yml"
    path.write_text(yaml.safe_dump(inventory))
    env = ansible_env(tmp_path)

    def site(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(ANSIBLE_PLAYBOOK), "-i", str(path), "site.yml", *args], cwd=ANSIBLE_DIR,
                              capture_output=True, text=True, timeout=300, env=env)

    out = site()
    assert out.returncode == 0, out.stdout[-5000:]
    assert token not in out.stdout + out.stderr
    etc = root / "etc/tts-fleet"
    config = load_config(etc / "runtime.toml")
    assert config.tcp_listen == "0.0.0.0:8088" and config.tcp_tokens_file == str(etc / "private/runtime-tokens")
    assert config.wyoming_listen == ["tcp://[::]:10200"]
    assert config.wyoming_allow == ["127.0.0.0/8", "::1/128", "192.168.1.0/24"]
    tokens = etc / "private/runtime-tokens"
    assert tokens.stat().st_mode & 0o777 == 0o600 and f"home-assistant {token}" in tokens.read_text()
    before = (etc / "runtime.toml").read_text()

    bad = {'{"tts_node_runtime_wyoming_listen": "10200"}': "must be HOST:PORT",
           '{"tts_node_runtime_tokens": {}}': "tts_node_runtime_http_listen needs bearer tokens",
           '{"tts_node_runtime_tokens": {"a": "short"}}': "needs at least 16 characters",
           '{"tts_node_runtime_tokens": "not-a-mapping"}': "must be a mapping of label to token",
           '{"tts_node_runtime_client_networks": ["lan"]}': "tts_node_runtime_client_networks must be a list of IP networks"}
    for arg, message in bad.items():
        out = site("-e", arg)
        assert out.returncode != 0 and message in " ".join(out.stdout.split()), (arg, out.stdout[-3000:])
    assert (etc / "runtime.toml").read_text() == before

    out = site("-e", "tts_node_runtime_http_listen=", "-e", "tts_node_runtime_wyoming_listen=")
    assert out.returncode == 0, out.stdout[-3000:]
    plain = load_config(etc / "runtime.toml")
    assert plain.tcp_listen == "" and plain.wyoming_listen == []


@pytest.mark.fleet
def test_role_distributes_the_trust_root(tmp_path):
    """site.yml (files only) with tts_node_trust_root: root.json installed byte for byte,
    `[trust] root` pointing at it, accepted by the provisioner's schema even with
    require_signature and no manifest keys (the signed metadata pins each manifest)."""
    import tomllib

    from tuf.api.metadata import Metadata

    from mirror.trust import now
    from mirror.trust_repo import fresh_root, serialize
    from provisioner.config import load_config
    from tts_testkit.trust_keys import TrustKeys

    keys = TrustKeys.make(tmp_path / "keys", ("root1",))
    pub = keys.public("root1")
    root = Metadata(fresh_root({r: [pub] for r in ("root", "targets", "snapshot", "timestamp")}, {}, now()))
    text = serialize(root).decode()
    host = tmp_path / "node"
    variables = {
        "tts_node_mirrors": [{"name": "primary", "endpoint": "http://127.0.0.1:9", "bucket": "b"}],
        "tts_node_mirror_credentials": {"primary": {"access_key": "AK", "secret_key": "not-a-real-secret"}},
        "tts_node_service_manager": "none", "tts_node_create_user": False, "tts_node_user": "root",
        "tts_node_group": "root", "tts_node_install_venv": False, "tts_node_install_packages": False,
        "tts_node_venv": str(VENV), "tts_node_require_signature": True, "tts_node_trust_root": text,
        "tts_node_trust_metadata_deadline": 7,
    }
    inventory = {"tts_nodes": {"vars": variables, "hosts": {"node": {
        "ansible_connection": "local", "ansible_become": False, "ansible_python_interpreter": sys.executable,
        "tts_node_root": str(host)}}}}
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory))
    out = subprocess.run([str(ANSIBLE_PLAYBOOK), "-i", str(tmp_path / "inventory.yml"), "site.yml"], cwd=ANSIBLE_DIR,
                         capture_output=True, text=True, timeout=300, env=ansible_env(tmp_path))
    assert out.returncode == 0, out.stdout[-5000:]
    installed = host / "etc/tts-fleet/trust/root.json"
    assert installed.read_text() == text
    conf = host / "etc/tts-fleet/provisioner.toml"
    assert tomllib.loads(conf.read_text())["trust"] == {"root": str(installed), "metadata_deadline": 7.0}
    config = load_config(conf)
    assert config.trust.root == installed and config.public_keys == []
