"""The main job on the embedded default, end to end, through the CLIs an operator types:

  local S3 server (nanio; TTS_DEMO_S3=rclone for rclone serve s3) -> tts-mirror keygen (one key per
  role) / trust init (signed channel metadata, root.json) / import-piper (bundled joe voice) /
  publish to canary (the CI's key) / promote to stable (a release key) -> tts-provisioner sync -> tts-runtime serve on a Unix socket -> tts-ctl synth -> WAV

Everything lives under ./demo-out (or $TTS_DEMO_DIR); the S3 server and the runtime
are stopped at the end. Prints the snapshot that was provisioned and the WAV's path.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import tomli_w

from tts_testkit.paths import REPO
from tts_testkit.s3servers import STARTERS  # the same S3 servers the tests use

BIN = Path(sys.executable).parent
ROLE_KEYS = ("root", "targets", "snapshot", "timestamp", "ci", "release")
TEXT = "Hello from tts fleet. The model cache is verified, and the runtime is ready."


def step(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


def run(*args: str, log: Path) -> subprocess.CompletedProcess:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(args)}\n")
        f.flush()
        result = subprocess.run(args, stdout=subprocess.PIPE, stderr=f, text=True)
    if result.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        sys.exit(f"demo: `{' '.join(args[:2])}` failed (exit {result.returncode}); last log lines:\n"
                 + "\n".join(tail))
    return result


def stop(proc: subprocess.Popen | None) -> None:
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    out = Path(os.environ.get("TTS_DEMO_DIR", REPO / "demo-out")).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = out / "demo.log"
    env = dict(os.environ, TTS_LOG_FORMAT="json")
    os.environ.update(env)
    tool = lambda name: str(BIN / name)  # noqa: E731 - the venv's console scripts

    kind = os.environ.get("TTS_DEMO_S3", "nanio")
    if kind not in STARTERS:
        sys.exit(f"demo: TTS_DEMO_S3={kind!r} is not a known S3 server; choose one of {sorted(STARTERS)}")
    step(f"starting a local S3 server ({kind}) on 127.0.0.1")
    try:
        server = STARTERS[kind](out / "s3-data")  # logs to demo-out/<kind>-<port>.log
    except (RuntimeError, TimeoutError) as exc:
        sys.exit(f"demo: the S3 server did not start: {exc}")
    s3, endpoint = server.process, server.endpoint
    creds = server.write_credentials(out / "mirror-credentials.toml")
    runtime = None
    try:
        keys = out / "keys"
        step("creating one key per role and the mirror's signed channel metadata (trust root)")
        # A demo keeps every key in one place; production keeps root and release keys offline.
        for role in ROLE_KEYS:
            run(tool("tts-mirror"), "keygen", "--out-dir", str(keys), "--name", role, log=log)
        mirror_args = ["--endpoint", endpoint, "--bucket", "tts-models", "--credentials", str(creds)]
        init = ["--root-key", str(keys / "root.pub"), "--root-threshold", "1"]
        for role in ("targets", "snapshot", "timestamp", "ci", "release"):
            init += [f"--{role}-key", str(keys / f"{role}.pub")]
        run(tool("tts-mirror"), "trust", "init", *mirror_args, "--create-bucket", *init,
            *[arg for role in ROLE_KEYS for arg in ("--key", str(keys / f"{role}.key"))],
            "--out", str(out / "root.json"), log=log)
        online = ["--trust-root", str(out / "root.json"), "--key", str(keys / "snapshot.key"),
                  "--key", str(keys / "timestamp.key")]
        step("importing the bundled voice (en_US-joe-medium)")
        run(tool("tts-mirror"), "import-piper", "--bundled", "--out", str(out / "bundle"), log=log)
        step("publishing joe 1.0.0 to canary (the CI's key), promoting it to stable (a release key)")
        run(tool("tts-mirror"), "publish", str(out / "bundle"), "--name", "joe", "--version", "1.0.0",
            "--channel", "canary", *mirror_args, "--signing-key", str(keys / "ci.key"), *online, log=log)
        run(tool("tts-mirror"), "promote", "joe", "1.0.0", "--channel", "stable", *mirror_args, *online,
            "--key", str(keys / "release.key"), log=log)

        cache, prov_run = out / "cache", out / "run-provisioner"
        prov_cfg = out / "provisioner.toml"
        prov_cfg.write_text(tomli_w.dumps({
            "cache_dir": str(cache), "runtime_dir": str(prov_run),
            "trust": {"root": str(out / "root.json")},
            "mirrors": [{"name": "local", "endpoint": endpoint, "bucket": "tts-models", "credentials_file": str(creds)}],
            "models": [{"name": "joe", "channel": "stable"}],
        }))
        step("provisioning the cache with tts-provisioner sync (aria2, sha256-verified)")
        result = run(tool("tts-provisioner"), "--config", str(prov_cfg), "sync", log=log)
        print(result.stdout.strip(), flush=True)
        snapshot = (cache / "current" / "joe").resolve()
        print(f"snapshot: {snapshot}", flush=True)

        sock = out / "runtime.sock"
        rt_cfg = out / "runtime.toml"
        rt_cfg.write_text(tomli_w.dumps({"socket_path": str(sock), "cache_dir": str(cache),
                                         "provisioner_runtime_dir": str(prov_run), "models": ["joe"],
                                         "device": "cpu"}))
        step(f"starting tts-runtime on {sock}")
        runtime = subprocess.Popen([tool("tts-runtime"), "serve", "--config", str(rt_cfg)],
                                   stdout=subprocess.DEVNULL, stderr=open(out / "runtime.log", "w"), env=env)
        run(tool("tts-ctl"), "--socket", str(sock), "wait-ready", "--timeout", "120", log=log)
        wav = out / "hello.wav"
        step("synthesizing with tts-ctl")
        run(tool("tts-ctl"), "--socket", str(sock), "synth", TEXT, "-o", str(wav), "--seed", "1", log=log)
        print(f"wav: {wav}", flush=True)
    finally:
        stop(runtime)
        stop(s3)


if __name__ == "__main__":
    main()
