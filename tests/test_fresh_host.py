"""A fresh minimal Debian 12 host under a real systemd: what an operator meets on day one.

One container (tts_testkit/nspawn.py): an overlay of `debootstrap --variant=minbase
--include=systemd,systemd-sysv,dbus,python3 bookworm`, booted with `systemd-nspawn --boot`
(systemd 252 as PID 1), sharing this host's network. Nothing is installed in it by the
test: ansible reaches it through nsenter (tts_testkit's `tts_nspawn` connection, as root;
no SSH - openssh-server would bring procps along and hide a missing /bin/kill), and
site.yml runs with the role's production defaults (`tts_node_service_manager: system`,
`tts_node_credentials_mode: loadcredential`): apt from Debian, the venv from a wheel of
this checkout plus every dependency from a wheelhouse (an internal index: see
docs/testing.md), the provisioner downloading the real voice from nanio on 127.0.0.1.

In order: `--check --diff` on the fresh host (succeeds, writes nothing), the real run,
a second run (changed=0), `--check --diff` on the converged host (changed=0). Then inside:
`systemctl reload` of both daemons, a synthesis over /run/tts/runtime.sock, a client that
arrives while the runtime is stopped, the documented one-server rollback, and
`systemd-analyze security` at or below today's scores. Run alone: `pytest -m fresh_host`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.ops_helpers import ANSIBLE_DIR, SYSTEMD_DIR
from tests.test_ansible import ansible_env, node_vars, publish_voice, recap
from tts_testkit import nspawn
from tts_testkit.paths import REPO, VENV_BIN
from tts_testkit.s3servers import start_nanio
from tts_testkit.wheel import build_wheel

ANSIBLE_PLAYBOOK = VENV_BIN / "ansible-playbook"
# The module's fixture (root build, wheelhouse, four plays, each bounded) runs in its first
# test's time: pytest-timeout's 600 s per test is too little for it on a loaded 2-core machine.
pytestmark = [pytest.mark.fleet, pytest.mark.fresh_host, pytest.mark.timeout(2400),
              pytest.mark.skipif(not ANSIBLE_PLAYBOOK.exists(), reason="ansible is not installed: run scripts/setup.sh")]

# Today's online scores (docs/operations.md, Hardening): a change may lower them, never raise them.
EXPOSURE_LIMITS = {"tts-runtime.service": 0.2, "tts-provisioner.service": 1.0}
# Every unit shipped (the optional network sockets too).
UNITS = sorted(p.name for pattern in ("*.service", "*.socket", "*.timer") for p in SYSTEMD_DIR.glob(pattern))
# Installed by the roles, not by Debian's minimal system.
ROLE_INSTALLED = re.compile(r"^(/opt/tts-fleet/venv/bin/[\w-]+|/usr/bin/opentracker)$")


@pytest.fixture(scope="module")
def root() -> nspawn.PristineRoot:
    reason = nspawn.unavailable()
    if reason:
        pytest.skip(reason)
    return nspawn.pristine_root()


def _exec_binaries(unit_text: str) -> list[str]:
    """The executable of every Exec*= line (prefixes such as - + ! @ : stripped)."""
    found = []
    for line in unit_text.splitlines():
        m = re.match(r"^Exec\w+=\s*(.+)$", line)
        if m and m.group(1).strip():
            found.append(shlex.split(m.group(1))[0].lstrip("-+!@:"))
    return found


def _exists_in(root: Path, path: str) -> bool:
    """Whether `path` exists inside `root`, following symlinks inside it (a merged /usr)."""
    current = root
    for part in Path(path).parts[1:]:
        candidate = current / part
        for _ in range(40):  # bounded: symlink chains
            if not candidate.is_symlink():
                break
            target = os.readlink(candidate)
            candidate = (root / target.lstrip("/")) if target.startswith("/") else (candidate.parent / target)
        current = candidate
    return current.exists()


def test_every_unit_command_is_on_a_minimal_host(root):
    """Every Exec*= of the shipped units runs something a minimal Debian 12 has, or that the
    roles install (the venv, opentracker): `ExecReload=/bin/kill` failed 203/EXEC there."""
    missing = []
    for unit in UNITS:
        for binary in _exec_binaries((SYSTEMD_DIR / unit).read_text()):
            if not ROLE_INSTALLED.match(binary) and not _exists_in(root.path, binary):
                missing.append(f"{unit}: {binary}")
    assert not missing, f"not on a minimal Debian 12 and not installed by a role: {missing}"


# Each role, the list of docs/ files it installs under /opt/tts-fleet/docs.
ROLE_DOCS = {"tts_node": "tts_node_docs", "tts_tracker": "tts_tracker_docs", "tts_mirror": "tts_mirror_signer_docs"}


def test_every_role_installs_the_docs_its_units_point_at():
    """Documentation=file:///opt/tts-fleet/docs/X of every unit a role installs: X is in
    docs/ and in that role's list of docs it installs (a link to a file nothing installs
    was defect 5 of issue 26)."""
    for role, variable in ROLE_DOCS.items():
        role_dir = ANSIBLE_DIR / "roles" / role
        text = "".join(p.read_text() for p in role_dir.rglob("*.yml"))
        installs = yaml.safe_load((role_dir / "defaults/main.yml").read_text())[variable]
        for unit in (u for u in UNITS if u in text):
            for link in re.findall(r"^Documentation=(.+)$", (SYSTEMD_DIR / unit).read_text(), re.M):
                for url in link.split():
                    name = url.removeprefix("file:///opt/tts-fleet/docs/")
                    assert url.startswith("file:///opt/tts-fleet/docs/"), (unit, url)
                    assert (REPO / "docs" / name).is_file() and name in installs, (role, unit, url, installs)


# -- the fresh host --------------------------------------------------------------------------------

WHEELHOUSE_BUILT: list[str] = []  # what building the wheelhouse cost, when this run built it


def wheelhouse(wheel: Path) -> Path:
    """Every dependency of the wheel as wheels, built with this host's pip once and cached
    beside the roots (keyed by pyproject.toml, constraints.txt and the Python version): the
    container's pip installs from it with --no-index, as from an internal index."""
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + (REPO / "constraints.txt").read_bytes()
                            + f"{sys.version_info[:2]}".encode()).hexdigest()[:16]
    target = nspawn.CACHE_DIR.parent / "wheelhouse" / digest
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            tmp = target.with_name(f".{digest}.{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            started = time.monotonic()
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(tmp), "-c",
                            str(REPO / "constraints.txt"), str(wheel)], check=True, capture_output=True, timeout=1200)
            for own in tmp.glob("tts_fleet-*.whl"):
                own.unlink()  # the role installs the wheel it copies itself
            tmp.rename(target)
            WHEELHOUSE_BUILT.append(f"wheelhouse built now in {time.monotonic() - started:.0f} s")
    return target


@dataclass
class Play:
    rc: int
    out: str
    seconds: float

    def recap(self) -> dict[str, int]:
        return recap(self.out).get("fresh", {})


@dataclass
class FreshHost:
    machine: nspawn.Machine
    secret: str
    plays: dict[str, Play] = field(default_factory=dict)
    wrote_on_check: bool = False
    summary: str = ""  # what the root, the wheelhouse and the plays cost (the run's output shows it)

    def run(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.machine.run(*argv, timeout=timeout)


def _play(work: Path, *args: str) -> Play:
    env = dict(ansible_env(work), ANSIBLE_CONNECTION_PLUGINS=str(nspawn.ANSIBLE_CONNECTION_PLUGINS))
    started = time.monotonic()
    try:
        out = subprocess.run([str(ANSIBLE_PLAYBOOK), "-i", str(work / "inventory.yml"), "site.yml", *args],
                             cwd=ANSIBLE_DIR, capture_output=True, text=True, timeout=1200, env=env)
    except subprocess.TimeoutExpired as exc:
        return Play(124, f"timed out:\n{(exc.stdout or b'')[-5000:]!r}", time.monotonic() - started)
    return Play(out.returncode, out.stdout + out.stderr, time.monotonic() - started)


@pytest.fixture(scope="module")
def fresh_host(root, bundle_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("fresh-host")
    mirror = start_nanio(work / "nanio")
    try:
        bucket = mirror.new_bucket()
        keys = publish_voice(mirror, bucket, work, bundle_dir)
        wheel = build_wheel(work / "wheel")
        wheels = wheelhouse(wheel)
        machine = nspawn.Machine(f"tts-fresh-{os.getpid()}", root, work / "machine", binds_ro={str(wheels): "/srv/wheels"})
        with machine:
            machine.boot()
            host_vars = node_vars(mirror, bucket, keys, tts_node_install_packages=True,
                                  tts_node_package_wheel_src=str(wheel),
                                  tts_node_pip_extra_args="--no-index --find-links /srv/wheels")
            # The role's production defaults, not the sandboxes' settings.
            assert "tts_node_service_manager" not in host_vars and "tts_node_credentials_mode" not in host_vars
            (work / "inventory.yml").write_text(yaml.safe_dump({"tts_nodes": {"hosts": {"fresh": {
                **nspawn.ansible_vars(machine), **host_vars}}}}))
            host = FreshHost(machine, mirror.credentials.secret_key)
            cpu_before = machine.cpu_seconds()
            for name, args in (("check-fresh", ("--check", "--diff")), ("first", ()), ("second", ()),
                               ("check", ("--check", "--diff"))):
                host.plays[name] = _play(work, *args)
                if name == "check-fresh":
                    host.wrote_on_check = machine.host_path("/etc/tts-fleet").exists() or \
                        machine.host_path("/opt/tts-fleet").exists()
            times = ", ".join(f"{n} {p.seconds:.0f} s (rc {p.rc}, {p.recap()})" for n, p in host.plays.items())
            cpu = machine.cpu_seconds()
            used = f"{cpu - cpu_before:.0f} s" if cpu is not None and cpu_before is not None else "unknown"
            host.summary = (f"fresh host: root {'built now' if root.built_now else 'from the cache'} (a build costs "
                            f"{root.build['seconds']:.0f} s, {root.build.get('bytes', 0) / 2**20:.0f} MiB); "
                            f"{' '.join(WHEELHOUSE_BUILT) or 'wheelhouse from the cache'}; plays: {times}; "
                            f"the machine's CPU time: {used}")
            print(host.summary)
            yield host
    finally:
        mirror.stop()


def _assert_ok(play: Play, what: str) -> None:
    assert play.rc == 0, f"{what} failed (rc {play.rc}):\n{play.out[-6000:]}"


def test_check_on_the_fresh_host_succeeds_and_writes_nothing(fresh_host):
    play = fresh_host.plays["check-fresh"]
    _assert_ok(play, "site.yml --check --diff on a fresh host")
    assert play.recap()["changed"] > 0  # it predicts the install
    assert not fresh_host.wrote_on_check, "--check wrote /etc/tts-fleet or /opt/tts-fleet"


def test_site_installs_everything_then_changes_nothing(fresh_host, record_property):
    record_property("summary", fresh_host.summary)
    first, second = fresh_host.plays["first"], fresh_host.plays["second"]
    _assert_ok(first, "the first site.yml")
    assert first.recap()["changed"] > 0
    _assert_ok(second, "the second site.yml")
    assert second.recap()["changed"] == 0, "\n".join(re.findall(r"^changed: .*$", second.out, re.M))
    for play in fresh_host.plays.values():  # no_log: the mirror secret never reaches the output
        assert fresh_host.secret not in play.out
    # Installed by the role, from nothing: what ansible's modules and the playbooks need too.
    dpkg = fresh_host.run("dpkg-query", "--show", "--showformat=${db:Status-Abbrev}${Package}\n",
                          "aria2", "python3-venv", "python3-packaging", "python3-apt", "sudo")
    assert dpkg.returncode == 0 and dpkg.stdout.count("ii ") == 5, dpkg.stdout + dpkg.stderr
    show = fresh_host.run("systemctl", "show", "tts-provisioner.service", "tts-runtime.service", "-p", "User",
                          "-p", "ActiveState", "-p", "NRestarts")
    assert show.stdout.count("User=tts") == 2 and show.stdout.count("ActiveState=active") == 2, show.stdout
    # The mirror keys: root-only on disk, handed to the provisioner by LoadCredential= (a
    # ready provisioner read them there: it downloaded the voice).
    stat = fresh_host.run("stat", "-c", "%U:%G %a %n", "/etc/tts-fleet/credentials/mirror-primary.toml",
                          "/run/credentials/tts-provisioner.service/mirror-primary.toml", "/run/tts/runtime.sock")
    assert "root:root 600 /etc/tts-fleet/credentials/mirror-primary.toml" in stat.stdout, stat.stdout + stat.stderr
    assert "/run/credentials/tts-provisioner.service/mirror-primary.toml" in stat.stdout, stat.stdout + stat.stderr
    assert "root:tts 660 /run/tts/runtime.sock" in stat.stdout, stat.stdout
    assert 'credentials_file = "/run/credentials/tts-provisioner.service/mirror-primary.toml"' in \
        fresh_host.machine.host_path("/etc/tts-fleet/provisioner.toml").read_text()


def test_check_on_the_converged_host_predicts_no_change(fresh_host):
    play = fresh_host.plays["check"]
    _assert_ok(play, "site.yml --check --diff on the converged host")
    assert play.recap()["changed"] == 0, "\n".join(re.findall(r"^changed: .*$", play.out, re.M))


def _log_count(host: FreshHost, unit: str, text: str) -> int:
    out = host.run("journalctl", "--no-pager", "-o", "cat", "-u", unit)
    return out.stdout.count(text)


def test_both_daemons_reload(fresh_host):
    """`systemctl reload` (the role's handler, the documented rollback step) reaches each
    daemon as SIGHUP, on a host without procps; nothing restarts."""
    _assert_ok(fresh_host.plays["first"], "the first site.yml")
    signs = {"tts-runtime.service": "SIGHUP: re-checking the model cache",
             "tts-provisioner.service": "sync requested (SIGHUP)"}
    for unit, sign in signs.items():
        before = _log_count(fresh_host, unit, sign)
        pid = fresh_host.run("systemctl", "show", unit, "-p", "MainPID", "--value").stdout.strip()
        out = fresh_host.run("systemctl", "reload", unit)
        assert out.returncode == 0, f"systemctl reload {unit}: {out.stderr}"
        for _ in range(600):  # at most 60 s: the daemon logs the signal as it handles it
            if _log_count(fresh_host, unit, sign) > before:
                break
            time.sleep(0.1)
        assert _log_count(fresh_host, unit, sign) > before, f"{unit} never logged {sign!r}"
        after = fresh_host.run("systemctl", "show", unit, "-p", "MainPID", "-p", "ActiveState", "-p", "NRestarts")
        assert f"MainPID={pid}" in after.stdout and "ActiveState=active" in after.stdout, after.stdout
        assert "NRestarts=0" in after.stdout, after.stdout


def test_synthesis_and_a_client_that_arrives_while_the_runtime_is_down(fresh_host):
    _assert_ok(fresh_host.plays["first"], "the first site.yml")
    ctl = "/opt/tts-fleet/venv/bin/tts-ctl"
    out = fresh_host.run(ctl, "synth", "Installed on a fresh host.", "-o", "/tmp/fresh.wav")
    assert out.returncode == 0, out.stderr
    assert fresh_host.machine.host_path("/tmp/fresh.wav").read_bytes()[:4] == b"RIFF"
    # Stopped, the runtime is started again by the next connection (the socket stays with
    # systemd); that client waits for the model to load and gets its audio, not a 503.
    assert fresh_host.run("systemctl", "stop", "tts-runtime.service").returncode == 0
    out = fresh_host.run(ctl, "synth", "Woken by the socket.", "-o", "/tmp/woken.wav", "--timeout", "240")
    assert out.returncode == 0, out.stderr
    assert fresh_host.machine.host_path("/tmp/woken.wav").read_bytes()[:4] == b"RIFF"
    journal = fresh_host.run("journalctl", "--no-pager", "-o", "cat", "-u", "tts-runtime.service").stdout
    assert '"status": 503' not in journal, journal[-3000:]


def test_the_documented_one_server_rollback_runs(fresh_host):
    """docs/operations.md "Rolling back", on one server: as tts through sudo (installed by
    the role: a minimal Debian has none), then the one-command gate, then the release."""
    _assert_ok(fresh_host.plays["first"], "the first site.yml")
    bin_dir = "/opt/tts-fleet/venv/bin"
    out = fresh_host.run("sudo", "-u", "tts", f"{bin_dir}/tts-provisioner", "rollback", "joe", "1.0.0")
    assert out.returncode == 0, out.stdout + out.stderr
    out = fresh_host.run(f"{bin_dir}/tts-ctl", "check", "--reload", "--expect-version", "1.0.0")
    assert out.returncode == 0 and out.stdout.startswith("joe 1.0.0: ok"), out.stdout + out.stderr
    out = fresh_host.run("sudo", "-u", "tts", f"{bin_dir}/tts-provisioner", "rollback", "joe", "--release")
    assert out.returncode == 0 and "hold released" in out.stdout, out.stdout + out.stderr


def test_security_exposure_stays_at_todays_scores(fresh_host, record_property):
    _assert_ok(fresh_host.plays["first"], "the first site.yml")
    out = fresh_host.run("systemd-analyze", "security", "--no-pager", *EXPOSURE_LIMITS)
    scores = {m.group(1): float(m.group(2))
              for m in re.finditer(r"Overall exposure level for (\S+): (\d+\.\d+)", out.stdout)}
    record_property("summary", f"fresh host: systemd-analyze security (online) {scores}")
    assert set(scores) == set(EXPOSURE_LIMITS), out.stdout[-3000:] + out.stderr
    for unit, limit in EXPOSURE_LIMITS.items():
        assert scores[unit] <= limit, f"{unit}: exposure {scores[unit]} above today's {limit}"


def test_documentation_is_installed_where_the_units_point(fresh_host):
    _assert_ok(fresh_host.plays["first"], "the first site.yml")
    out = fresh_host.run("systemctl", "show", "-p", "Documentation", "--value", "tts-runtime.service",
                         "tts-runtime.socket", "tts-provisioner.service")
    links = out.stdout.split()
    assert links and all(link.startswith("file://") for link in links), out.stdout
    for link in links:
        assert fresh_host.machine.host_path(link.removeprefix("file://")).is_file(), link
