"""Where things live in a mirror bucket. The one place that spells the keys.

    models/<name>/<version>/<file ...>          immutable once published
    models/<name>/<version>/manifest.json       written last
    models/<name>/<version>/manifest.json.sig   ed25519 signature of the manifest bytes
    channels/<name>/<channel>.json              {"version": "..."}
"""

from __future__ import annotations

from .manifest import MANIFEST_NAME, SIGNATURE_NAME, validate_name, validate_path

MODELS_PREFIX = "models/"
CHANNELS_PREFIX = "channels/"


def version_prefix(name: str, version: str) -> str:
    return f"{MODELS_PREFIX}{validate_name(name, 'model name')}/{validate_name(version, 'version')}/"


def object_key(name: str, version: str, path: str) -> str:
    return version_prefix(name, version) + validate_path(path)


def manifest_key(name: str, version: str) -> str:
    return version_prefix(name, version) + MANIFEST_NAME


def signature_key(name: str, version: str) -> str:
    return version_prefix(name, version) + SIGNATURE_NAME


def channel_key(name: str, channel: str) -> str:
    return f"{CHANNELS_PREFIX}{validate_name(name, 'model name')}/{validate_name(channel, 'channel')}.json"
