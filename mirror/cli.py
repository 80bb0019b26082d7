"""`tts-mirror`: publish models to the mirror, promote them, list and verify them.

Exit codes: 0 ok, 1 operational error (one line on stderr, no traceback), 2 usage error.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from importlib.metadata import entry_points
from pathlib import Path

import click

from tts_common.atomic import write_atomic
from tts_common.cli import CliGroup
from tts_common.logs import configure_logging

from .manifest import ManifestError
from .remote import Mirror, resolve_credentials
from .signing import generate_keypair, load_public_key
from .trust_cli import keys_option, read_root, register as register_trust, trust_root_option

ENV_ENDPOINT = "TTS_MIRROR_ENDPOINT"
ENV_BUCKET = "TTS_MIRROR_BUCKET"
ENV_CREDENTIALS = "TTS_MIRROR_CREDENTIALS"
ENV_SIGNING_KEY = "TTS_MIRROR_SIGNING_KEY"
ENV_PUBLIC_KEY = "TTS_MIRROR_PUBLIC_KEY"

# Commands other packages add to tts-mirror, found by entry point so that this layer never
# imports them (`import-piper` lives above the runtime it converts voices for).
PLUGIN_GROUP = "tts_fleet.mirror_commands"


class _MirrorGroup(CliGroup):
    """tts-mirror's commands plus those registered under PLUGIN_GROUP, loaded when used."""

    def _plugins(self) -> dict:
        return {ep.name: ep for ep in entry_points(group=PLUGIN_GROUP)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._plugins()})

    def get_command(self, ctx: click.Context, name: str):
        command = super().get_command(ctx, name)
        if command is None and name in (plugins := self._plugins()):
            command = plugins[name].load()
        return command


def mirror_options(f):
    """--endpoint/--bucket/--credentials, each also from the environment."""
    f = click.option(
        "--credentials", type=click.Path(dir_okay=False, path_type=Path), envvar=ENV_CREDENTIALS,
        show_envvar=True,
        help="TOML file with access_key and secret_key, mode 0600. "
        "Without it: TTS_S3_ACCESS_KEY and TTS_S3_SECRET_KEY.",
    )(f)
    f = click.option("--bucket", required=True, envvar=ENV_BUCKET, show_envvar=True, help="Mirror bucket.")(f)
    f = click.option(
        "--endpoint", required=True, envvar=ENV_ENDPOINT, show_envvar=True,
        help="S3 endpoint of the mirror, e.g. http://minio.internal:9000.",
    )(f)
    return f


def _plain_name(what: str):
    """Click callback: names become key components, so a bad one is a usage error (exit 2)."""
    from .manifest import validate_name

    def callback(ctx, param, value):
        if value is None:
            return value
        try:
            return validate_name(value, what)
        except ManifestError as exc:
            raise click.BadParameter(str(exc)) from None

    return callback


def _connect(endpoint: str, bucket: str, credentials: Path | None, pool: int = 32) -> Mirror:
    return Mirror.connect(endpoint, bucket, resolve_credentials(credentials), max_pool_connections=pool)


def _public_keys(paths: tuple[Path, ...]) -> list:
    return [load_public_key(p) for p in paths]


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


@click.group(cls=_MirrorGroup)
@click.option("--log-level", default="info", show_default=True, envvar="TTS_LOG_LEVEL",
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
def main(log_level: str) -> None:
    """Publish TTS models to the fleet's S3 mirror and manage what the fleet tracks.

    Exit codes: 0 ok, 1 operational error, 2 usage error.
    """
    configure_logging(log_level)


# --------------------------------------------------------------------------- publish


class RichEvents:
    """A progress bar on a terminal (bytes uploaded or found already present)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=False,
        )
        self._task = None
        self._done = 0
        self._files = 0
        self._lock = threading.Lock()

    def start(self, files: int, total_bytes: int) -> None:
        self._files = files
        self._progress.start()
        self._task = self._progress.add_task(f"publishing 0/{files} files", total=total_bytes)

    def hashed(self, path: str, size: int) -> None:
        pass

    def transferred(self, nbytes: int) -> None:
        self._progress.advance(self._task, nbytes)

    def file_done(self, path: str, size: int, action: str) -> None:
        with self._lock:
            self._done += 1
            done = self._done
        self._progress.update(self._task, description=f"publishing {done}/{self._files} files")

    def finish(self) -> None:
        self._progress.stop()

    def close(self) -> None:
        self._progress.stop()


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", required=True, callback=_plain_name("model name"), help="Model name (models/<name>/...).")
@click.option("--version", "version", required=True, callback=_plain_name("version"),
              help="Version; immutable once published.")
@click.option("--channel", callback=_plain_name("channel"), help="Also point this channel (e.g. stable) at the version.")
@mirror_options
@click.option("--signing-key", required=True, type=click.Path(dir_okay=False, path_type=Path),
              envvar=ENV_SIGNING_KEY, show_envvar=True, help="ed25519 private key (PEM) that signs the manifest.")
@click.option("--create-bucket", is_flag=True, help="Create the bucket if it does not exist.")
@click.option("--concurrency", default=8, show_default=True, type=click.IntRange(1, 64),
              help="Parallel upload requests (multipart parts).")
@click.option("--chunk-mib", default=16, show_default=True, type=click.IntRange(5, 1024),
              help="Multipart part size and threshold, MiB.")
@click.option("--s3-checksum/--no-s3-checksum", default=True, show_default=True,
              help="Send S3 additional checksums (SHA256) the server verifies per part; "
              "turn off for servers that reject them.")
@click.option("--torrents/--no-torrents", default=True, show_default=True,
              help="Also write each file's BitTorrent torrent and sign its info-hash into the manifest "
              "(schema 2), for peer-to-peer fleets. --no-torrents writes a schema 1 manifest, which "
              "provisioners older than peer-to-peer support can read.")
@trust_root_option(False)
@keys_option
def publish(directory, name, version, channel, endpoint, bucket, credentials, signing_key, create_bucket,
            concurrency, chunk_mib, s3_checksum, torrents, trust_root, keys) -> None:
    """Hash and upload DIRECTORY as NAME/VERSION, then write its signed manifest.

    Files already on the mirror with the same sha256 and size are skipped, so a re-run
    after a failure uploads only what is missing. The manifest is written only after
    every object is confirmed. A published version is immutable: different content is
    refused, identical content is a no-op.

    On a mirror with signed channel metadata (`tts-mirror trust init`) the version is
    also signed into role ci with --signing-key (the CI's key) and --channel moved in
    its role; pass --trust-root, and --key for the snapshot/timestamp keys to make it
    visible at once (else the signing host's timer does).
    """
    from .publish import LogEvents, default_transfer_config, publish_dir
    from .signing import load_private_key

    key = load_private_key(signing_key)
    mirror = _connect(endpoint, bucket, credentials, pool=concurrency + 8)
    events = RichEvents() if sys.stderr.isatty() else LogEvents()
    try:
        report = publish_dir(
            directory, name=name, version=version, mirror=mirror, signing_key=key, channel=channel,
            create_bucket=create_bucket, s3_checksum=s3_checksum, events=events, torrents=torrents,
            transfer_config=default_transfer_config(max_concurrency=concurrency, chunk_mib=chunk_mib),
            trust_root=read_root(trust_root), trust_keys=list(keys),
        )
    finally:
        if isinstance(events, RichEvents):
            events.close()
    if report.created_bucket:
        click.echo(f"created bucket {bucket}")
    if report.unchanged:
        restored = f" (restored {len(report.uploaded)} missing object(s))" if report.uploaded else ""
        click.echo(f"{name} {version} is already published with identical content: nothing to do{restored}")
    else:
        rate = report.uploaded_bytes / (1024 * 1024) / max(report.seconds, 1e-6)
        click.echo(
            f"published {name} {version}: {report.files} files, {_human(report.total_bytes)} "
            f"({len(report.uploaded)} uploaded, {len(report.present)} already on the mirror) "
            f"in {report.seconds:.1f} s, {rate:.0f} MiB/s; signed by {report.key_id}"
        )
    if report.signed is not None:
        _echo_signed(report.signed, channel)
    if report.channel:
        before = report.previous_channel_version or "none"
        click.echo(f"channel {report.channel} of {name}: {before} -> {version}")


def _echo_signed(signed, channel) -> None:
    if signed.staged:
        click.echo(signed.staged, err=True)
    if signed.refresh is not None and signed.refresh.waiting:
        click.echo(f"signed, not yet visible to the fleet: {signed.refresh.waiting}", err=True)
    elif signed.refresh is not None and signed.refresh.timestamp:
        click.echo(f"signed metadata published (timestamp v{signed.refresh.timestamp})")


# --------------------------------------------------------------------------- promote / list / verify


@main.command()
@click.argument("name", callback=_plain_name("model name"))
@click.argument("version", callback=_plain_name("version"))
@click.option("--channel", required=True, callback=_plain_name("channel"),
              help="Channel to point at VERSION (e.g. stable, canary).")
@mirror_options
@click.option("--public-key", "public_keys", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              envvar=ENV_PUBLIC_KEY, show_envvar=True,
              help="Trusted ed25519 public key (repeatable): the signature must verify against one.")
@trust_root_option(False)
@keys_option
def promote(name, version, channel, endpoint, bucket, credentials, public_keys, trust_root, keys) -> None:
    """Point CHANNEL of NAME at VERSION, after checking the version is complete.

    Checks first: the manifest and its signature exist (and verify, with --public-key)
    and every object exists with the manifest's size. With signed channel metadata the
    channel's target is signed with --key: the CI's key for its channels (canary),
    release keys for the others (stable); below the release threshold the change is
    staged until `tts-mirror trust sign release` adds the missing signatures.
    Reverting a channel is promoting the older version again (a new metadata version).
    """
    from .catalog import promote as do_promote
    from .trust_repo import Keyring

    mirror = _connect(endpoint, bucket, credentials)
    mirror.check_bucket()
    previous = do_promote(mirror, name, version, channel, _public_keys(public_keys), trust_root=read_root(trust_root),
                          keyring=Keyring(keys))
    click.echo(f"channel {channel} of {name}: {previous or 'none'} -> {version}")


@main.command("list")
@mirror_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(endpoint, bucket, credentials, as_json) -> None:
    """List models, their versions (state, files, size) and channels."""
    from .catalog import list_models

    mirror = _connect(endpoint, bucket, credentials)
    mirror.check_bucket()
    models = list_models(mirror)
    if as_json:
        doc = [
            {
                "name": m.name,
                "channels": m.channels,
                "versions": [
                    {"version": v.version, "state": v.state, "files": v.files, "size": v.size,
                     "created": v.created, "signed": v.signed}
                    for v in m.versions
                ],
            }
            for m in models
        ]
        click.echo(json.dumps(doc, indent=2))
        return
    if not models:
        click.echo(f"no models in bucket {bucket}")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{bucket} at {endpoint}")
    for column in ("model", "version", "state", "files", "size", "created", "channels"):
        table.add_column(column, justify="right" if column in {"files", "size"} else "left")
    for m in models:
        by_version: dict[str, list[str]] = {}
        for channel, version in sorted(m.channels.items()):
            by_version.setdefault(version, []).append(channel)
        for v in m.versions:
            state = v.state if v.signed or v.state != "published" else "published (unsigned)"
            table.add_row(m.name, v.version, state, str(v.files) if v.files else "",
                          _human(v.size) if v.size else "", v.created, ", ".join(by_version.get(v.version, [])))
        dangling = [f"{c} -> {ver}" for c, ver in sorted(m.channels.items())
                    if ver not in {v.version for v in m.versions}]
        if dangling:
            table.add_row(m.name, "", "channel without version", "", "", "", ", ".join(dangling))
    Console(width=max(100, Console().width)).print(table)


@main.command()
@click.argument("name", callback=_plain_name("model name"))
@click.argument("version", callback=_plain_name("version"))
@mirror_options
@click.option("--public-key", "public_keys", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              envvar=ENV_PUBLIC_KEY, show_envvar=True,
              help="Trusted ed25519 public key (repeatable): also verify the manifest signature.")
def verify(name, version, endpoint, bucket, credentials, public_keys) -> None:
    """Re-hash every object of NAME VERSION on the mirror against its manifest.

    Reports each mismatch (missing object, wrong size, wrong sha256, bad signature)
    and exits 1 if there is any.
    """
    from .catalog import verify_version

    mirror = _connect(endpoint, bucket, credentials)
    mirror.check_bucket()
    result = verify_version(mirror, name, version, _public_keys(public_keys))
    for problem in result.mismatches:
        click.echo(f"MISMATCH {problem}")
    signer = f"; signature by {result.signer}" if result.signer else ""
    if result.mismatches:
        click.echo(f"{name} {version}: {len(result.mismatches)} problem(s) in {result.checked} files", err=True)
        sys.exit(1)
    click.echo(f"{name} {version}: {result.checked} files, {_human(result.bytes)}, all sha256 match{signer}")


@main.command("tracker-whitelist")
@mirror_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the list to this file (atomically: a tracker reloading it never sees half of it); "
              "default: standard output.")
@trust_root_option(False)
@click.option("--trust-dir", type=click.Path(file_okay=False, path_type=Path), envvar="TTS_MIRROR_TRUST_DIR",
              show_envvar=True,
              help="Keep the verified metadata here between runs (rollback protection); default: a temp dir.")
def tracker_whitelist(endpoint, bucket, credentials, out, trust_root, trust_dir) -> None:
    """Print the info-hash of every file of every published version, one per line.

    This is opentracker's `access.whitelist` format: a tracker fed this list serves the
    fleet's torrents and nothing else. Re-run it after each publish and reload the
    tracker (opentracker: SIGHUP). On a mirror with signed channel metadata only
    manifests that match a signed target count, verified from --trust-root.
    """
    from .catalog import info_hashes

    mirror = _connect(endpoint, bucket, credentials)
    mirror.check_bucket()
    hashes = info_hashes(mirror, read_root(trust_root), trust_dir)
    text = "".join(h + "\n" for h in hashes)
    if out is None:
        click.echo(text, nl=False)
        return
    write_atomic(out, text)
    click.echo(f"{len(hashes)} info-hash(es) written to {out}", err=True)


# --------------------------------------------------------------------------- keys and voices


@main.command()
@click.option("--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for <name>.key (mode 0600) and <name>.pub.")
@click.option("--name", "key_name", default="mirror-signing", show_default=True, help="File name stem.")
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
def keygen(out_dir: Path, key_name: str, force: bool) -> None:
    """Write a new ed25519 signing key pair (private key mode 0600)."""
    private, public = out_dir / f"{key_name}.key", out_dir / f"{key_name}.pub"
    kid = generate_keypair(private, public, overwrite=force)
    click.echo(f"private key: {private} (mode {os.stat(private).st_mode & 0o777:04o})")
    click.echo(f"public key:  {public}")
    click.echo(f"key id:      {kid}")


register_trust(main, mirror_options, _connect)


if __name__ == "__main__":  # pragma: no cover
    main()
