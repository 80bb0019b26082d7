"""aria2c as a supervised child process, driven over JSON-RPC with aria2p.

aria2c listens on 127.0.0.1 only, on a random port, with a random secret. The secret
goes into a 0600 config file rather than the command line (which any local user can
read in /proc). aria2c's own console output is discarded: its error lines can quote
presigned URLs, which must never reach a log.

Two aria2c processes must never write the same partial files. aria2c gets the
parent-death signal (PR_SET_PDEATHSIG = SIGTERM: the moment the provisioner dies, even
by SIGKILL, aria2c starts its graceful stop, which saves the `.aria2` control files -
SIGKILL would lose up to a second of progress; `--stop-with-process` only polls, and
left it running 1-2 s). Its pid and start time are recorded in `partial/.aria2c.pid`:
a new provisioner that finds that aria2c still alive stops it (SIGTERM, then SIGKILL
after a grace period) and waits until it is gone before it touches `partial/`. An
aria2c that dies while starting is started again (3 tries).
"""

from __future__ import annotations

import base64
import ctypes
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import aria2p
import requests.exceptions
import structlog

from tts_common.atomic import write_atomic
from tts_common.errors import TtsError

from .cache import ARIA2_PID_RECORD
from .config import Aria2Config, P2PConfig
from .transfer import TaskStatus

log = structlog.get_logger(__name__)

PID_RECORD = ARIA2_PID_RECORD
START_TRIES = 3
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

_STATUS_KEYS = ["gid", "status", "completedLength", "totalLength", "downloadSpeed", "errorCode", "errorMessage",
                "files", "bitfield", "pieceLength", "uploadLength", "infoHash", "dir"]


class Aria2Error(TtsError):
    """aria2c could not be started or stopped answering."""


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat):
    with the pid, it names one process (pids are reused, start times are not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    if fields[0] in {"Z", "X"}:  # a zombie writes nothing: as good as gone
        return None
    return int(fields[19])


def _is_aria2c(pid: int) -> bool:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
    except OSError:
        return False
    return os.path.basename(argv0).startswith(b"aria2c")


def _die_with_parent(parent: int):
    def preexec() -> None:
        # Only a pre-resolved C call here: this runs between fork and exec.
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return preexec


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ListenPortTaken(Aria2Error):
    """[p2p] listen_port is held by another process: a configuration error, not retried."""


def check_listen_port(port: int) -> None:
    """aria2 binds the BitTorrent port only when it adds a torrent, and a taken port then
    fails each torrent on its own: say it once, at start. SO_REUSEADDR as aria2 binds, so
    connections of an earlier run in TIME_WAIT are no conflict; a listener is."""
    families = [(socket.AF_INET, "0.0.0.0")] + ([(socket.AF_INET6, "::")] if socket.has_ipv6 else [])
    for family, address in families:
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 on this host
            continue
        with s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind((address, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ListenPortTaken(
                        f"[p2p] listen_port {port} is in use by another process ({exc.strerror}): "
                        f"stop it or set another listen_port") from None
                if exc.errno != errno.EADDRNOTAVAIL:  # an address family without addresses
                    raise


def bittorrent_args(p2p: P2PConfig) -> list[str]:
    """aria2c's global BitTorrent settings for a fleet (docs/p2p.md): peers come from the
    fleet's trackers only (no DHT, no local discovery), a fixed listen port the unit's
    firewall admits, one upload limit for everything seeded, seeds that never stop by
    ratio and take no download slot, no metadata files written beside the data."""
    return [
        f"--listen-port={p2p.listen_port}", "--enable-dht=false", "--enable-dht6=false", "--bt-enable-lpd=false",
        f"--max-overall-upload-limit={p2p.upload_limit}", "--seed-ratio=0.0", "--bt-detach-seed-only=true",
        "--rpc-save-upload-metadata=false", "--bt-save-metadata=false", "--bt-tracker-connect-timeout=10",
        "--bt-tracker-timeout=10",
    ]


class Aria2Process:
    """aria2c as a child process; a `transfer.SeedingEngine` (the download loop's contract)."""

    def __init__(self, cfg: Aria2Config, work_dir: Path, p2p: P2PConfig | None = None):
        self.cfg = cfg
        self.p2p = p2p if p2p is not None and p2p.enabled else None
        self.work_dir = Path(work_dir)
        self.proc: subprocess.Popen | None = None
        self.client: aria2p.Client | None = None
        self.api: aria2p.API | None = None

    def start(self, timeout: float = 15.0) -> None:
        """Start aria2c; one killed or failing while it starts is started again."""
        for attempt in range(1, START_TRIES + 1):
            try:
                self._start_once(timeout)
                return
            except Aria2Error as exc:
                if attempt == START_TRIES or "not found" in str(exc) or isinstance(exc, ListenPortTaken):
                    raise
                log.warning("aria2c failed while starting; starting it again", error=str(exc), attempt=attempt)

    def _stop_recorded(self, timeout: float = 10.0) -> None:
        """Kill and wait out an aria2c a previous provisioner left on partial/."""
        record = self.work_dir / PID_RECORD
        try:
            doc = json.loads(record.read_text())
            pid, started = int(doc["pid"]), int(doc["start_time"])
        except (OSError, ValueError, KeyError, TypeError):
            record.unlink(missing_ok=True)
            return
        if _start_time(pid) == started and _is_aria2c(pid):
            log.warning("an aria2c from an earlier run still holds partial/; stopping it first", pid=pid)
            # SIGTERM (+ SIGCONT, should it be stopped): it saves its control files and exits;
            # SIGKILL only if it does not within the grace period.
            for sig, grace in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
                for s in (sig, signal.SIGCONT):
                    try:
                        os.kill(pid, s)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + grace
                while _start_time(pid) == started and time.monotonic() < deadline:
                    time.sleep(0.01)
                if _start_time(pid) != started:
                    break
            else:
                raise Aria2Error(f"an earlier aria2c (pid {pid}) on {self.work_dir} does not exit")
        record.unlink(missing_ok=True)

    def _write_record(self) -> None:
        record = {"pid": self.proc.pid, "start_time": _start_time(self.proc.pid)}
        write_atomic(self.work_dir / PID_RECORD, json.dumps(record) + "\n")

    def _start_once(self, timeout: float) -> None:
        exe = shutil.which(self.cfg.executable)
        if not exe:
            raise Aria2Error(f"aria2c not found ({self.cfg.executable!r}); install it: apt-get install aria2")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.proc is not None:  # a failed earlier try of ours
            self.stop()
        self._stop_recorded()
        if self.p2p:  # after an earlier aria2c of ours is gone: its port is not a conflict
            check_listen_port(self.p2p.listen_port)
        port, secret = _free_port(), secrets.token_hex(16)
        conf = self.work_dir / ".aria2.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"rpc-secret={secret}\n")
        n = self.cfg.connections
        args = [
            exe, f"--conf-path={conf}",
            "--enable-rpc=true", "--rpc-listen-all=false", f"--rpc-listen-port={port}",
            f"--stop-with-process={os.getpid()}", "--auto-save-interval=1",
            "--continue=true", "--allow-overwrite=true", "--auto-file-renaming=false",
            "--file-allocation=none", "--remote-time=false", "--check-certificate=true",
            f"--max-connection-per-server={n}", f"--split={n}", f"--min-split-size={self.cfg.min_split_size}",
            f"--max-concurrent-downloads={self.cfg.max_concurrent_downloads}",
            f"--max-download-limit={self.cfg.max_download_limit}",
            f"--socket-recv-buffer-size={self.cfg.socket_recv_buffer}",
            # aria2 retries within one task; our loop adds backoff, re-presigning and mirror exclusion.
            "--max-tries=2", "--retry-wait=1", "--connect-timeout=10", "--timeout=30",
            "--max-file-not-found=2", "--uri-selector=inorder",
            # A mirror that trickles: its connection is dropped (code 5) and the policy
            # fails over; the loop adds a per-file deadline (fetch_policy.file_deadline).
            f"--lowest-speed-limit={self.cfg.lowest_speed_limit}",
            # Pieces near the file's start first (geom: in order, then widening gaps)
            # and no write cache: the completed prefix grows early and is on disk when
            # reported, so it is hashed during the download. Measured on 1 GiB: geom
            # 1.34x bare aria2c, inorder 1.39x (but +12% bytes on the wire), default 1.57x.
            # A file resumed from its control file gets `resume_piece_selector` (per task,
            # in add(); geom too by default): bench/sync.py's resume scenario compares the
            # selectors over 20 kills - on 1 GiB neither changed the bytes re-fetched
            # beyond run-to-run noise (what a kill costs is data in flight, as for bare aria2c).
            f"--stream-piece-selector={self.cfg.piece_selector}", "--disk-cache=0",
            f"--dir={self.work_dir}", "--quiet=true", "--summary-interval=0",
            "--disable-ipv6=false", "--max-download-result=1000",
            *(bittorrent_args(self.p2p) if self.p2p else []),
        ]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent(os.getpid()))
        self._write_record()
        self.client = aria2p.Client(host="http://127.0.0.1", port=port, secret=secret, timeout=10)
        self.api = aria2p.API(self.client)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise Aria2Error(f"aria2c exited at start with code {code}")
            try:
                version = self.client.get_version()["version"]
                break
            except (requests.exceptions.RequestException, aria2p.ClientException):
                if time.monotonic() > deadline:
                    self.stop()
                    raise Aria2Error(f"aria2c RPC did not answer within {timeout}s") from None
                time.sleep(0.05)
        log.debug("aria2c started", pid=self.proc.pid, version=version)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if self._idle():
                # Nothing in flight, nothing to save: don't wait for a graceful exit.
                self.proc.kill()
            else:
                # SIGTERM: aria2 saves its control files and exits in about a second
                # (the forceShutdown RPC takes four).
                self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        (self.work_dir / ".aria2.conf").unlink(missing_ok=True)
        (self.work_dir / PID_RECORD).unlink(missing_ok=True)

    def _idle(self) -> bool:
        try:
            return not self.client.tell_active(["gid"]) and not self.client.tell_waiting(0, 1, ["gid"])
        except Exception:  # not answering: treat as busy and let SIGTERM save what it can
            return False

    # -- tasks ---------------------------------------------------------------------
    def add(self, uris: list[str], out: str, resume: bool = False) -> str:
        """Queue one file; `out` is its name in work_dir (resumes from out.aria2 if present)."""
        options = {"dir": str(self.work_dir), "out": out}
        if resume:
            options["stream-piece-selector"] = self.cfg.resume_piece_selector
        download = self.api.add_uris(uris, options=options)
        return download.gid

    def add_torrent(self, torrent: bytes, uris: list[str], directory: Path, options: dict[str, str]) -> str:
        """Queue a torrent (its file is `directory/<name in the torrent>`); `uris` are web seeds."""
        return self.client.add_torrent(base64.b64encode(torrent).decode("ascii"), uris,
                                       {"dir": str(directory), **options})

    def set_web_seeds(self, gid: str, uris: list[str]) -> None:
        """Replace a torrent task's web seeds (fresh presigned URLs)."""
        current = [u["uri"] for u in self.client.get_uris(gid)]
        self.client.change_uri(gid, 1, current, uris)

    def torrent_tasks(self) -> list[TaskStatus]:
        """Every BitTorrent task aria2 holds (downloads and seeds)."""
        found = []
        for raw in [*self.client.tell_active(_STATUS_KEYS), *self.client.tell_waiting(0, 1000, _STATUS_KEYS)]:
            if raw.get("infoHash"):
                found.append(self._status(raw["gid"], raw))
        return found

    def status(self, gid: str) -> TaskStatus:
        return self._status(gid, self.client.tell_status(gid, _STATUS_KEYS))

    @staticmethod
    def _status(gid: str, raw: dict) -> TaskStatus:
        used = []
        for f in raw.get("files", []):
            used.extend(u["uri"] for u in f.get("uris", []) if u.get("status") == "used")
        return TaskStatus(
            gid=gid,
            status=raw.get("status", "error"),
            completed=int(raw.get("completedLength", 0)),
            total=int(raw.get("totalLength", 0)),
            speed=int(raw.get("downloadSpeed", 0)),
            error_code=int(raw.get("errorCode", 0) or 0),
            error_message=raw.get("errorMessage", ""),
            used_uris=tuple(used),
            bitfield=raw.get("bitfield", ""),
            piece_length=int(raw.get("pieceLength", 0) or 0),
            uploaded=int(raw.get("uploadLength", 0) or 0),
            info_hash=raw.get("infoHash", ""),
            dir=raw.get("dir", ""),
        )

    def forget(self, gid: str) -> None:
        """Remove a task (stopping it if active) and its result; keeps files on disk."""
        for call in (self.client.force_remove, self.client.remove_download_result):
            try:
                call(gid)
            except aria2p.ClientException:
                pass
        # force_remove is asynchronous: wait (bounded) until aria2 lets go of the files.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                st = self.client.tell_status(gid, ["status"])["status"]
            except aria2p.ClientException:
                return
            if st in {"removed", "complete", "error"}:
                try:
                    self.client.remove_download_result(gid)
                except aria2p.ClientException:
                    pass
                return
            time.sleep(0.02)
