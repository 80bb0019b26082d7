"""`tts-mirror trust ...`: set up and keep the signed channel metadata.

init, status, refresh (the signing host's timer), sign (add a signature to a staged
change), rotate, revoke, resign. Every command reads the repository verified from
`--trust-root` (the fleet's root.json; any earlier version works: the chain is
followed) and signs with the `--key` files that belong to the roles it writes.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import click

from tts_common.atomic import write_atomic
from tts_common.errors import UsageError

from . import trust_ops
from .trust import CI_ROLE, DEFAULT_CI_CHANNELS, RELEASE_ROLE, TOP_ROLES, DELEGATED_ROLES, TrustError, now, \
    public_key, short_id
from .trust_repo import Keyring, RepoState

ENV_TRUST_ROOT = "TTS_MIRROR_TRUST_ROOT"
ENV_KEYS = "TTS_MIRROR_KEYS"


def trust_root_option(required: bool):
    return click.option(
        "--trust-root", type=click.Path(dir_okay=False, exists=True, path_type=Path), envvar=ENV_TRUST_ROOT,
        show_envvar=True, required=required,
        help="The fleet's root.json (any version of it): what is read from the bucket is verified from here.")


def keys_option(f):
    return click.option(
        "--key", "keys", multiple=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
        envvar=ENV_KEYS, show_envvar=True,
        help="Private key (ed25519 PEM) to sign with; repeatable. Each signs the roles it is a key of "
        f"(environment: paths separated by spaces).")(f)


def read_root(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TrustError(f"cannot read the trust root {path}: {exc.strerror}") from None


def _days(ctx, param, value):
    if value is None:
        return None
    match = re.fullmatch(r"(\d+)([dh]?)", value)
    if not match or int(match.group(1)) == 0:
        raise click.BadParameter(f"{value!r}: use a number of days (30 or 30d) or hours (12h)")
    n = int(match.group(1))
    return timedelta(hours=n) if match.group(2) == "h" else timedelta(days=n)


def register(main: click.Group, mirror_options, connect) -> None:
    """Add the `trust` group to tts-mirror (mirror_options/connect come from cli.py)."""

    @main.group()
    def trust() -> None:
        """Signed, expiring channel metadata (TUF): init, keys, signatures, refresh.

        Nodes with `[trust] root` follow only what this metadata says (docs/mirror.md).
        """

    @trust.command()
    @mirror_options
    @click.option("--root-key", multiple=True, required=True, type=click.Path(exists=True, path_type=Path),
                  help="Root public key (repeatable; keep the private keys offline).")
    @click.option("--root-threshold", type=click.IntRange(1, 16), default=2, show_default=True,
                  help="Root signatures needed (>= 2 in production).")
    @click.option("--targets-key", multiple=True, required=True, type=click.Path(exists=True, path_type=Path))
    @click.option("--snapshot-key", multiple=True, required=True, type=click.Path(exists=True, path_type=Path),
                  help="The signing host's key (the refresh timer).")
    @click.option("--timestamp-key", multiple=True, required=True, type=click.Path(exists=True, path_type=Path),
                  help="The signing host's key (the refresh timer).")
    @click.option("--ci-key", multiple=True, required=True, type=click.Path(exists=True, path_type=Path),
                  help="The CI's key: publishes versions and moves the --ci-channel channels.")
    @click.option("--release-key", multiple=True, required=True, type=click.Path(exists=True, path_type=Path),
                  help="Release managers' keys: move every other channel (stable). Not the CI's.")
    @click.option("--release-threshold", type=click.IntRange(1, 16), default=1, show_default=True)
    @click.option("--ci-channel", multiple=True, default=DEFAULT_CI_CHANNELS, show_default=True,
                  help="Channels the CI's key may move (repeatable).")
    @keys_option
    @click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
                  help="Write root v1 here: the file every node gets as [trust] root.")
    @click.option("--create-bucket", is_flag=True, help="Create the bucket if it does not exist.")
    def init(endpoint, bucket, credentials, root_key, root_threshold, targets_key, snapshot_key, timestamp_key,
             ci_key, release_key, release_threshold, ci_channel, keys, out, create_bucket) -> None:
        """Create the signed metadata of a mirror (root v1 and every role), signed with --key.

        Needs the private keys of every role's threshold (a one-time ceremony); writes
        nothing unless every role verifies.
        """
        pubs = {"root": root_key, "targets": targets_key, "snapshot": snapshot_key, "timestamp": timestamp_key,
                CI_ROLE: ci_key, RELEASE_ROLE: release_key}
        layout_keys = {role: [public_key(p) for p in paths] for role, paths in pubs.items()}
        mirror = connect(endpoint, bucket, credentials)
        mirror.check_bucket(create=create_bucket)
        root = trust_ops.init(mirror, layout_keys, {"root": root_threshold, RELEASE_ROLE: release_threshold},
                              Keyring(keys), list(ci_channel))
        write_atomic(out, root)
        click.echo(f"signed channel metadata created in {bucket}; root v1 written to {out} "
                   f"(root threshold {root_threshold}, release threshold {release_threshold}, "
                   f"CI channels: {', '.join(ci_channel)})")

    _register_status(trust, mirror_options, connect)
    _register_keys(trust, mirror_options, connect)


def _register_status(trust: click.Group, mirror_options, connect) -> None:
    @trust.command()
    @mirror_options
    @trust_root_option(True)
    def status(endpoint, bucket, credentials, trust_root) -> None:
        """Each role's version, expiry, keys and threshold; staged changes."""
        state = RepoState.load(connect(endpoint, bucket, credentials), read_root(trust_root))
        for role in TOP_ROLES + tuple(state.delegated):
            md = state.role(role)
            keyids, threshold = state.role_keys(role)
            left = md.signed.expires - now()
            warn = " EXPIRED" if left.total_seconds() <= 0 else (" (expires soon)" if left < timedelta(days=30)
                                                                 and role not in ("snapshot", "timestamp") else "")
            click.echo(f"{role:10} v{md.signed.version:<5} expires {md.signed.expires.isoformat()}{warn}  "
                       f"threshold {threshold} of {', '.join(short_id(k) for k in keyids)}")
        for obj in state.mirror.list_keys("tuf-staged/"):
            click.echo(f"staged: {obj['Key']}")

    @trust.command()
    @mirror_options
    @trust_root_option(True)
    @keys_option
    @click.option("--force", is_flag=True, help="Re-sign snapshot and timestamp even if nothing changed.")
    def refresh(endpoint, bucket, credentials, trust_root, keys, force) -> None:
        """Publish new snapshot and timestamp metadata (the signing host's timer runs this).

        Takes the newest valid version of every role found in the bucket; re-signs
        snapshot and timestamp past half their life. Needs their keys (--key).
        """
        state = RepoState.load(connect(endpoint, bucket, credentials), read_root(trust_root))
        keyring = Keyring(keys)
        report = trust_ops.refresh(state, keyring, force=force)
        if report.waiting:
            raise TrustError(report.waiting)
        keyring.check_all_used("refresh")
        taken = ", ".join(f"{r} v{v}" for r, v in report.roles.items()) or "no role changes"
        click.echo(f"snapshot {'v%d' % report.snapshot if report.snapshot else 'unchanged'}, timestamp "
                   f"{'v%d' % report.timestamp if report.timestamp else 'unchanged'} ({taken})")

    @trust.command()
    @click.argument("role", type=click.Choice(list(TOP_ROLES + DELEGATED_ROLES)))
    @mirror_options
    @trust_root_option(True)
    @keys_option
    def sign(role, endpoint, bucket, credentials, trust_root, keys) -> None:
        """Add --key's signature to the staged change of ROLE; publish it at its threshold."""
        state = RepoState.load(connect(endpoint, bucket, credentials), read_root(trust_root))
        keyring = Keyring(keys)
        md, change = trust_ops.sign_staged(state, role, keyring)
        for line in change:
            click.echo(f"signed: {line}")
        report = trust_ops.refresh(state, keyring)
        click.echo(f"{role} v{md.signed.version} published" + (f"; {report.waiting}" if report.waiting else ""))


def _register_keys(trust: click.Group, mirror_options, connect) -> None:
    @trust.command()
    @click.argument("role", type=click.Choice(list(TOP_ROLES + DELEGATED_ROLES)))
    @mirror_options
    @trust_root_option(True)
    @keys_option
    @click.option("--add", "add", multiple=True, type=click.Path(exists=True, path_type=Path),
                  help="Public key to add to ROLE (repeatable).")
    @click.option("--remove", "remove", multiple=True, help="Key id (or its first characters) to remove.")
    @click.option("--threshold", type=click.IntRange(1, 16))
    @click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
                  help="Write the new root here (top-level roles change the root).")
    def rotate(role, endpoint, bucket, credentials, trust_root, keys, add, remove, threshold, out) -> None:
        """Change ROLE's keys or threshold.

        root/targets/snapshot/timestamp: a new root version, signed by the threshold
        of the old root and of the new one (nodes follow the chain). ci/release: a new
        targets version (targets key). Snapshot and timestamp are re-signed when their
        keys are given.
        """
        if not add and not remove and threshold is None:
            raise UsageError("nothing to change: give --add, --remove or --threshold")
        state = RepoState.load(connect(endpoint, bucket, credentials), read_root(trust_root))
        keyring = Keyring(keys)
        md = trust_ops.rotate(state, role, [public_key(p) for p in add], list(remove), threshold, keyring)
        _after_key_change(state, keyring, md, out)

    @trust.command()
    @click.argument("keyid")
    @mirror_options
    @trust_root_option(True)
    @keys_option
    @click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the new root here.")
    def revoke(keyid, endpoint, bucket, credentials, trust_root, keys, out) -> None:
        """Remove the key KEYID (or a unique prefix) from every role that has it."""
        state = RepoState.load(connect(endpoint, bucket, credentials), read_root(trust_root))
        keyring = Keyring(keys)
        roles = trust_ops.revoke(state, keyid, keyring)
        click.echo(f"key {keyid} removed from: {', '.join(roles)}")
        _after_key_change(state, keyring, state.root, out)

    @trust.command()
    @click.argument("role", type=click.Choice(["root", "targets", *DELEGATED_ROLES]))
    @mirror_options
    @trust_root_option(True)
    @keys_option
    @click.option("--expires", callback=_days, help="Validity from now (e.g. 365d); default: the role's.")
    @click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the new root here.")
    def resign(role, endpoint, bucket, credentials, trust_root, keys, expires, out) -> None:
        """Re-sign ROLE unchanged with a fresh expiry (snapshot/timestamp: `refresh --force`)."""
        state = RepoState.load(connect(endpoint, bucket, credentials), read_root(trust_root))
        keyring = Keyring(keys)
        md = trust_ops.resign(state, role, keyring, expires)
        click.echo(f"{role} v{md.signed.version} expires {md.signed.expires.isoformat()}")
        _after_key_change(state, keyring, md if role == "root" else None, out)


def _after_key_change(state: RepoState, keyring: Keyring, root_md, out: Path | None) -> None:
    if root_md is not None and root_md.signed.type == "root":
        click.echo(f"root v{root_md.signed.version} published")
        if out is not None:
            write_atomic(out, trust_ops.root_bytes(state))
            click.echo(f"root v{root_md.signed.version} written to {out}")
    report = trust_ops.refresh(state, keyring, force=True)
    if report.waiting:
        click.echo(f"not yet visible to the fleet: {report.waiting}", err=True)
    else:
        click.echo(f"snapshot v{report.snapshot}, timestamp v{report.timestamp} published")
