"""The trust contract: which signed TUF metadata decides what the fleet runs.

One definition, used by the publisher (`tts-mirror`, mirror/trust_repo.py) and by every
node (mirror/trust_client.py through provisioner/mirrors.py). The metadata is The Update
Framework's, read and checked by python-tuf; nothing here re-implements its checks.

Roles (all keys ed25519, PEM files as `tts-mirror keygen` writes them):

| role | signs | keys (production) | expiry |
|---|---|---|---|
| root | every top-level role's keys; rotation = root N+1 signed by N's and its own threshold | offline, threshold >= 2 | 365 d |
| targets | the delegations below, nothing else | offline | 365 d |
| `ci` (delegated) | each published version's manifest, and the CI channels (canary) | the CI's key | 365 d |
| `release` (delegated) | every channel (stable...) | release managers, not the CI; threshold 2 or a separate key | 365 d |
| snapshot | the versions of targets, ci and release (no mix-and-match) | online, the signing host's timer | 7 d |
| timestamp | the snapshot's version (freshness) | online, the signing host's timer | 1 d |

Targets (paths are TUF target paths, not bucket keys):

- `models/<name>/<version>/manifest.json`: the manifest's length and sha256 (role `ci`,
  written by `publish`). A pinned version is looked up here.
- `channels/<name>/<channel>`: the same length and sha256 as that version's manifest,
  `custom = {"version": "<version>"}`. A node follows a channel through this target and
  fetches `models/<name>/<version>/manifest.json`, which must match it byte for byte.

`ci` comes first among the delegations and is searched only for the paths it is given
(manifests and `channels/*/<ci channel>`); any other channel is found only in `release`,
so a target the CI signs for `channels/joe/stable` is never even looked at.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import TargetFile

from tts_common.errors import TtsError

from .manifest import ManifestError, validate_name
from .signing import load_private_key, load_public_key

TOP_ROLES = ("root", "targets", "snapshot", "timestamp")
CI_ROLE = "ci"
RELEASE_ROLE = "release"
DELEGATED_ROLES = (CI_ROLE, RELEASE_ROLE)
ALL_ROLES = TOP_ROLES + DELEGATED_ROLES
DEFAULT_CI_CHANNELS = ("canary",)

# How long each role's metadata stays valid when (re-)signed; the timer re-signs
# snapshot and timestamp once less than half of that is left.
DEFAULT_EXPIRY = {
    "root": timedelta(days=365),
    "targets": timedelta(days=365),
    CI_ROLE: timedelta(days=365),
    RELEASE_ROLE: timedelta(days=365),
    "snapshot": timedelta(days=7),
    "timestamp": timedelta(days=1),
}
SPEC_VERSION = "1.0.31"


class TrustError(TtsError):
    """Signed channel metadata is missing, invalid, expired or cannot be written."""


def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def manifest_target(name: str, version: str) -> str:
    return f"models/{validate_name(name, 'model name')}/{validate_name(version, 'version')}/manifest.json"


def channel_target(name: str, channel: str) -> str:
    return f"channels/{validate_name(name, 'model name')}/{validate_name(channel, 'channel')}"


def ci_paths(ci_channels: tuple[str, ...] | list[str]) -> list[str]:
    return ["models/*/*/manifest.json"] + [f"channels/*/{validate_name(c, 'channel')}" for c in ci_channels]


RELEASE_PATHS = ["channels/*/*"]


def channel_version(target: TargetFile) -> str:
    """The version a channel target names (its custom field), validated like any name."""
    custom: Any = target.custom
    version = custom.get("version") if isinstance(custom, dict) else None
    try:
        return validate_name(version, "channel version")
    except ManifestError as exc:
        raise TrustError(f"signed target {target.path} names no valid version: {exc}") from None


def manifest_targetfile(name: str, version: str, manifest_bytes: bytes, channel: str | None = None) -> TargetFile:
    """The target that pins a manifest's bytes: for the version itself, or for a channel."""
    path = channel_target(name, channel) if channel else manifest_target(name, version)
    target = TargetFile.from_data(path, manifest_bytes, ["sha256"])
    if channel:
        target.unrecognized_fields["custom"] = {"version": validate_name(version, "version")}
    return target


def public_key(path: Path) -> SSlibKey:
    """A TUF key from an ed25519 public key PEM (`tts-mirror keygen`'s .pub)."""
    return SSlibKey.from_crypto(load_public_key(Path(path)))


def signer(path: Path) -> CryptoSigner:
    """A TUF signer from an ed25519 private key PEM (`tts-mirror keygen`'s .key)."""
    return CryptoSigner(load_private_key(Path(path)))


def short_id(keyid: str) -> str:
    """Key ids in messages: enough to tell keys apart, short enough to read."""
    return keyid[:16]
