"""The publisher's side of the signed channel metadata: read, change, sign, write.

The repository lives in the mirror bucket (`tuf/`, consistent snapshots: every role
version is its own object, only `timestamp.json` is overwritten). Every command reads
the current state *verified* from an anchor root the publisher trusts (the same
root.json the fleet gets): a bucket writer without keys cannot make a publisher sign on
top of forged metadata. Verification uses python-tuf's own `verify_delegate` /
`get_root_verification_result`; expiry is reported, not enforced, so that an expired
timestamp can be refreshed.

A change is signed with the keys of a keyring (private key files) that belong to the
role; with fewer signatures than the role's threshold it is *staged*
(`tuf-staged/<role>.json`) until `trust sign` adds the missing ones. Snapshot and
timestamp are made by `refresh` (the signing host's timer, or any command given
their keys): it takes the newest valid version of each role found in the bucket.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import structlog
from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (DelegatedRole, Delegations, Metadata, MetaFile, Root, Snapshot, TargetFile, Targets,
                              Timestamp)
from tuf.api.serialization.json import JSONSerializer

from . import layout
from .remote import Mirror
from .trust import (CI_ROLE, DEFAULT_EXPIRY, DELEGATED_ROLES, RELEASE_PATHS, RELEASE_ROLE, TOP_ROLES, TrustError,
                    ci_paths, now, short_id, signer)

log = structlog.get_logger(__name__)

MAX_METADATA_BYTES = 8 * 1024 * 1024
_ROLE_FILE = re.compile(r"^(\d+)\.([A-Za-z0-9_-]+)\.json$")
_SERIALIZER = JSONSerializer(compact=True)


class Keyring:
    """Private keys given to a command (`--key`), matched to roles by key id."""

    def __init__(self, paths: list[Path] | tuple[Path, ...] = (), signers: list[CryptoSigner] = ()):
        self.signers: dict[str, tuple[Path, CryptoSigner]] = {}
        for path in paths:
            s = signer(path)
            self.signers[s.public_key.keyid] = (Path(path), s)
        for s in signers:
            self.signers.setdefault(s.public_key.keyid, (Path("<signing key>"), s))
        self.used: set[str] = set()

    def for_keyids(self, keyids: list[str]) -> list[CryptoSigner]:
        found = [self.signers[k][1] for k in keyids if k in self.signers]
        self.used.update(k for k in keyids if k in self.signers)
        return found

    def check_all_used(self, what: str) -> None:
        """A key that signs nothing here is a mistake worth stopping for (wrong file)."""
        unused = [f"{path} (key {short_id(k)})" for k, (path, _) in self.signers.items() if k not in self.used]
        if unused:
            raise TrustError(f"{', '.join(unused)}: not a key of any role {what} signs; nothing was written")


def serialize(md: Metadata) -> bytes:
    return md.to_bytes(_SERIALIZER)


def _parse(data: bytes, what: str) -> Metadata:
    try:
        return Metadata.from_bytes(data)
    except Exception as exc:  # python-tuf raises several types for bad documents
        raise TrustError(f"{what} is not valid TUF metadata: {exc}") from None


@dataclass
class RepoState:
    """The repository as verified from an anchor root (see the module docstring)."""
    mirror: Mirror
    root: Metadata
    timestamp: Metadata | None = None
    snapshot: Metadata | None = None
    targets: Metadata | None = None
    delegated: dict[str, Metadata] = field(default_factory=dict)
    # roles whose newest valid version is not in the snapshot yet: role -> (metadata, bytes)
    pending: dict[str, tuple[Metadata, bytes]] = field(default_factory=dict)

    # -- reading ---------------------------------------------------------------------
    @classmethod
    def load(cls, mirror: Mirror, anchor: bytes) -> "RepoState":
        root = _parse(anchor, "the trust root")
        if root.signed.type != "root":
            raise TrustError(f"the trust root is {root.signed.type} metadata, not root")
        root = cls._walk_roots(mirror, root)
        state = cls(mirror, root)
        if state._read("1.root.json") is None:
            raise TrustError(f"bucket {mirror.bucket} has no signed channel metadata: run `tts-mirror trust init`")
        state.timestamp = state._load_timestamp()
        snap_version = state.timestamp.signed.snapshot_meta.version
        state.snapshot = state._verified("snapshot", state._must(f"{snap_version}.snapshot.json"), root.signed)
        state.targets = state._load_meta_role("targets", root.signed)
        for role in state.targets.signed.delegations.roles:
            state.delegated[role] = state._load_meta_role(role, state.targets.signed)
        state.pending = state.adopt_newer()
        return state

    def adopt_newer(self) -> dict[str, tuple[Metadata, bytes]]:
        """Take, for each role, the newest version in the bucket that is newer than the
        snapshot lists and verifies (a change written but not yet snapshotted: the next
        change builds on it). targets first: it may change who signs the others.
        Returns role -> (metadata, its exact bytes)."""
        newer = newer_in_bucket(self)
        taken: dict[str, tuple[Metadata, bytes]] = {}
        for role in ["targets", *self.targets.signed.delegations.roles]:
            delegator = self.root.signed if role == "targets" else self.targets.signed
            for version in newer.get(role, []):
                raw = self._read(f"{version}.{role}.json")
                try:
                    md = _parse(raw or b"", f"tuf/{version}.{role}.json")
                    delegator.verify_delegate(role, md.signed_bytes, md.signatures)
                    if md.signed.version != version:
                        raise TrustError(f"says version {md.signed.version}")
                except Exception as exc:  # forged or broken: never build on it, never snapshot it
                    log.warning("trust.skip", role=role, version=version, error=str(exc))
                    continue
                taken[role] = (md, raw)
                if role == "targets":
                    self.targets = md
                else:
                    self.delegated[role] = md
                break
        return taken

    @staticmethod
    def _walk_roots(mirror: Mirror, root: Metadata) -> Metadata:
        """Follow N+1.root.json while each is signed by its predecessor's and its own threshold."""
        while True:
            nxt = mirror.read(layout.tuf_key(f"{root.signed.version + 1}.root.json"), limit=MAX_METADATA_BYTES)
            if nxt is None:
                return root
            new = _parse(nxt, f"tuf/{root.signed.version + 1}.root.json")
            try:
                result = new.signed.get_root_verification_result(root.signed, new.signed_bytes, new.signatures)
            except ValueError as exc:
                raise TrustError(f"tuf/{root.signed.version + 1}.root.json: {exc}") from None
            if not result.verified:
                raise TrustError(f"tuf/{root.signed.version + 1}.root.json is not signed by the threshold of "
                                 f"root v{root.signed.version} and its own: refusing to go on")
            root = new

    def _load_timestamp(self) -> Metadata:
        """timestamp.json; if a bucket writer replaced or removed it, the newest valid
        versioned copy (`<v>.timestamp.json`, written beside it), so that the next
        refresh can publish v + 1 and heal the fleet's view."""
        raw = self._read("timestamp.json")
        try:
            if raw is None:
                raise TrustError("tuf/timestamp.json is missing")
            return self._verified("timestamp", raw, self.root.signed)
        except TrustError as exc:
            problem = str(exc)
        versions = sorted((int(m.group(1)) for obj in self.mirror.list_keys(layout.TUF_PREFIX)
                           if (m := _ROLE_FILE.match(obj["Key"][len(layout.TUF_PREFIX):]))
                           and m.group(2) == "timestamp"), reverse=True)
        for version in versions:
            try:
                md = self._verified("timestamp", self._must(f"{version}.timestamp.json"), self.root.signed)
            except TrustError:
                continue
            log.warning("trust.timestamp_replaced", problem=problem, using=version)
            return md
        raise TrustError(f"bucket {self.mirror.bucket}: {problem} and no valid copy is left")

    def _read(self, filename: str) -> bytes | None:
        return self.mirror.read(layout.tuf_key(filename), limit=MAX_METADATA_BYTES)

    def _must(self, filename: str) -> bytes:
        data = self._read(filename)
        if data is None:
            raise TrustError(f"tuf/{filename} is missing from bucket {self.mirror.bucket}")
        return data

    def _verified(self, role: str, data: bytes, delegator) -> Metadata:
        md = _parse(data, f"{role} metadata")
        if md.signed.type != ("targets" if role in DELEGATED_ROLES or role == "targets" else role):
            raise TrustError(f"{role} metadata has type {md.signed.type}")
        try:
            delegator.verify_delegate(role, md.signed_bytes, md.signatures)
        except (UnsignedMetadataError, ValueError) as exc:
            raise TrustError(f"{role} v{md.signed.version} in the bucket does not verify: {exc}") from None
        return md

    def _load_meta_role(self, role: str, delegator) -> Metadata:
        meta = self.snapshot.signed.meta.get(f"{role}.json")
        if meta is None:
            raise TrustError(f"snapshot v{self.snapshot.signed.version} does not list {role}")
        md = self._verified(role, self._must(f"{meta.version}.{role}.json"), delegator)
        if md.signed.version != meta.version:
            raise TrustError(f"tuf/{meta.version}.{role}.json says version {md.signed.version}")
        return md

    def role(self, name: str) -> Metadata:
        return {"root": self.root, "timestamp": self.timestamp, "snapshot": self.snapshot,
                "targets": self.targets}.get(name) or self.delegated[name]

    def delegator(self, role: str):
        return self.root.signed if role in TOP_ROLES else self.targets.signed

    def role_keys(self, role: str) -> tuple[list[str], int]:
        r = self.delegator(role).get_delegated_role(role)
        return list(r.keyids), r.threshold

    def check_root_current(self) -> None:
        if self.root.signed.is_expired(now()):
            raise TrustError(f"root v{self.root.signed.version} expired at {self.root.signed.expires.isoformat()}: "
                             "the fleet refuses everything under it; re-sign it first with "
                             "`tts-mirror trust resign root --key ROOT_KEY ...` (threshold of root keys)")

    # -- writing ---------------------------------------------------------------------
    def store(self, role: str, md: Metadata, keyring: Keyring, previous_root: Root | None = None) -> bool:
        """Sign `md` with the keyring's keys of `role`; write it if the threshold is met,
        else stage it. True when written."""
        if role == "root":
            prev = previous_root or self.root.signed
            keyids = list(dict.fromkeys(prev.roles["root"].keyids + md.signed.roles["root"].keyids))
        else:
            keyids = self.role_keys(role)[0]
        signers = keyring.for_keyids(keyids)
        for s in signers:
            md.sign(s, append=True)
        payload = md.signed_bytes
        if role == "root":
            result = md.signed.get_root_verification_result(previous_root or self.root.signed, payload,
                                                            md.signatures)
            missing = (result.first.missing, result.second.missing)
            done, need = result.verified, f"{max(missing)} more root signature(s) (old and new root thresholds)"
        else:
            result = self.delegator(role).get_verification_result(role, payload, md.signatures)
            done, need = result.verified, f"{result.missing} more of threshold {result.threshold}"
        if not done:
            self.mirror.put(layout.tuf_staged_key(role), serialize(md))
            log.info("trust.staged", role=role, version=md.signed.version, signatures=len(md.signatures))
            raise Staged(role, md.signed.version, len(md.signatures), need)
        data = serialize(md)
        self.mirror.put(layout.tuf_key(f"{md.signed.version}.{role}.json"), data)
        if role == "timestamp":  # what nodes read; the versioned copy is the publisher's fallback
            self.mirror.put(layout.tuf_key("timestamp.json"), data)
        if self.mirror.head(layout.tuf_staged_key(role)) is not None:
            self.mirror.client.delete_object(Bucket=self.mirror.bucket, Key=layout.tuf_staged_key(role))
        log.info("trust.written", role=role, version=md.signed.version)
        return True


class Staged(TrustError):
    """A change is signed by fewer keys than its role's threshold: staged, not published."""

    exit_code = 1

    def __init__(self, role: str, version: int, signatures: int, need: str):
        self.role, self.version = role, version
        super().__init__(
            f"{role} v{version} has {signatures} signature(s), needs {need}: staged as "
            f"{layout.tuf_staged_key(role)}, not published; another holder of a {role} key runs "
            f"`tts-mirror trust sign {role} --key KEY`")


def bump(md: Metadata, role: str, expires: timedelta | None = None) -> Metadata:
    """The next version of a role's metadata: version + 1, fresh expiry, no signatures."""
    new = Metadata.from_bytes(serialize(md))
    new.signatures.clear()
    new.signed.version += 1
    new.signed.expires = now() + (expires or DEFAULT_EXPIRY[role])
    return new


def fresh_root(keys: dict[str, list], thresholds: dict[str, int], expires: datetime) -> Root:
    root = Root(expires=expires, consistent_snapshot=True)
    for role in TOP_ROLES:
        for key in keys[role]:
            root.add_key(key, role)
        root.roles[role].threshold = thresholds.get(role, 1)
        if len(keys[role]) < root.roles[role].threshold:
            raise TrustError(f"{role} has {len(keys[role])} key(s), fewer than its threshold "
                             f"{root.roles[role].threshold}")
    return root


def fresh_targets(ci_keys: list, release_keys: list, release_threshold: int, ci_channels: list[str]) -> Targets:
    if len(release_keys) < release_threshold:
        raise TrustError(f"release has {len(release_keys)} key(s), fewer than its threshold {release_threshold}")
    ci_ids = {k.keyid for k in ci_keys}
    if release_threshold <= len([k for k in release_keys if k.keyid in ci_ids]):
        raise TrustError("the CI's keys alone would meet the release threshold: the CI must not be able to "
                         "move stable (use other release keys or a higher --release-threshold)")
    keys = {k.keyid: k for k in ci_keys + release_keys}
    roles = {
        CI_ROLE: DelegatedRole(CI_ROLE, [k.keyid for k in ci_keys], 1, False, paths=ci_paths(ci_channels)),
        RELEASE_ROLE: DelegatedRole(RELEASE_ROLE, [k.keyid for k in release_keys], release_threshold, False,
                                    paths=list(RELEASE_PATHS)),
    }
    return Targets(expires=now() + DEFAULT_EXPIRY["targets"], delegations=Delegations(keys, roles))


def newer_in_bucket(state: RepoState) -> dict[str, list[int]]:
    """Role -> versions present in the bucket above what the snapshot lists (newest first)."""
    listed = {name.removesuffix(".json"): m.version for name, m in state.snapshot.signed.meta.items()}
    found: dict[str, list[int]] = {}
    for obj in state.mirror.list_keys(layout.TUF_PREFIX):
        match = _ROLE_FILE.match(obj["Key"][len(layout.TUF_PREFIX):])
        if match and match.group(2) in listed and int(match.group(1)) > listed[match.group(2)]:
            found.setdefault(match.group(2), []).append(int(match.group(1)))
    return {role: sorted(v, reverse=True) for role, v in found.items()}


def snapshot_meta(md: Metadata) -> MetaFile:
    return MetaFile.from_data(md.signed.version, serialize(md), ["sha256"])


def target_map(md: Metadata) -> dict[str, TargetFile]:
    return dict(md.signed.targets)


def empty_targets(expires: timedelta) -> Targets:
    return Targets(expires=now() + expires)


def new_snapshot(meta: dict[str, MetaFile], version: int) -> Snapshot:
    return Snapshot(version=version, expires=now() + DEFAULT_EXPIRY["snapshot"], meta=meta)


def new_timestamp(snapshot: Metadata, version: int) -> Timestamp:
    return Timestamp(version=version, expires=now() + DEFAULT_EXPIRY["timestamp"],
                     snapshot_meta=snapshot_meta(snapshot))
