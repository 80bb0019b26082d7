"""Models on a test mirror and a provisioner configured for it, for tests and benchmarks:
signing keys, deterministic file contents, objects put byte by byte, provisioner.toml.

Deliberately low-level (raw S3 puts) so tests can publish hostile or broken manifests that
`tts-mirror publish` would refuse to create.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import textwrap
from dataclasses import dataclass
from pathlib import Path

from mirror import layout
from mirror.manifest import FileEntry, Manifest, channel_bytes
from mirror.signing import generate_keypair, load_private_key, sign


@dataclass
class Keys:
    private: Path
    public: Path


def make_keys(tmp: Path) -> Keys:
    keys = Keys(tmp / "mirror.key", tmp / "mirror.pub")
    generate_keypair(keys.private, keys.public)
    return keys


def model_files(seed: int, sizes: dict[str, int]) -> dict[str, bytes]:
    """Deterministic pseudo-random file contents."""
    out = {}
    for i, (path, size) in enumerate(sizes.items()):
        out[path] = (hashlib.sha256(f"{seed}-{i}".encode()).digest() * (size // 32 + 1))[:size]
    return out


def publish_raw(client, bucket: str, name: str, version: str, files: dict[str, bytes], keys: Keys | None,
                channel: str | None = "stable", manifest_bytes: bytes | None = None) -> Manifest | None:
    for path, data in files.items():
        client.put_object(Bucket=bucket, Key=layout.object_key(name, version, path), Body=data)
    manifest = None
    if manifest_bytes is None:
        manifest = Manifest.build(name, version, [
            FileEntry(path, len(data), hashlib.sha256(data).hexdigest()) for path, data in files.items()])
        manifest_bytes = manifest.to_bytes()
    client.put_object(Bucket=bucket, Key=f"models/{name}/{version}/manifest.json", Body=manifest_bytes)
    if keys is not None:
        sig = sign(manifest_bytes, load_private_key(keys.private))
        client.put_object(Bucket=bucket, Key=f"models/{name}/{version}/manifest.json.sig", Body=sig)
    if channel:
        set_channel(client, bucket, name, channel, version)
    return manifest


def set_channel(client, bucket: str, name: str, channel: str, version: str) -> None:
    client.put_object(Bucket=bucket, Key=layout.channel_key(name, channel), Body=channel_bytes(version))


def write_config(tmp: Path, mirrors: list[dict], keys: Keys | None, models: str = 'name = "joe"\nchannel = "stable"',
                 extra: str = "", aria2: str = "") -> Path:
    """Write a provisioner config; each mirror dict: name, endpoint, bucket, credentials_file, priority."""
    parts = [
        f'cache_dir = "{tmp / "cache"}"',
        f'runtime_dir = "{tmp / "run"}"',
        "poll_interval = 1",
        f"require_signature = {'true' if keys else 'false'}",
        f'public_keys = ["{keys.public}"]' if keys else "public_keys = []",
        "disk_margin_mb = 1",
        extra,
        "[aria2]\nconnections = 4\nmin_split_size = \"1M\"\n" + aria2,
    ]
    for m in mirrors:
        parts.append(textwrap.dedent(f"""
            [[mirrors]]
            name = "{m['name']}"
            endpoint = "{m['endpoint']}"
            bucket = "{m['bucket']}"
            credentials_file = "{m['credentials_file']}"
            priority = {m.get('priority', 10)}
        """))
    parts.append("[[models]]\n" + models)
    path = tmp / "provisioner.toml"
    path.write_text("\n".join(parts) + "\n")
    return path


def wait_status(path: Path, predicate, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> dict:
    """Poll (bounded) a status.json until `predicate` holds; fail early if `proc` exits."""
    deadline, last = time.monotonic() + timeout, {}
    for _ in range(int(timeout * 10) + 1):
        try:
            last = json.loads(path.read_text())
            if predicate(last):
                return last
        except (OSError, ValueError):
            pass
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited {proc.returncode}: {proc.stderr.read()[-3000:] if proc.stderr else ''}")
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    raise AssertionError(f"status never matched within {timeout}s; last: {json.dumps(last)[:800]}")
