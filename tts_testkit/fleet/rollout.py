"""What the fleet test and bench/fleet.py do with a Fleet: publish model versions (good and
deliberately bad ones), build the role's group vars, run a load client on every node and
read its results.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from tts_testkit.fleet.harness import Fleet, Node
from tts_testkit.paths import SANDBOX_VENV, VENV

MODEL = "joe"
NODE_PYTHON = "/opt/tts-fleet/venv/bin/python"  # the venv the role builds on each node


def voice_files(work: Path, version: str, kind: str = "good") -> dict[str, bytes]:
    """The real voice as published at `version`. Every kind passes the manifest's checksums
    (the mirror signs whatever it is given):

    - good: the real weights, re-saved with the version in the safetensors metadata, so
      each version is new bytes to download (as a retrained model would be);
    - broken: the weights zeroed - does not load (a bad export);
    - silent: loads and synthesizes, but the vocoder's output layer is zero: silence;
    - noise: loads and synthesizes, but the vocoder's output layer is random: noise.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from tts_testkit.runtime_server import voice_bundle_dir

    bundle = voice_bundle_dir(work)
    files = {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}
    model = bundle / "model.safetensors"
    if kind == "broken":
        files[model.name] = b"\0" * len(files[model.name])
        return files
    from safetensors import safe_open

    with safe_open(str(model), "pt") as f:
        metadata = dict(f.metadata() or {})
    tensors = load_file(str(model))
    post = tensors["dec.conv_post.weight"]
    if kind == "silent":
        tensors["dec.conv_post.weight"] = torch.zeros_like(post)
    elif kind == "noise":
        gen = torch.Generator().manual_seed(7)
        tensors["dec.conv_post.weight"] = torch.randn(post.shape, generator=gen) * post.std() * 40
    elif kind != "good":
        raise ValueError(f"unknown voice kind {kind!r}")
    metadata["tts_fleet_build"] = f"{version}-{kind}"
    out = work / f"voice-{version}-{kind}.safetensors"
    save_file(tensors, str(out), metadata=metadata)
    files[model.name] = out.read_bytes()
    out.unlink()
    return files


def publish(fleet: Fleet, bucket: str, keys, version: str, kind: str = "good", channel: str | None = None,
            torrents: bool = False) -> int:
    """Publish one version to the fleet's mirror; returns the model's size in bytes.
    torrents: as `tts-mirror publish` does it (a torrent per file, info-hashes in the
    signed manifest: what a p2p fleet needs); else the bare manifest of the files."""
    from tts_testkit.provisioner_setup import publish_raw

    files = voice_files(fleet.work, version, kind)
    if torrents:
        from mirror.publish import publish_dir
        from mirror.remote import Mirror

        folder = fleet.work / f"publish-{version}"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        server = fleet.mirror.server
        publish_dir(folder, name=MODEL, version=version, mirror=Mirror.connect(server.endpoint, bucket, server.credentials),
                    signing_key=keys.private, channel=channel)
        shutil.rmtree(folder)
    else:
        publish_raw(fleet.mirror.server.client(), bucket, MODEL, version, files, keys, channel=channel)
    return sum(len(b) for b in files.values())


def group_vars(fleet: Fleet, bucket: str, keys, wheel: Path, **extra) -> dict:
    """The role's settings for the simulated fleet (what an operator puts in group_vars)."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    server = fleet.mirror.server
    # The role's production defaults (service manager system, credentials loadcredential,
    # its apt packages: already on the nodes' root, so it finds nothing missing).
    variables = {
        "tts_node_package_wheel_src": str(wheel),
        # The wheel without its dependencies; torch and friends come from the shared
        # read-only venv through a .pth file instead of a download per node.
        "tts_node_pip_extra_args": "--no-index --no-deps",
        "tts_node_venv_extra_site_dirs": [str(SANDBOX_VENV / purelib.relative_to(VENV))],
        "tts_node_mirrors": [{"name": "primary", "endpoint": server.endpoint, "bucket": bucket, "priority": 10}],
        "tts_node_mirror_credentials": {"primary": {"access_key": server.credentials.access_key,
                                                    "secret_key": server.credentials.secret_key}},
        "tts_node_public_keys": {"mirror.pub": keys.public.read_text()},
        "tts_node_models": [{"name": MODEL, "channel": "stable"}],
        "tts_node_poll_interval": 30,
        "tts_node_runtime_device": "cpu",
        "tts_node_runtime_settings": {"threads": 1, "max_batch_size": 4, "queue_size": 64, "deadline_s": 300,
                                      "cpu_fallback": True, "max_wait_ms": 10, "max_chars": 5000,
                                      "request_timeout_s": 10, "verify_full_hash": False},
        "tts_node_aria2": {"connections": 2, "min_split_size": "4M", "max_concurrent_downloads": 2,
                           "max_download_limit": "0"},
        "tts_node_wait_ready_timeout": 600,
        "tts_node_gate_timeout": 600,  # safety net: a failed load ends the gate at once
    }
    variables.update(extra)
    return variables


@dataclass
class Clients:
    """One load client per node, each inside its node, writing JSON lines to a host file."""

    fleet: Fleet
    nodes: list[Node]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, text: str = "Fleet check.") -> "Clients":
        for node in self.nodes:
            out = (self.fleet.work / f"client-{node.name}.jsonl").open("ab")
            err = (self.fleet.work / f"client-{node.name}.err").open("ab")
            # The node's own venv (httpx through the shared site-packages); the checkout is
            # bound read-only inside at its own path.
            self.procs[node.name] = node.popen(
                [NODE_PYTHON, str(Path(__file__).with_name("client.py")), "--socket", "/run/tts/runtime.sock",
                 "--text", text], stdout=out, stderr=err)
        return self

    def records(self, name: str) -> list[dict]:
        path = self.fleet.work / f"client-{name}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]

    def wait_answered(self, count: int = 1, timeout: float = 300) -> None:
        """Until every client has `count` more answered requests than now (bounded)."""
        base = {n.name: len(self.records(n.name)) for n in self.nodes}
        deadline = time.monotonic() + timeout
        while any(len(self.records(n.name)) < base[n.name] + count for n in self.nodes):
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise AssertionError(f"load client exited on {dead}: "
                                     + (self.fleet.work / f"client-{dead[0]}.err").read_text()[-2000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"clients answered fewer than {count} requests within {timeout}s")
            time.sleep(0.2)

    def stop(self, timeout: float = 120) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()  # the client finishes its request in flight, then exits
        for proc in self.procs.values():
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def summary(self, since: float = 0.0, new_version: str | None = None) -> dict[str, dict]:
        """Per node: requests sent/answered/failed since `since` (wall time), retried ones,
        the versions served, and when it first served `new_version` (s after `since`)."""
        result = {}
        for node in self.nodes:
            recs = [r for r in self.records(node.name) if r["t0"] >= since]
            failed = [r for r in recs if r["status"] != 200]
            first_new = min((r["t1"] for r in recs if new_version and r["version"] == new_version), default=None)
            result[node.name] = {
                "sent": len(recs), "failed": len(failed), "retried": sum(1 for r in recs if r["retried"]),
                "versions": sorted({r["version"] for r in recs if r["version"]}),
                "first_new_s": None if first_new is None else round(first_new - since, 2),
                "failures": [{k: r[k] for k in ("status", "error", "tries")} for r in failed[:5]],
            }
        return result


def serving(node: Node) -> str | None:
    """The version the node's runtime serves, asked inside the node with tts-ctl."""
    out = node.sh("/opt/tts-fleet/venv/bin/tts-ctl --config /etc/tts-fleet/runtime.toml status --json", check=False)
    if out.returncode != 0:
        return None
    return ((json.loads(out.stdout).get("runtime") or {}).get("models") or {}).get(MODEL, {}).get("version")


def provisioner_status(node: Node) -> dict:
    out = node.sh("/opt/tts-fleet/venv/bin/tts-provisioner --config /etc/tts-fleet/provisioner.toml status --json")
    return json.loads(out.stdout)


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP lines -> {host: {ok: n, changed: n, failed: n, ...}}"""
    import re

    hosts = {}
    for m in re.finditer(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", output, re.M):
        hosts[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return hosts

