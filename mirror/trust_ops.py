"""What `tts-mirror` does to the signed channel metadata: one function per command.

init, publish a version (role `ci`), move a channel (`ci` for the CI's channels,
`release` for the others), add signatures to a staged change, refresh snapshot and
timestamp, rotate and revoke keys, re-sign before expiry. Each reads the verified
state (trust_repo.RepoState), writes the next version of what it changes and, when the
keyring holds the snapshot and timestamp keys, publishes at once (`refresh`); else
the signing host's timer does within its period.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import structlog
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp

from . import layout
from .remote import Mirror
from .trust import (CI_ROLE, DEFAULT_CI_CHANNELS, DEFAULT_EXPIRY, DELEGATED_ROLES, RELEASE_ROLE, TOP_ROLES,
                    TrustError, channel_target, channel_version, manifest_target, manifest_targetfile, now,
                    short_id)
from .trust_repo import (Keyring, RepoState, Staged, _parse, bump, empty_targets, fresh_root, fresh_targets,
                         new_snapshot, new_timestamp, serialize, snapshot_meta)

log = structlog.get_logger(__name__)


@dataclass
class RefreshReport:
    snapshot: int | None = None  # new version written, if any
    timestamp: int | None = None
    roles: dict[str, int] = field(default_factory=dict)  # roles taken into the snapshot
    waiting: str | None = None  # why nothing could be published (no keys)


# --------------------------------------------------------------------------- init


def init(mirror: Mirror, keys: dict[str, list], thresholds: dict[str, int], keyring: Keyring,
         ci_channels: list[str] = list(DEFAULT_CI_CHANNELS)) -> bytes:
    """Create root v1, targets, ci, release, snapshot, timestamp; return root v1's bytes."""
    if mirror.read(layout.tuf_key("1.root.json"), limit=1) is not None:
        raise TrustError(f"bucket {mirror.bucket} already has signed channel metadata (tuf/1.root.json): "
                         "change keys with `tts-mirror trust rotate`, not init")
    root = Metadata(fresh_root(keys, thresholds, now() + DEFAULT_EXPIRY["root"]))
    targets = Metadata(fresh_targets(keys[CI_ROLE], keys[RELEASE_ROLE], thresholds.get(RELEASE_ROLE, 1),
                                     ci_channels))
    state = RepoState(mirror, root)
    state.targets = targets
    docs = {"root": root, "targets": targets}
    for role in DELEGATED_ROLES:
        docs[role] = Metadata(empty_targets(DEFAULT_EXPIRY[role]))
    _sign_all(state, docs, keyring)
    snapshot = Metadata(new_snapshot({}, 1))
    for role in ("targets",) + DELEGATED_ROLES:
        snapshot.signed.meta[f"{role}.json"] = snapshot_meta(docs[role])
    timestamp = Metadata(new_timestamp(snapshot, 1))
    _sign_all(state, {"snapshot": snapshot, "timestamp": timestamp}, keyring)
    keyring.check_all_used("init")
    # Nothing is written until every role verified: a half-initialised bucket would freeze the fleet.
    for role, md in [*docs.items(), ("snapshot", snapshot), ("timestamp", timestamp)]:
        mirror.put(layout.tuf_key(f"1.{role}.json"), serialize(md))
    mirror.put(layout.tuf_key("timestamp.json"), serialize(timestamp))
    log.info("trust.init", bucket=mirror.bucket, ci_channels=ci_channels)
    return serialize(root)


def _sign_all(state: RepoState, docs: dict[str, Metadata], keyring: Keyring) -> None:
    for role, md in docs.items():
        keyids, threshold = state.role_keys(role)
        for s in keyring.for_keyids(keyids):
            md.sign(s, append=True)
        have = len([k for k in keyids if k in md.signatures])
        if have < threshold:
            raise TrustError(f"init: {role} needs {threshold} signature(s), the given --key files hold {have} "
                             f"of its keys ({', '.join(short_id(k) for k in keyids)}); nothing was written")


# --------------------------------------------------------------------------- targets


def channel_role(state: RepoState, name: str, channel: str) -> str:
    """Which delegated role signs this channel: ci if its paths cover it, else release."""
    path = channel_target(name, channel)
    ci = state.targets.signed.delegations.roles[CI_ROLE]
    return CI_ROLE if ci.is_delegated_path(path) else RELEASE_ROLE


def add_version(state: RepoState, name: str, version: str, manifest_bytes: bytes, keyring: Keyring) -> bool:
    """Sign the version's manifest into role ci; False when it was there already."""
    state.check_root_current()
    target = manifest_targetfile(name, version, manifest_bytes)
    current = state.delegated[CI_ROLE].signed.targets.get(target.path)
    if current == target:
        return False
    if current is not None:
        raise TrustError(f"{target.path} is already signed with other bytes: versions are immutable")
    new = bump(state.delegated[CI_ROLE], CI_ROLE)
    new.signed.targets[target.path] = target
    _store_delegated(state, CI_ROLE, new, keyring)
    return True


def set_channel(state: RepoState, name: str, channel: str, version: str, manifest_bytes: bytes,
                keyring: Keyring) -> str | None:
    """Point a channel's signed target at a version; return the version it named before."""
    state.check_root_current()
    role = channel_role(state, name, channel)
    signed_version = state.delegated[CI_ROLE].signed.targets.get(manifest_target(name, version))
    if signed_version is None:
        raise TrustError(f"{name} {version} has no signed manifest target (role ci): publish it with "
                         "`tts-mirror publish` first")
    signed_version.verify_length_and_hashes(manifest_bytes)
    target = manifest_targetfile(name, version, manifest_bytes, channel)
    old = state.delegated[role].signed.targets.get(target.path)
    previous = channel_version(old) if old is not None else None
    new = bump(state.delegated[role], role)
    new.signed.targets[target.path] = target
    _store_delegated(state, role, new, keyring)
    return previous


def _store_delegated(state: RepoState, role: str, md: Metadata, keyring: Keyring) -> None:
    keyids = state.role_keys(role)[0]
    if not any(k in keyring.signers for k in keyids):
        given = ", ".join(short_id(k) for k in keyring.signers) or "none"
        raise TrustError(f"none of the given keys ({given}) is a key of role {role} "
                         f"(its keys: {', '.join(short_id(k) for k in keyids)}); nothing was written")
    state.store(role, md, keyring)
    state.delegated[role] = md


def sign_staged(state: RepoState, role: str, keyring: Keyring) -> tuple[Metadata, list[str]]:
    """Add the keyring's signatures to the staged change of `role`; publish at threshold.
    Returns the metadata and what it changes (one line per target)."""
    raw = state.mirror.read(layout.tuf_staged_key(role), limit=8 * 1024 * 1024)
    if raw is None:
        raise TrustError(f"no staged change for role {role} ({layout.tuf_staged_key(role)} does not exist)")
    md = _parse(raw, layout.tuf_staged_key(role))
    current = state.root if role == "root" else state.role(role)
    if md.signed.version != current.signed.version + 1:
        raise TrustError(f"the staged {role} is v{md.signed.version} but the published one is "
                         f"v{current.signed.version}: it is stale; make the change again")
    keyids = (state.root.signed.roles["root"].keyids + md.signed.roles["root"].keyids if role == "root"
              else state.role_keys(role)[0])
    if not any(k in keyring.signers for k in keyids):
        raise TrustError(f"none of the given keys is a key of role {role}: nothing was signed")
    change = describe_change(state, md, role)
    state.store(role, md, keyring)
    if role == "root":
        state.root = md
    elif role == "targets":
        state.targets = md
    else:
        state.delegated[role] = md
    return md, change


def describe_change(state: RepoState, md: Metadata, role: str) -> list[str]:
    """What a staged version changes, one line per target (for the signer to read)."""
    if role in TOP_ROLES:
        return [f"{role} v{md.signed.version}"]
    before = state.role(role).signed.targets
    lines = []
    for path, target in sorted(md.signed.targets.items()):
        if before.get(path) != target:
            what = target.custom.get("version") if isinstance(target.custom, dict) else None
            lines.append(f"{path} -> {what or target.hashes.get('sha256', '')[:16]}")
    return lines or [f"{role} v{md.signed.version}: no target changes (keys or expiry)"]


# --------------------------------------------------------------------------- refresh


def refresh(state: RepoState, keyring: Keyring, force: bool = False) -> RefreshReport:
    """Take each role's newest valid version into a new snapshot and timestamp when
    something changed or they are past half their life (the timer's job)."""
    state.check_root_current()
    report = RefreshReport()
    taken = state.adopt_newer()
    report.roles = {role: md.signed.version for role, (md, _) in taken.items()}
    snap_ids = state.role_keys("snapshot")[0]
    ts_ids = state.role_keys("timestamp")[0]
    renew_snapshot = force or bool(taken) or _half_life(state.snapshot, "snapshot")
    if renew_snapshot and not any(k in keyring.signers for k in snap_ids):
        report.waiting = "no snapshot key given: the signing host's `tts-mirror trust refresh` timer publishes it"
        return report
    snapshot = state.snapshot
    if renew_snapshot:
        snapshot = Metadata(Snapshot(version=state.snapshot.signed.version + 1,
                                     expires=now() + DEFAULT_EXPIRY["snapshot"],
                                     meta=dict(state.snapshot.signed.meta)))
        for role, (md, raw) in taken.items():
            snapshot.signed.meta[f"{role}.json"] = MetaFile.from_data(md.signed.version, raw, ["sha256"])
        state.store("snapshot", snapshot, keyring)
        state.snapshot, report.snapshot = snapshot, snapshot.signed.version
    if renew_snapshot or force or _half_life(state.timestamp, "timestamp"):
        if not any(k in keyring.signers for k in ts_ids):
            report.waiting = "no timestamp key given: the signing host's timer publishes it"
            return report
        timestamp = Metadata(Timestamp(version=state.timestamp.signed.version + 1,
                                       expires=now() + DEFAULT_EXPIRY["timestamp"],
                                       snapshot_meta=_meta_of_stored(snapshot)))
        state.store("timestamp", timestamp, keyring)
        state.timestamp, report.timestamp = timestamp, timestamp.signed.version
    return report


def _meta_of_stored(snapshot: Metadata) -> MetaFile:
    return snapshot_meta(snapshot)


def _half_life(md: Metadata, role: str) -> bool:
    return md.signed.expires - now() < DEFAULT_EXPIRY[role] / 2


# --------------------------------------------------------------------------- keys


def rotate(state: RepoState, role: str, add: list, remove: list[str], threshold: int | None,
           keyring: Keyring) -> Metadata:
    """Change a role's keys/threshold: top-level roles in a new root (signed by the old
    and the new root threshold), ci/release in a new targets."""
    if role in TOP_ROLES:
        new = bump(state.root, "root")
        _change_keys(new.signed, role, add, remove, threshold)
        previous = state.root.signed
        state.store("root", new, keyring, previous_root=previous)
        state.root = new
        return new
    if role not in DELEGATED_ROLES:
        raise TrustError(f"unknown role {role!r}: one of {', '.join(TOP_ROLES + DELEGATED_ROLES)}")
    new = bump(state.targets, "targets")
    _change_keys(new.signed, role, add, remove, threshold)
    _store_top(state, "targets", new, keyring)
    return new


def _change_keys(signed: Root | Targets, role: str, add: list, remove: list[str], threshold: int | None) -> None:
    current = signed.get_delegated_role(role) if isinstance(signed, Targets) else signed.roles[role]
    for keyid in remove:
        full = _match_keyid(current.keyids, keyid, role)
        signed.revoke_key(full, role)
    for key in add:
        if key.keyid in current.keyids:
            raise TrustError(f"key {short_id(key.keyid)} is already a key of {role}")
        signed.add_key(key, role)
    role_obj = signed.get_delegated_role(role) if isinstance(signed, Targets) else signed.roles[role]
    if threshold is not None:
        role_obj.threshold = threshold
    if len(role_obj.keyids) < role_obj.threshold:
        raise TrustError(f"{role} would have {len(role_obj.keyids)} key(s) for threshold {role_obj.threshold}: "
                         "add a key first (--add) or lower --threshold")
    if role == RELEASE_ROLE and isinstance(signed, Targets):
        ci = set(signed.get_delegated_role(CI_ROLE).keyids)
        if len(ci & set(role_obj.keyids)) >= role_obj.threshold:
            raise TrustError("the CI's keys alone would meet the release threshold: refused")


def _match_keyid(keyids: list[str], given: str, role: str) -> str:
    found = [k for k in keyids if k.startswith(given)]
    if len(found) != 1:
        raise TrustError(f"{given!r} matches {len(found)} key(s) of {role} "
                         f"(its keys: {', '.join(short_id(k) for k in keyids)})")
    return found[0]


def _store_top(state: RepoState, role: str, md: Metadata, keyring: Keyring) -> None:
    if not any(k in keyring.signers for k in state.role_keys(role)[0]):
        raise TrustError(f"changing {role} needs its key(s) ({', '.join(short_id(k) for k in state.role_keys(role)[0])}"
                         "); none was given: nothing was written")
    state.store(role, md, keyring)
    state.targets = md


def revoke(state: RepoState, keyid: str, keyring: Keyring) -> list[str]:
    """Remove a key from every role that lists it; return the roles changed."""
    in_root = [r for r in TOP_ROLES if any(k.startswith(keyid) for k in state.root.signed.roles[r].keyids)]
    delegations = state.targets.signed.delegations.roles
    in_targets = [r for r in delegations if any(k.startswith(keyid) for k in delegations[r].keyids)]
    if not in_root and not in_targets:
        raise TrustError(f"no role has a key starting with {keyid!r}")
    if in_root:
        new = bump(state.root, "root")
        for role in in_root:
            _change_keys(new.signed, role, [], [keyid], None)
        state.store("root", new, keyring, previous_root=state.root.signed)
        state.root = new
    if in_targets:
        new = bump(state.targets, "targets")
        for role in in_targets:
            _change_keys(new.signed, role, [], [keyid], None)
        _store_top(state, "targets", new, keyring)
    return in_root + in_targets


def resign(state: RepoState, role: str, keyring: Keyring, expires: timedelta | None = None) -> Metadata:
    """The same content as a new version with a fresh expiry."""
    if role in ("snapshot", "timestamp"):
        raise TrustError(f"{role} is re-signed by `tts-mirror trust refresh --force`")
    if role == "root":
        new = bump(state.root, "root", expires)
        state.store("root", new, keyring, previous_root=state.root.signed)
        state.root = new
        return new
    new = bump(state.role(role), role, expires)
    if role == "targets":
        _store_top(state, role, new, keyring)
    else:
        _store_delegated(state, role, new, keyring)
    return new


def root_bytes(state: RepoState) -> bytes:
    return serialize(state.root)


__all__ = ["init", "add_version", "set_channel", "sign_staged", "refresh", "rotate", "revoke", "resign",
           "describe_change", "channel_role", "RefreshReport", "Staged", "Keyring", "RepoState"]


# --------------------------------------------------------------------------- publish / promote


def has_metadata(mirror: Mirror) -> bool:
    """Whether this bucket's channels are signed (tuf/1.root.json exists)."""
    return mirror.head(layout.tuf_key("1.root.json")) is not None


@dataclass
class SignedPublish:
    version_signed: bool = False
    channel_role: str | None = None
    previous: str | None = None
    staged: str | None = None  # the Staged message when the threshold is not met yet
    refresh: RefreshReport | None = None


def publish_signed(mirror: Mirror, anchor: bytes | None, keyring: Keyring, name: str, version: str,
                   manifest_bytes: bytes, channel: str | None) -> SignedPublish:
    """Sign a published version (role ci) and, if asked, point a channel at it; then
    publish snapshot and timestamp when the keyring has their keys."""
    if anchor is None:
        raise TrustError(f"bucket {mirror.bucket} has signed channel metadata: pass --trust-root "
                         "(the fleet's root.json) so that changes are signed on verified metadata")
    state = RepoState.load(mirror, anchor)
    out = SignedPublish()
    if channel is not None:
        role = channel_role(state, name, channel)
        if not any(k in keyring.signers for k in state.role_keys(role)[0]):
            raise TrustError(f"channel {channel} is signed by role {role} and no --key of {role} was given: "
                             f"publish without --channel, then promote with a {role} key")
    try:
        out.version_signed = add_version(state, name, version, manifest_bytes, keyring)
        if channel is not None:
            out.channel_role = channel_role(state, name, channel)
            out.previous = set_channel(state, name, channel, version, manifest_bytes, keyring)
    except Staged as exc:
        out.staged = str(exc)
    out.refresh = refresh(state, keyring)
    return out
