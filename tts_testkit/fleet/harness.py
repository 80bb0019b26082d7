"""A simulated fleet: N Debian 12 hosts with systemd 252 as PID 1 that ansible reaches over
SSH, plus the mirror, on one machine.

Each node is, as far as ansible can tell, a host of its own:

- a network namespace (`ip netns`) with one veth on a Linux bridge and its own address;
- a container booted with `systemd-nspawn --boot` into that namespace
  (`--network-namespace-path=/run/netns/<ns>`; tts_testkit/nspawn.py `Machine`): systemd as
  PID 1, a real system manager, journald, its own hostname; its disk an overlay of the
  cached Debian 12 root plus the packages the roles install (`fleet_root()`: the nodes'
  network reaches only the bridge, so apt could not fetch them there), the writes in an
  upper directory of its own, so a node keeps its disk across a hard kill and a new boot;
- Debian's sshd (from that root) on the node's address with a host key generated for it;
  the controller logs in as root with a generated client key and a known_hosts file holding
  every node's host key (host key checking stays on).

The role runs with its production defaults: `tts_node_service_manager: system`,
`tts_node_credentials_mode: loadcredential`.

Shared between nodes, read-only, and why: the checkout's venv (torch and the other wheels,
~1 GB: ten copies would cost ten times the disk and the page cache), bind-mounted at
/opt/tts-test-venv; the role still builds each node's own venv at /opt/tts-fleet/venv from
a wheel of this checkout with the node's /usr/bin/python3 (Debian's 3.11, the venv's ABI)
and reaches the shared site-packages through a .pth file (tts_node_venv_extra_site_dirs).
The checkout and the interpreter the checkout's venv was built from are bound read-only at
their own paths (the load client, the p2p probe).

The mirror (nanio or `rclone serve s3`) runs in a network namespace of its own; an
iptables rule in that namespace counts the bytes it sends (mirror egress, measured at the
mirror's side).

Every process of a node lives in its machine's cgroups, so "node down" is a kill of the
whole cgroup and teardown can prove nothing is left. Teardown (`Fleet.close`) always runs:
machines, mounts, cgroups, namespaces, veths, the bridge; a fleet left behind by a killed
test run is removed by the next `Fleet` (state files in /run/tts-fleet-harness and
/run/tts-fleet-nspawn).

No pytest here: tests/test_fleet.py, bench/fleet.py and
bench/p2p.py use it.
Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tts_common.atomic import write_atomic
from tts_testkit import nspawn
from tts_testkit.paths import REPO, SANDBOX_VENV, VENV
from tts_testkit.waits import wait_until

STATE_DIR = Path("/run/tts-fleet-harness")
CGROUP_ROOT = Path("/sys/fs/cgroup")
MIRROR_PORT = 9000
TOOLS = ["ip", "nsenter", "iptables", "ssh", "ssh-keygen", "systemd-nspawn"]


def run(cmd: list[str], timeout: float = 60, check: bool = True, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {out.returncode}: {(out.stderr or out.stdout).strip()[:500]}")
    return out


def unavailable() -> str | None:
    """None when a fleet can be built on this machine, else the reason (for a skip)."""
    if os.geteuid() != 0:
        return "the fleet harness needs root (network namespaces, bridge, mounts, systemd-nspawn)"
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        return f"missing tools for the fleet harness: {', '.join(missing)} (scripts/setup.sh installs them)"
    if (reason := nspawn.unavailable()) is not None:
        return reason
    if not _cgroup_hierarchies():
        return "no writable cgroup hierarchy for the mirror"
    name = f"tfprobe{os.getpid() % 100000}"
    try:
        run(["ip", "netns", "add", name], timeout=30)
        run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], timeout=30)
        run(["ip", "link", "add", f"{name}b", "type", "bridge"], timeout=30)
        run(["ip", "link", "del", f"{name}b"], timeout=30)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"network/mount namespaces unavailable here: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    return None


def _cgroup_hierarchies() -> list[Path]:
    """Where the mirror's cgroup goes (the nodes' machines have their own, nspawn.Machine):
    on a hybrid host the name=systemd v1 hierarchy, the unified one and cpuacct (CPU time);
    on a pure v2 host the unified root."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        roots = [CGROUP_ROOT]
    else:
        roots = [CGROUP_ROOT / "systemd", CGROUP_ROOT / "unified", CGROUP_ROOT / "cpuacct"]
    return [r for r in roots if r.is_dir() and os.access(r, os.W_OK)]


class Cgroup:
    """The mirror's cgroup, in every hierarchy we use."""

    def __init__(self, relpath: str):
        self.dirs = [root / relpath for root in _cgroup_hierarchies()]
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)

    def join(self, pid: int | None = None) -> None:
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(pid or os.getpid()))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs[:1]:
            for procs in d.rglob("cgroup.procs"):
                try:
                    found |= {int(p) for p in procs.read_text().split()}
                except OSError:
                    pass
        return found

    def kill(self, timeout: float = 30) -> None:
        """SIGKILL every process in the subtree until it is empty (new ones may fork)."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes survive SIGKILL in {self.dirs[0]}: {sorted(pids)}")
            time.sleep(0.1)

    def cpu_seconds(self) -> float:
        for d in self.dirs:
            if (d / "cpuacct.usage").exists():
                return int((d / "cpuacct.usage").read_text()) / 1e9
            if (d / "cpu.stat").exists():
                for line in (d / "cpu.stat").read_text().splitlines():
                    if line.startswith("usage_usec"):
                        return int(line.split()[1]) / 1e6
        return 0.0

    def rss_bytes(self) -> int:
        return _rss(self.pids())

    def remove(self, timeout: float = 10) -> None:
        """rmdir the subtree, leaves first; a just-killed process keeps its cgroup busy
        until it is reaped, hence the short bounded retry."""
        deadline = time.monotonic() + timeout
        for d in self.dirs:
            while d.exists():
                for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    try:
                        sub.rmdir()
                    except OSError:
                        pass
                try:
                    d.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.2)


# -- the fleet ---------------------------------------------------------------------------------

# What the nodes' root has beyond the pristine Debian 12 (nspawn.package_layer): the packages
# the roles install from Debian (tts_node's list, read from the role so the two cannot drift,
# and tts_tracker's opentracker) and openssh-server for ansible. Debian's own opentracker
# unit is disabled, as on a host that is not a tracker (the tracker role runs its own).
ROLE_DEFAULTS = REPO / "ansible/roles/tts_node/defaults/main.yml"
EXTRA_PACKAGES = ("openssh-server", "opentracker")
DISABLED_UNITS = ("opentracker.service",)


def fleet_root(log=print) -> nspawn.PristineRoot:
    """The nodes' root: the pristine Debian 12 plus the roles' packages and sshd, cached."""
    packages = yaml.safe_load(ROLE_DEFAULTS.read_text())["tts_node_system_packages"]
    return nspawn.package_layer(nspawn.pristine_root(log=log), [*packages, *EXTRA_PACKAGES], disable=DISABLED_UNITS,
                                log=log)


# The harness's settings for each node's sshd (a drop-in: Debian's sshd_config includes
# sshd_config.d first, and the first value of a setting wins).
SSHD_CONFIG = """\
# Written by tts_testkit/fleet/harness.py for node {name}.
ListenAddress {address}
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
LogLevel ERROR
MaxStartups 100
MaxSessions 100
ClientAliveInterval 10
ClientAliveCountMax 3
"""


class _InsideProcess(subprocess.Popen):
    """A process started with nsenter into a machine's pid namespace: nsenter forks and waits
    for the child, and passes on no signal; terminate() and kill() go to the child (the
    process inside), and nsenter exits with it."""

    _inside: int | None = None

    @property
    def inside_pid(self) -> int | None:
        """The process as the node numbers it (what it writes in its own pid files), while
        it runs."""
        if self._inside is None and self.poll() is None:
            for child in nspawn._children(self.pid):
                self._inside = nspawn._pid_in_namespace(child)
        return self._inside

    def send_signal(self, sig: int) -> None:
        targets = nspawn._children(self.pid) if self.poll() is None else []
        for pid in targets or [self.pid]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


@dataclass
class Node:
    fleet: "Fleet"
    index: int
    name: str
    address: str
    netns: str
    dir: Path
    machine: nspawn.Machine
    host_key: list[str] = field(default_factory=list)

    @property
    def up(self) -> bool:
        return self.machine.process is not None and self.machine.process.poll() is None

    def path(self, inside: str) -> Path:
        """A file of the node as this host reaches it: through its overlay's merged directory
        (the node's disk, also while it is down; not its tmpfs /run and /tmp)."""
        return self.machine.merged / inside.lstrip("/")

    def popen(self, argv: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
        """A process inside the node (its namespaces, root and cgroups), with a clean
        environment plus `env`."""
        inside = {"PATH": nspawn.INSIDE_PATH, "LANG": "C.UTF-8", "HOME": "/root", **(env or {})}
        return _InsideProcess([*self.machine.enter_argv(), "/usr/bin/env", "-i",
                               *[f"{k}={v}" for k, v in inside.items()], *argv], **kw)

    def sh(self, script: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        proc = self.popen(["/bin/sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)
            raise
        out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        if check and out.returncode != 0:
            raise RuntimeError(f"{self.name}: `{script}` exited {out.returncode}: {(stderr or stdout).strip()[-800:]}")
        return out

    def start(self, timeout: float = 300) -> None:
        """Boot the node (systemd starts what is enabled: sshd, the tts units once installed).
        Returns once the system has finished booting and sshd accepts connections. A node
        killed mid-work may boot "degraded" (a unit that failed), as a real host would."""
        if self.up:
            return
        self.machine.boot(timeout=timeout, accept=("running", "degraded"))
        wait_until(lambda: _port_open(self.address, 22), 120, what=f"sshd on {self.name}")

    boot = start

    def kill(self) -> None:
        """The node goes down hard: every process of its machine killed at once (cgroup.kill);
        its disk (the overlay's upper directory) stays for the next boot."""
        self.machine.kill()

    def systemctl(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return self.sh("systemctl " + " ".join(args), timeout=timeout, check=check)

    def cpu_seconds(self) -> float:
        return self.machine.cpu_seconds() or 0.0

    def memory(self) -> dict[str, int] | None:
        return self.machine.memory()

    def rss_bytes(self) -> int:
        return _rss(self.machine.pids())


def _rss(pids) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def _port_open(host: str, port: int) -> bool:
    import socket
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Mirror:
    server: object  # tts_testkit.s3servers.S3Server
    netns: str
    address: str
    cgroup: Cgroup

    def egress_bytes(self) -> int:
        """Bytes the S3 server sent (TCP payload + headers from its port), counted by an
        iptables rule in the mirror's own namespace."""
        out = run(["ip", "netns", "exec", self.netns, "iptables", "-L", "OUTPUT", "-v", "-x", "-n"], timeout=30)
        for line in out.stdout.splitlines():
            if f"spt:{MIRROR_PORT}" in line:
                return int(line.split()[1])
        raise RuntimeError(f"no egress counter in {self.netns}: {out.stdout}")

    def block(self, node: "Node", blocked: bool = True) -> None:
        """Make the mirror unreachable from one node (inside that node's namespace)."""
        action = "-I" if blocked else "-D"
        run(["ip", "netns", "exec", node.netns, "iptables", action, "OUTPUT", "-d", self.address, "-j", "REJECT"],
            timeout=30)


@dataclass
class Fleet:
    """`with Fleet(work, 3) as fleet:` - nodes booted, mirror up; torn down on exit.
    shared_rw: directories of this host bound read-write into every node at their own paths
    (bench/p2p.py runs its provisioners on configurations and caches it reads from here)."""

    work: Path
    size: int
    mirror_kind: str = "nanio"
    shared_rw: tuple[Path, ...] = ()
    tag: str = field(default_factory=lambda: f"{random.randrange(16**4):04x}")
    nodes: list[Node] = field(default_factory=list)
    mirror: Mirror | None = None

    def __post_init__(self) -> None:
        self.work = Path(self.work)
        self.bridge = f"tf{self.tag}br"
        self.subnet = None
        self._netns: list[str] = []
        self._cgroups: list[Cgroup] = []  # the mirror's (the nodes' machines have their own)
        self.root: nspawn.PristineRoot | None = None  # the nodes' root (fleet_root())
        self.boot_s: float | None = None  # how long booting every node took
        self._closed = False

    # -- lifecycle
    def __enter__(self) -> "Fleet":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        cleanup_stale()
        self.work.mkdir(parents=True, exist_ok=True)
        self.root = fleet_root()
        self.subnet = _free_subnet()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        write_atomic(STATE_DIR / self.tag, json.dumps({"owner": os.getpid(), "bridge": self.bridge}))
        run(["ip", "link", "add", self.bridge, "type", "bridge"])
        run(["ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])
        self._ssh_keys()
        self._start_mirror()
        for i in range(1, self.size + 1):
            self.nodes.append(self._make_node(i))
        self._write_known_hosts()
        # Boot in parallel: each waits for its own system and sshd.
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=self.size) as pool:
            for future in [pool.submit(node.start) for node in self.nodes]:
                future.result()
        self.boot_s = round(time.monotonic() - started, 1)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        errors = []
        keep = bool(os.environ.get("TTS_TEST_KEEP_MACHINES"))
        for node in self.nodes:
            try:
                node.kill()
                node.machine.close(keep_files=keep)
            except Exception as exc:  # keep tearing down the rest
                errors.append(f"{node.name}: {exc}")
        if self.mirror:
            try:
                self.mirror.server.stop()
                self.mirror.cgroup.kill()
            except Exception as exc:
                errors.append(f"mirror: {exc}")
        _teardown(self.tag, self._netns, self.bridge, self._cgroups)
        if errors:
            raise RuntimeError("fleet teardown: " + "; ".join(errors))

    # -- parts
    def _ssh_keys(self) -> None:
        self.ssh_dir = self.work / "ssh"
        self.ssh_dir.mkdir(mode=0o700, exist_ok=True)
        self.client_key = self.ssh_dir / "id_ed25519"
        if not self.client_key.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleet-controller", "-f", str(self.client_key)])
        self.known_hosts = self.ssh_dir / "known_hosts"

    def _netns_add(self, name: str, address: str) -> str:
        ns = f"tf{self.tag}-{name}"
        run(["ip", "netns", "add", ns])
        self._netns.append(ns)
        host_if, peer = f"tf{self.tag}{name}"[:15], f"tp{self.tag}{name}"[:15]
        run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer])
        run(["ip", "link", "set", peer, "netns", ns])
        run(["ip", "link", "set", host_if, "master", self.bridge])
        run(["ip", "link", "set", host_if, "up"])
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "link", "set", peer, "name", "eth0"],
                    ["ip", "addr", "add", f"{address}/24", "dev", "eth0"],
                    ["ip", "link", "set", "eth0", "up"]):
            run(["ip", "netns", "exec", ns, *cmd])
        return ns

    def outsider(self, name: str = "outsider", host: int = 200) -> str:
        """A network namespace on the fleet's bridge that no inventory names (a host beside
        the fleet); returns its name, for `ip netns exec`. Torn down with the fleet."""
        return self._netns_add(name, f"{self.subnet}.{host}")

    def _start_mirror(self) -> None:
        from tts_testkit.s3servers import STARTERS

        address = f"{self.subnet}.2"
        ns = self._netns_add("mirror", address)
        cgroup = Cgroup(f"tts-fleet-{self.tag}/mirror")
        self._cgroups.append(cgroup)
        run(["ip", "netns", "exec", ns, "iptables", "-A", "OUTPUT", "-o", "eth0", "-p", "tcp", "--sport",
             str(MIRROR_PORT)])
        server = STARTERS[self.mirror_kind](self.work / "mirror" / "data", port=MIRROR_PORT, host=address,
                                            wrap=("nsenter", f"--net=/run/netns/{ns}"), preexec_fn=cgroup.join)
        self.mirror = Mirror(server, ns, address, cgroup)

    def _make_node(self, i: int) -> Node:
        name = f"node{i:02d}"
        address = f"{self.subnet}.{10 + i}"
        ns = self._netns_add(name, address)
        # Read-only binds: the shared venv where the role's .pth points, the checkout (the
        # load client) and the interpreter the checkout's venv runs on, at their own paths.
        binds = {str(VENV.resolve()): str(SANDBOX_VENV), str(REPO): str(REPO)}
        binds.setdefault(str(Path(sys.base_prefix).resolve()), str(Path(sys.base_prefix).resolve()))
        machine = nspawn.Machine(f"tf{self.tag}-{name}", self.root, self.work / name, binds_ro=binds,
                                 network_namespace_path=f"/run/netns/{ns}",
                                 nspawn_args=(f"--hostname={name}", *[f"--bind={d}:{d}" for d in self.shared_rw]))
        node = Node(self, i, name, address, ns, self.work / name, machine)
        machine.mount()  # the node's disk, written before its first boot: sshd's keys and settings
        ssh = node.path("/etc/ssh")
        key = ssh / "ssh_host_ed25519_key"
        if not key.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{name}", "-f", str(key)])
        node.host_key = (ssh / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        (ssh / "sshd_config.d/tts-fleet-harness.conf").write_text(SSHD_CONFIG.format(name=name, address=address))
        dot_ssh = node.path("/root/.ssh")
        dot_ssh.mkdir(mode=0o700, exist_ok=True)
        (dot_ssh / "authorized_keys").write_text(self.client_key.with_suffix(".pub").read_text())
        (dot_ssh / "authorized_keys").chmod(0o600)
        return node

    def _write_known_hosts(self) -> None:
        self.known_hosts.write_text("".join(f"{n.address} {' '.join(n.host_key)}\n" for n in self.nodes))

    # -- ansible
    def inventory(self, group_vars: dict, path: Path | None = None, hosts: list[Node] | None = None) -> Path:
        """An ordinary YAML inventory: group tts_nodes, one host per node, SSH settings."""
        path = path or self.work / "inventory.yml"
        ssh_args = f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes"
        inventory = {"tts_nodes": {
            "hosts": {n.name: {"ansible_host": n.address} for n in (hosts or self.nodes)},
            "vars": {"ansible_user": "root", "ansible_ssh_private_key_file": str(self.client_key),
                     "ansible_ssh_common_args": ssh_args, "ansible_python_interpreter": "/usr/bin/python3",
                     **group_vars}}}
        path.write_text("# Written by tts_testkit/fleet/harness.py\n" + yaml.safe_dump(inventory, sort_keys=False))
        return path

    def ansible_env(self) -> dict:
        env = dict(os.environ)
        env.update(ANSIBLE_CONFIG=str(REPO / "ansible/ansible.cfg"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
                   ANSIBLE_LOCAL_TEMP=str(self.work / "ansible-local"),
                   ANSIBLE_SSH_CONTROL_PATH_DIR=str(self.work / "cp"),
                   PATH=f"{VENV / 'bin'}:{os.environ.get('PATH', '')}")
        return env

    def playbook(self, playbook: str, *args: str, inventory: Path | None = None, timeout: float = 900,
                 log: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        """`env` adds to ansible_env() (e.g. ANSIBLE_CONFIG of another checkout's ansible/)."""
        cmd = [str(VENV / "bin/ansible-playbook"), "-i", str(inventory or self.work / "inventory.yml"), playbook, *args]
        try:
            out = subprocess.run(cmd, cwd=REPO / "ansible", capture_output=True, text=True, timeout=timeout,
                                 env={**self.ansible_env(), **(env or {})})
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{playbook} timed out after {timeout}s:\n"
                                 f"{(exc.stdout or b'').decode(errors='replace')[-5000:]}") from None
        if log:
            (self.work / log).write_text(out.stdout + "\n--- stderr\n" + out.stderr)
        return out

    def cpu_seconds(self) -> float:
        """CPU time of every node's machine and the mirror so far."""
        return sum(n.cpu_seconds() for n in self.nodes) + sum(c.cpu_seconds() for c in self._cgroups)

    def rss_bytes(self) -> int:
        """Sum of the resident set sizes of every process of the nodes and the mirror (shared
        pages counted once per process: the old harness's measure, kept for comparison)."""
        return sum(n.rss_bytes() for n in self.nodes) + sum(c.rss_bytes() for c in self._cgroups)


def _free_subnet() -> str:
    used = run(["ip", "-4", "-o", "addr"], timeout=30).stdout
    for _ in range(200):
        subnet = f"10.231.{random.randrange(1, 250)}"
        if f" {subnet}." not in used:
            return subnet
    raise RuntimeError("no free 10.231.x.0/24 subnet for the fleet bridge")


def _pids_in_netns(netns: str) -> list[int]:
    try:
        ino = os.stat(f"/run/netns/{netns}").st_ino
    except OSError:
        return []
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.stat(proc / "ns/net").st_ino == ino:
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def _teardown(tag: str, netns: list[str], bridge: str, cgroups: list[Cgroup]) -> None:
    for cg in cgroups:
        try:
            cg.kill()
        except RuntimeError:
            pass
    # Safety net: anything still in a fleet namespace (whatever its cgroup) goes too, or
    # the namespace and its veth would outlive the fleet.
    for ns in netns:
        for pid in _pids_in_netns(ns):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for cg in cgroups:
        cg.remove()
    for ns in netns:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)
    # A deleted namespace takes its veth pair with it, a moment later (the kernel cleans
    # namespaces up asynchronously): wait, bounded, so that nothing is left on return.
    prefix = f"tf{tag}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and prefix in run(["ip", "-o", "link"], timeout=30).stdout:
        time.sleep(0.2)
    for root in _cgroup_hierarchies():
        try:
            (root / f"tts-fleet-{tag}").rmdir()
        except OSError:
            pass
    (STATE_DIR / tag).unlink(missing_ok=True)


def cleanup_stale() -> list[str]:
    """Remove fleets whose owning process is gone (a test run killed mid-way): their machines
    first (nspawn.reap_stale: killed, unmounted), then namespaces, bridge and cgroups."""
    nspawn.reap_stale()
    removed = []
    if not STATE_DIR.is_dir():
        return removed
    for state in STATE_DIR.iterdir():
        if state.name.startswith("."):
            continue  # a state file being written (write_atomic's temporary file)
        try:
            info = json.loads(state.read_text())
            os.kill(int(info["owner"]), 0)
            continue  # still running: someone else's fleet
        except ProcessLookupError:
            pass
        except (ValueError, KeyError, TypeError, OSError):
            continue  # unreadable: not judged (written atomically, so not half-written)
        tag = state.name
        netns = [ns.split()[0] for ns in run(["ip", "netns", "list"], timeout=30).stdout.splitlines()
                 if ns.startswith(f"tf{tag}-")]
        cgroups = []
        for root in _cgroup_hierarchies():
            base = root / f"tts-fleet-{tag}"
            if base.is_dir():
                cgroups += [Cgroup(f"tts-fleet-{tag}/{d.name}") for d in base.iterdir() if d.is_dir()]
        _teardown(tag, netns, f"tf{tag}br", cgroups)
        removed.append(tag)
    return removed
