"""Minimal Debian 12 machines with a real systemd (252) as PID 1, for tests: systemd-nspawn.

systemd is not PID 1 on the machines the tests run on; inside a container it can be. What
this module gives (docs/testing.md, "A fresh host under a real systemd"):

- `pristine_root()`: `debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,python3
  bookworm` - what an operator's fresh minimal Debian 12 has - built once and cached outside
  the checkout ($TTS_TEST_NSPAWN_CACHE, default /var/cache/tts-fleet-test/nspawn), keyed by
  the debootstrap arguments. The first call builds it (90-140 s, 270 MiB here) and says
  what that cost; later calls reuse it. Nothing ever writes to it.
- `Machine`: one booted container on an overlay of that root (its writes go to an upper
  directory of its own), `systemd-nspawn --boot`, in a cgroup of its own (`cpu_seconds()`,
  a hard `kill()`). `run()`/`sh()` enter it with nsenter and a clean environment;
  `host_path()` reads its files from here. `stop()` is a clean poweroff, `close()` also
  unmounts and removes what the machine wrote. A machine left by a killed test run is
  cleaned up by the next `boot()` of any machine (state under /run/tts-fleet-nspawn).
- `ansible_vars()`: how ansible reaches a machine without SSH: the `tts_nspawn` connection
  (tts_testkit/ansible_plugins/connection; put ANSIBLE_CONNECTION_PLUGINS in
  ansible-playbook's environment) runs each task through `enter_argv()`, modules piped to
  the machine's python3, with a clean environment (nothing of the controller's leaks in).

Networking: by default the machine shares the host's network namespace (apt and pip reach
what the host reaches, 127.0.0.1 is the host's); `network_namespace_path=` joins an
existing namespace instead (a fleet node's). What the container cannot do as a real host
would is listed in docs/testing.md.

Needs root, `debootstrap` and `systemd-container` (scripts/setup.sh installs both), overlayfs
and nsenter; `unavailable()` says why not otherwise.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tts_common.atomic import write_atomic

CACHE_DIR = Path(os.environ.get("TTS_TEST_NSPAWN_CACHE", "/var/cache/tts-fleet-test/nspawn"))
STATE_DIR = Path("/run/tts-fleet-nspawn")
CGROUP_PARENT = "tts-fleet-nspawn"
INSIDE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def unavailable() -> str | None:
    """None when machines can be built and booted here, else the reason."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, overlay mounts, systemd-nspawn)"
    for tool, package in (("debootstrap", "debootstrap"), ("systemd-nspawn", "systemd-container"),
                          ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: run scripts/setup.sh (Debian package {package})"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs"
    return None


# -- the pristine root -----------------------------------------------------------------------

@dataclass(frozen=True)
class RootSpec:
    """The debootstrap call; the cache is keyed by exactly these arguments."""

    suite: str = "bookworm"
    variant: str = "minbase"
    include: tuple[str, ...] = ("systemd", "systemd-sysv", "dbus", "python3")
    mirror: str = "http://deb.debian.org/debian"

    def argv(self, target: Path) -> list[str]:
        return ["debootstrap", f"--variant={self.variant}", f"--include={','.join(self.include)}",
                self.suite, str(target), self.mirror]

    @property
    def key(self) -> str:
        text = " ".join(self.argv(Path("ROOT")))
        return f"{self.suite}-{self.variant}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class PristineRoot:
    path: Path  # the root directory; read-only by convention (machines overlay it)
    spec: RootSpec
    built_now: bool  # this call built it (else: from the cache)
    build: dict  # what building it cost: {"seconds", "bytes", "built_at", "argv"}


def pristine_root(spec: RootSpec = RootSpec(), cache_dir: Path = CACHE_DIR, log=print) -> PristineRoot:
    """The cached root for `spec`, built first if missing (one builder at a time: a lock)."""
    entry = cache_dir / spec.key
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{spec.key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built_now = not (entry / "build.json").exists()
        if built_now:
            _build_root(spec, entry, log)
    build = json.loads((entry / "build.json").read_text())
    if not built_now:
        log(f"nspawn: pristine root {entry} from the cache (built {build['built_at']} in {build['seconds']:.0f} s)")
    return PristineRoot(entry / "root", spec, built_now, build)


def _build_root(spec: RootSpec, entry: Path, log) -> None:
    def debootstrap(root: Path) -> None:
        log(f"nspawn: building the pristine root: {' '.join(spec.argv(root))}")
        out = subprocess.run(spec.argv(root), capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise RuntimeError(f"debootstrap failed ({out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")

    _build_cached(entry, "root", debootstrap, {"argv": spec.argv(Path("ROOT"))}, log)


def _build_cached(entry: Path, what: str, make_root: Callable[[Path], None], record: dict, log) -> None:
    """`make_root(path)` builds a root in a directory beside `entry`; its cost goes into
    build.json and only then does it move into place: the cache never holds a half-built root."""
    tmp = entry.with_name(f".{entry.name}.build-{os.getpid()}")
    _remove_tree(tmp)
    tmp.mkdir(parents=True)
    started = time.monotonic()
    try:
        make_root(tmp / "root")
        # The host's name leaks in (debootstrap, apt); a machine gets its own from nspawn.
        (tmp / "root/etc/hostname").unlink(missing_ok=True)
        seconds = time.monotonic() - started
        size = _tree_bytes(tmp / "root")
        (tmp / "build.json").write_text(json.dumps({
            **record, "seconds": round(seconds, 1), "bytes": size,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        _remove_tree(entry)
        tmp.rename(entry)
    except BaseException:
        _remove_tree(tmp)
        raise
    log(f"nspawn: {what} build cost {seconds:.0f} s wall, {size / 2**20:.0f} MiB on disk ({entry})")


def package_layer(base: PristineRoot, packages: list[str] | tuple[str, ...], disable: tuple[str, ...] = (),
                  cache_dir: Path = CACHE_DIR, log=print) -> PristineRoot:
    """`base` plus `packages` from Debian (apt-get install, recommends as apt's default), built
    once and cached beside the roots, keyed by the base's key and the sorted package list:
    the fleet's nodes, whose network reaches only their bridge, boot on it (docs/testing.md,
    "A fleet on one machine"). Not for the fresh-host test: that one starts from `base` with
    nothing pre-installed. The packages' generated SSH host keys are removed (every machine
    would share them); a machine writes its own. `disable`: units the packages enable that
    the machines should not start (a package's own daemon where a role runs its own)."""
    packages, disable = tuple(sorted(set(packages))), tuple(sorted(set(disable)))
    digest = hashlib.sha256(" ".join(packages + ("--disable",) + disable).encode()).hexdigest()[:12]
    entry = cache_dir / f"{base.spec.key}+pkgs-{digest}"
    with open(cache_dir / f"{entry.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built_now = not (entry / "build.json").exists()
        if built_now:
            _build_layer(base, packages, disable, entry, log)
    build = json.loads((entry / "build.json").read_text())
    if not built_now:
        log(f"nspawn: root + {len(packages)} packages {entry} from the cache (built {build['built_at']} "
            f"in {build['seconds']:.0f} s)")
    return PristineRoot(entry / "root", base.spec, built_now, build)


def _build_layer(base: PristineRoot, packages: tuple[str, ...], disable: tuple[str, ...], entry: Path, log) -> None:
    script = ("set -e; apt-get update -q; apt-get install -y -q " + " ".join(packages)
              + "; apt-get clean; rm -f /etc/ssh/ssh_host_*"
              + "".join(f"; systemctl disable --quiet {unit}" for unit in disable))

    def install(root: Path) -> None:
        log(f"nspawn: building the root + packages: {' '.join(packages)}")
        subprocess.run(["cp", "-a", "--reflink=auto", str(base.path), str(root)], check=True,
                       capture_output=True, timeout=600)
        argv = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", f"--machine=tts-layer-{os.getpid()}",
                "--console=pipe", f"--directory={root}", "--setenv=DEBIAN_FRONTEND=noninteractive",
                "/bin/sh", "-c", script]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            raise RuntimeError(f"apt-get in the layer failed ({out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")

    _build_cached(entry, "root + packages", install,
                  {"base": base.spec.key, "packages": list(packages), "disabled": list(disable)}, log)


def _tree_bytes(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_symlink() and p.is_file())


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) if path.exists() else str(path)
    points = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].encode().decode("unicode_escape")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return points


def _remove_tree(path: Path) -> None:
    """rm -rf that first lets go of anything still mounted below (debootstrap mounts /proc
    in its target; an overlay may still be up after a crash)."""
    for point in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=60)
    if path.exists() or path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)


# -- cgroups ------------------------------------------------------------------------------------

def _cgroup_mounts() -> list[Path]:
    """The hierarchies a machine gets a cgroup in: the unified (v2) one and, on a hybrid host,
    the name=systemd one nspawn also uses, and the v1 memory controller (where the memory
    controller is v1, as here: the machine's memory use; nspawn mounts it read-only inside,
    so every process of the machine stays in that one cgroup)."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, point, fstype, options = line.split()[:4]
        names = options.split(",")
        if fstype == "cgroup2" or (fstype == "cgroup" and ("name=systemd" in names or "memory" in names)):
            found.append(Path(point))
    return found


def _remove_cgroup(path: Path) -> None:
    if not path.is_dir():
        return
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            sub.rmdir()
        except OSError:
            pass
    try:
        path.rmdir()
    except OSError:
        pass


# -- machines ---------------------------------------------------------------------------------

@dataclass
class Machine:
    """One booted container on an overlay of a pristine root (see the module docstring).

    binds_ro: {host path: path inside}, mounted read-only (a wheelhouse, a CA bundle).
    network_namespace_path: join that network namespace instead of sharing the host's.
    """

    name: str
    root: PristineRoot | Path
    work_dir: Path
    binds_ro: dict[str, str] = field(default_factory=dict)
    network_namespace_path: str | None = None
    nspawn_args: tuple[str, ...] = ()
    process: subprocess.Popen | None = None
    leader: int | None = None  # the container's PID 1, as the host sees it
    _mounted_for_boot: bool = field(default=False, repr=False)

    @property
    def merged(self) -> Path:
        return self.work_dir / "merged"

    @property
    def console_log(self) -> Path:
        return self.work_dir / "console.log"

    @property
    def cgroups(self) -> list[Path]:
        return [mount / CGROUP_PARENT / self.name for mount in _cgroup_mounts()]

    def mount(self) -> Path:
        """Mount the overlay (afresh, if it was up) and return its merged directory: what is
        written there before boot() is on the machine's disk when it boots. boot() mounts
        by itself when this was not called."""
        lower = self.root.path if isinstance(self.root, PristineRoot) else Path(self.root)
        for sub in ("upper", "work", "merged"):
            (self.work_dir / sub).mkdir(parents=True, exist_ok=True)
        # A machine booted again after kill()/stop() keeps its disk (the upper directory).
        for point in sorted(_mounts_under(self.merged), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=60)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={lower},upperdir={self.work_dir / 'upper'},workdir={self.work_dir / 'work'}",
                        str(self.merged)], check=True, capture_output=True, timeout=60)
        self._mounted_for_boot = True
        self._save_state()  # a run killed before boot() still has its mount reaped
        return self.merged

    def boot(self, timeout: float = 180, accept: tuple[str, ...] = ("running",)) -> "Machine":
        """Mount the overlay, start systemd-nspawn --boot, wait for `is-system-running` to be
        one of `accept` (a fleet node that was killed mid-work may boot "degraded", as a
        real host would). Again after stop() or kill(): the same disk, a fresh boot."""
        reap_stale()
        if not self._mounted_for_boot:
            self.mount()
        self._mounted_for_boot = False  # the next boot mounts afresh
        procs = []
        for cgroup in self.cgroups:
            cgroup.mkdir(parents=True, exist_ok=True)
            procs.append(str(cgroup / "cgroup.procs"))
        argv = ["systemd-nspawn", "--boot", "--keep-unit", "--register=no", "--link-journal=no",
                f"--machine={self.name}", f"--directory={self.merged}", "--console=read-only",
                *[f"--bind-ro={host}:{inside}" for host, inside in self.binds_ro.items()],
                *([f"--network-namespace-path={self.network_namespace_path}"] if self.network_namespace_path else []),
                *self.nspawn_args]
        # The shell moves itself into the machine's cgroups, then becomes nspawn: every
        # process of the machine is in them from the start.
        script = "".join(f'echo $$ > "{p}"; ' for p in procs) + 'exec "$@"'
        with open(self.console_log, "wb") as console:
            self.process = subprocess.Popen(["/bin/sh", "-c", script, "sh", *argv], stdin=subprocess.DEVNULL,
                                            stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
        self._save_state()
        deadline = time.monotonic() + timeout
        self.leader = self._wait_leader(deadline)
        self._save_state()
        self._wait_running(deadline, accept)
        return self

    def _wait_leader(self, deadline: float) -> int:
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited with {self.process.returncode}:\n{self.console()}")
            for child in _children(self.process.pid):
                if _pid_in_namespace(child) == 1:
                    return child
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: no init process appeared:\n{self.console()}")

    def _wait_running(self, deadline: float, accept: tuple[str, ...]) -> None:
        while True:
            left = max(1.0, deadline - time.monotonic())
            out = self.run("systemctl", "is-system-running", "--wait", timeout=left)
            state = out.stdout.strip()
            # Too early to ask: PID 1 has not yet made /run/systemd/system ("offline") or
            # opened its private bus.
            early = state == "offline" or (not state and "Failed to connect to bus" in out.stderr)
            if not early or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        if state not in accept:
            failed = self.run("systemctl", "--failed", "--no-legend", "--no-pager", timeout=60).stdout
            raise RuntimeError(f"{self.name}: system is {state or out.stderr.strip()}; failed units:\n{failed}\n"
                               f"{self.console()}")

    def console(self, tail: int = 3000) -> str:
        try:
            return self.console_log.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    # -- inside ---------------------------------------------------------------------------

    def run(self, *argv: str, input: str | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run argv inside the machine (all its namespaces, its root), as root, with a clean
        environment plus `env`. Never raises for a non-zero exit: check returncode."""
        inside_env = {"PATH": INSIDE_PATH, "LANG": "C.UTF-8", "HOME": "/root", "TERM": "dumb", **(env or {})}
        cmd = [*self.enter_argv(), "/usr/bin/env", "-i", *[f"{k}={v}" for k, v in inside_env.items()], *argv]
        return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)

    def enter_argv(self) -> list[str]:
        """A command prefix that runs the rest inside the machine: its namespaces and root,
        and its cgroups (so its CPU time counts as the machine's, as on a real host)."""
        if self.leader is None:
            raise RuntimeError(f"{self.name} is not booted")
        procs = [str(c / "cgroup.procs") for c in self.cgroups if (c / "cgroup.procs").exists()]
        script = "".join(f'echo $$ > "{p}"; ' for p in procs) + 'exec "$@"'
        return ["/bin/sh", "-c", script, "sh", "nsenter", f"--target={self.leader}", "--all", "--root", "--wd", "--"]

    def sh(self, script: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run("/bin/sh", "-c", script, **kwargs)

    def host_path(self, inside: str) -> Path:
        """A path inside the machine, as this host reaches it (through its PID 1's root)."""
        if self.leader is None:
            raise RuntimeError(f"{self.name} is not booted")
        return Path(f"/proc/{self.leader}/root") / inside.lstrip("/")

    def cpu_seconds(self) -> float | None:
        """CPU time of every process of the machine so far (cgroup v2 cpu.stat), or None."""
        for cgroup in self.cgroups:
            stat = cgroup / "cpu.stat"
            if stat.exists():
                for line in stat.read_text().splitlines():
                    if line.startswith("usage_usec "):
                        return int(line.split()[1]) / 1e6
        return None

    def memory(self) -> dict[str, int] | None:
        """The machine's memory now and at its peak, in bytes, from its v1 memory cgroup
        (page cache included, as the kernel charges it: `current`, `peak`; `rss` anonymous
        memory, `cache` page cache and tmpfs), or None where there is no such cgroup."""
        for cgroup in self.cgroups:
            if (cgroup / "memory.usage_in_bytes").exists():
                stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
                return {"current": int((cgroup / "memory.usage_in_bytes").read_text()),
                        "peak": int((cgroup / "memory.max_usage_in_bytes").read_text()),
                        "rss": int(stat.get("total_rss", stat.get("rss", 0))),
                        "cache": int(stat.get("total_cache", stat.get("cache", 0)))}
        return None

    def pids(self) -> set[int]:
        """Every process of the machine, as this host numbers them."""
        found: set[int] = set()
        for cgroup in self.cgroups:
            for procs in cgroup.rglob("cgroup.procs") if cgroup.is_dir() else []:
                try:
                    found |= {int(p) for p in procs.read_text().split()}
                except OSError:
                    pass
        return found

    # -- stopping ---------------------------------------------------------------------------

    def stop(self, timeout: float = 90) -> None:
        """A clean poweroff (nspawn passes SIGTERM on to systemd as a poweroff request);
        a hard kill when it does not end in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """The machine goes down hard: every process of it SIGKILLed at once; returns when
        none is left (bounded)."""
        _kill_machine(self.cgroups, self.leader, self.process.pid if self.process else None)
        _wait_empty(self.cgroups)
        if self.process is not None:
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)

    def close(self, keep_files: bool = False) -> None:
        """Stop, unmount, remove the cgroups and (unless keep_files) what the machine wrote."""
        self.stop()
        _unmount_and_forget(self.name, self.merged, self.cgroups)
        if not keep_files:
            _remove_tree(self.work_dir)
        self.leader = None

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc) -> None:
        self.close(keep_files=bool(os.environ.get("TTS_TEST_KEEP_MACHINES")))

    def _save_state(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        # Whole or not at all: a reaper reading a half-written file must not take a live
        # machine for a stale one.
        write_atomic(STATE_DIR / f"{self.name}.json", json.dumps({
            "owner": os.getpid(), "nspawn": self.process.pid if self.process else None, "leader": self.leader,
            "merged": str(self.merged), "cgroups": [str(c) for c in self.cgroups]}))


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _pid_in_namespace(pid: int) -> int | None:
    """The pid as its own (innermost) pid namespace numbers it."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except OSError:
        pass
    return None


def _kill_machine(cgroups: list[Path], leader: int | None, nspawn: int | None) -> None:
    for cgroup in cgroups:
        if (cgroup / "cgroup.kill").exists():
            (cgroup / "cgroup.kill").write_text("1")
            return
    # Without cgroup.kill: SIGKILL to the container's PID 1 ends its whole pid namespace.
    for pid in (leader, nspawn):
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _wait_empty(cgroups: list[Path], timeout: float = 30) -> None:
    """Until no process is left in the cgroups (they die within moments of SIGKILL, but not
    at once: a cgroup still holding one cannot be removed). Bounded: a safety net."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(procs.read_text().strip() for c in cgroups if c.is_dir() for procs in c.rglob("cgroup.procs")):
            return
        time.sleep(0.1)


def _unmount_and_forget(name: str, merged: Path, cgroups: list[Path]) -> None:
    for point in sorted(_mounts_under(merged), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=60)
    for cgroup in cgroups:
        _remove_cgroup(cgroup)
    (STATE_DIR / f"{name}.json").unlink(missing_ok=True)


def reap_stale() -> list[str]:
    """Machines whose owning process is gone (a killed test run): kill, unmount, forget.
    A state file that cannot be read is left alone (state files are written atomically:
    one that vanished was forgotten by its owner meanwhile)."""
    reaped = []
    for state_file in sorted(STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []:
        try:
            state = json.loads(state_file.read_text())
            os.kill(int(state["owner"]), 0)
            continue  # its owner still runs
        except ProcessLookupError:
            pass
        except (OSError, ValueError, KeyError, TypeError):
            continue
        cgroups = [Path(c) for c in state.get("cgroups", [])]
        _kill_machine(cgroups, state.get("leader"), state.get("nspawn"))
        _wait_empty(cgroups)
        _unmount_and_forget(state_file.stem, Path(state.get("merged", "/nonexistent")), cgroups)
        reaped.append(state_file.stem)
    return reaped


# -- ansible --------------------------------------------------------------------------------------

# The connection plugin of tts_nspawn machines (ANSIBLE_CONNECTION_PLUGINS).
ANSIBLE_CONNECTION_PLUGINS = Path(__file__).resolve().parent / "ansible_plugins" / "connection"


def ansible_vars(machine: Machine) -> dict:
    """Inventory variables for reaching `machine` without SSH: the `tts_nspawn` connection
    (tts_testkit/ansible_plugins) runs each task through `machine.enter_argv()` with a clean
    environment, modules piped to the machine's own /usr/bin/python3. Put
    ANSIBLE_CONNECTION_PLUGINS in ansible-playbook's environment."""
    env = [f"{k}={v}" for k, v in {"PATH": INSIDE_PATH, "LANG": "C.UTF-8", "HOME": "/root"}.items()]
    return {"ansible_connection": "tts_nspawn", "ansible_tts_nspawn_enter": [*machine.enter_argv(), "/usr/bin/env",
                                                                            "-i", *env],
            "ansible_python_interpreter": "/usr/bin/python3"}
