"""The runtime for tests and benchmarks: the real voice converted to a bundle, published
into a cache through the provisioner's CacheWriter exactly as the provisioner would, and
`tts-runtime serve` as a subprocess on a Unix socket in a temp dir.

The pytest fixtures over these (one bundle, one engine and one cache per session, a
server per module) are in tests/voice_fixtures.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import tomli_w

from mirror.hashing import sha256_file
from mirror.manifest import FileEntry, Manifest
from provisioner.cache import CacheWriter, Snapshot
from tts_testkit.paths import VENV_BIN


def import_voice(out: Path):
    """The bundled Piper voice (joe) converted into a bundle at `out`; the ImportReport."""
    from piper_import import bundled_voice_paths, import_piper

    return import_piper(*bundled_voice_paths(), out)


def voice_bundle_dir(base: Path) -> Path:
    """The real voice as a runtime bundle under `base` (converted once per directory: a
    complete bundle appears by one rename, so a second call only finds it)."""
    out = base / "joe-bundle"
    if not out.is_dir():
        tmp = base / f".joe-bundle-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        import_voice(tmp)
        tmp.rename(out)
    return out


def publish_to_cache(cache_root: Path, name: str, version: str, bundle: Path, set_current: bool = True) -> Snapshot:
    writer = CacheWriter(cache_root)
    entries = []
    for src in sorted(p for p in bundle.iterdir() if p.is_file()):
        digest = sha256_file(src)
        size = src.stat().st_size
        if not writer.has_blob(digest, size):
            tmp = writer.partial_dir / f"{digest}.copy"
            shutil.copyfile(src, tmp)
            writer.add_blob(tmp, digest)
        entries.append(FileEntry(src.name, size, digest))
    manifest = Manifest.build(name, version, entries)
    snap = writer.build_snapshot(manifest, manifest.to_bytes(), None)
    if set_current:
        writer.set_current(name, version)
    return snap


def write_config(path: Path, **values) -> Path:
    """A runtime.toml of `values` (a dict value becomes a table; paths become strings)."""
    path.write_text(tomli_w.dumps(_toml_values(values)))
    return path


def _toml_values(value):
    if isinstance(value, dict):
        return {k: _toml_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_toml_values(v) for v in value]
    return str(value) if isinstance(value, os.PathLike) else value


@dataclass
class ServerProcess:
    process: subprocess.Popen
    socket: Path
    config: Path
    log_path: Path
    hold_file: Path

    @contextmanager
    def held(self, batches: int = 0):
        """Inside this block the inference worker starts no batch ($TTS_RUNTIME_HOLD_FILE) -
        or `batches` more and then none: requests are queued, refused and timed out as behind
        a stalled worker, by mechanism rather than by hoping this machine is slow enough.
        Enter it with an idle worker."""
        self.hold_file.write_text(str(batches) if batches else "")
        try:
            if not batches:
                with self.client(5.0) as c:
                    assert c.get("/v1/status").json()["queue"]["held"] is True
            yield
        finally:
            self.hold_file.unlink(missing_ok=True)

    def metric(self, name: str, **labels) -> float:
        """One sample of /metrics (0 when the series does not exist yet)."""
        from prometheus_client.parser import text_string_to_metric_families

        with self.client(10.0) as c:
            text = c.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://tts",
                            timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        with self.client(5.0) as c:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"runtime exited with {self.process.returncode}:\n{self.log()[-3000:]}")
                try:
                    if c.get("/readyz").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        raise AssertionError(f"runtime not ready within {timeout}s:\n{self.log()[-3000:]}")

    def wait_socket(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"runtime exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            if self.socket.exists():
                with self.client(2.0) as c:
                    try:
                        c.get("/healthz")
                        return
                    except httpx.HTTPError:
                        pass
            time.sleep(0.05)
        raise AssertionError("socket did not appear")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


def start_server(tmp: Path, cache: Path, *, extra_env: dict | None = None, argv: list[str] | None = None,
                 **config) -> ServerProcess:
    """`tts-runtime serve` (or `argv`, given --config after it) on a temp socket."""
    tmp.mkdir(parents=True, exist_ok=True)
    sock = tmp / "rt.sock"
    values = dict(socket_path=str(sock), cache_dir=str(cache), provisioner_runtime_dir=str(tmp / "prov"),
                  device="cpu", log_level="info")
    values.update(config)
    cfg = write_config(tmp / "runtime.toml", **values)
    log_path = tmp / "runtime.log"
    hold = tmp / "hold"
    hold.unlink(missing_ok=True)
    env = dict(os.environ, TTS_LOG_FORMAT="json", TTS_RUNTIME_HOLD_FILE=str(hold), **(extra_env or {}))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*(argv or [str(VENV_BIN / "tts-runtime"), "serve"]), "--config", str(cfg)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parent.parent)
    return ServerProcess(proc, sock, cfg, log_path, hold)


MIXED_WORDS = ("hello world Привет мир γειά σου κόσμε مرحبا بالعالم नमस्ते दुनिया こんにちは 世界 "
               "the quick brown fox").split()


def mixed_scripts(chars: int, seed: int = 1) -> str:
    """Mixed scripts, no punctuation at all: one sentence as far as the text goes (the
    worst text the API admits, for the bounds tests and bench/bounds.py)."""
    import random

    rng = random.Random(seed)
    out = ""
    while len(out) < chars:
        out += rng.choice(MIXED_WORDS) + " "
    return out[:chars].strip()
