"""`tts-provisioner`: keep this server's model cache in sync with the mirror."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import click
import structlog
from rich.console import Console
from rich.table import Table

from tts_common.logs import configure_logging, journal_prefix
from tts_common.cli import CliGroup, CommandFailed

from .cache import CacheError, CacheReader, CacheWriter, DamagedSnapshotError
from .config import DEFAULT_CONFIG_PATH, ProvisionerConfig, load_config
from .daemon import CacheLockedError, Provisioner
from .hold import Hold, read_hold, release_hold, write_hold
from .progress import human_bytes
from .status import PID_FILE, read_status

log = structlog.get_logger(__name__)


def _load(ctx: click.Context) -> ProvisionerConfig:
    """The config, read when a command first needs it (so `COMMAND --help` works anywhere)."""
    obj = ctx.find_root().obj
    if "config" not in obj:
        obj["config"] = load_config(obj["config_path"])
        configure_logging(obj["log_level"] or obj["config"].log_level)
    return obj["config"]


@click.group(cls=CliGroup)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_CONFIG_PATH, show_default=True, envvar="TTS_PROVISIONER_CONFIG",
              help="Provisioner TOML config (env TTS_PROVISIONER_CONFIG).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None,
              help="Override the config's log_level.")
@click.pass_context
def main(ctx: click.Context, config_path: Path, log_level: str | None) -> None:
    """Keep this server's TTS model cache in sync with the MinIO mirror.

    Downloads with aria2 (resumable, multi-connection, every mirror as a fallback),
    verifies each file's sha256, builds snapshots and switches `current/<name>`
    atomically. `run` is the daemon; the other commands are one-shot.
    """
    ctx.obj = {"config_path": config_path, "log_level": log_level}


@main.command()
@click.pass_context
def run(ctx: click.Context) -> None:
    """Run the daemon: sync, then poll; SIGHUP syncs now, SIGTERM stops cleanly."""
    config = _load(ctx)
    with Provisioner(config) as prov:
        sys.exit(prov.run_forever())


def _daemon_pid(config: ProvisionerConfig) -> int | None:
    try:
        return int((Path(config.runtime_dir) / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _daemon_holding(config: ProvisionerConfig, exc: CacheLockedError) -> int:
    """The daemon's pid, when the daemon is what holds the cache lock. A one-shot command
    (sync, gc, rollback) holding it is no daemon: SIGHUP would end it, not make it sync."""
    daemon = _daemon_pid(config)
    if daemon is not None and exc.pid in (None, daemon):
        return daemon
    raise CommandFailed(f"another tts-provisioner command (pid {exc.pid or '?'}) holds the cache lock "
                        f"{exc.path}; run this again when it has finished") from None


def _follow_daemon(config: ProvisionerConfig, pid: int, timeout: float, what: str) -> int:
    """Ask the running daemon for a sync pass (SIGHUP) and wait for it to finish."""
    before = (read_status(config.runtime_dir) or {}).get("syncs_completed", 0)
    os.kill(pid, signal.SIGHUP)
    click.echo(f"asked the running daemon (pid {pid}) to {what}; waiting…", err=True)
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        status = read_status(config.runtime_dir) or {}
        if status.get("message") and status["message"] != last:
            last = status["message"]
            click.echo(last, err=True)
        if status.get("syncs_completed", 0) > before:
            failed = [n for n, m in status.get("models", {}).items() if m.get("error")]
            for name in failed:
                click.echo(f"{name}: {status['models'][name]['error']}", err=True)
            return 1 if failed else 0
        time.sleep(0.5)
    raise CommandFailed(f"the daemon did not finish a sync pass within {timeout:.0f}s")


@main.command()
@click.option("--timeout", type=float, default=6 * 3600, show_default=True,
              help="When a daemon is running: how long to wait for its sync pass.")
@click.pass_context
def sync(ctx: click.Context, timeout: float) -> None:
    """Sync every tracked model now, in the foreground (progress bar on a terminal).

    If the daemon is running, it is asked to sync (SIGHUP) and this command follows it.
    Exit 0 when every model is at its wanted version, 1 otherwise.
    """
    config = _load(ctx)
    prov = Provisioner(config, console=sys.stderr.isatty())
    try:
        prov.open()
    except CacheLockedError as exc:
        sys.exit(_follow_daemon(config, _daemon_holding(config, exc), timeout, "sync"))
    try:
        with prov.reporter:
            results = prov.sync_once()
    finally:
        prov.close()
    bad = 0
    for name, result in results.items():
        if isinstance(result, Exception):
            bad += 1
            click.echo(f"{journal_prefix(logging.ERROR)}{name}: FAILED: {result}", err=True)
        else:
            snap = prov.cache.snapshot(name, result.version)
            verb = "updated to" if result.changed else "already at"
            click.echo(f"{name}: {verb} {result.version} ({snap.path if snap else '?'})")
    sys.exit(1 if bad else 0)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status document as JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show each model's current snapshot and the daemon's last reported state."""
    config = _load(ctx)
    cache = CacheReader(config.cache_dir)
    daemon = read_status(config.runtime_dir)
    doc = {"daemon": daemon, "models": {}}
    for model in config.models:
        cur = cache.current(model.name)
        hold = read_hold(config.cache_dir, model.name)
        doc["models"][model.name] = {
            "tracks": f"channel {model.channel}" if model.channel else f"version {model.version}",
            "current_version": cur.version if cur else None,
            "snapshot": str(cur.path) if cur else None,
            "held_at": hold.version if hold else None,
            "kept": [s.version for s in cache.snapshots(model.name)],
        }
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    table = Table(title=f"tts-provisioner ({config.cache_dir})")
    for col in ("model", "tracks", "current", "kept", "state"):
        table.add_column(col)
    for name, m in doc["models"].items():
        dm = (daemon or {}).get("models", {}).get(name, {})
        state = dm.get("state", "no daemon status")
        if dm.get("error"):
            state += f": {dm['error']}"
        if m["held_at"]:
            state += f" (held at {m['held_at']} by rollback)"
        table.add_row(name, m["tracks"], m["current_version"] or "-", ", ".join(m["kept"]) or "-", state)
    Console().print(table)
    if daemon:
        click.echo(f"daemon: {daemon.get('state')} - {daemon.get('message', '')} (updated {daemon.get('updated')})")
        if trust := daemon.get("trust"):
            expires = (trust.get("expires") or {}).get("timestamp", "?")
            mirrors = ", ".join(f"{n}: {st}" for n, st in (trust.get("mirrors") or {}).items())
            click.echo(f"trust: root v{trust.get('root_version')}, timestamp v{trust.get('timestamp_version')} "
                       f"(expires {expires}); mirrors: {mirrors or '-'}")
            if trust.get("error"):
                click.echo(f"trust: {trust['error']}")
        if p2p := daemon.get("p2p"):
            click.echo(f"p2p: {human_bytes(p2p['from_peers'])} from peers, {human_bytes(p2p['from_mirror'])} "
                       f"from the mirror (web seeds), {human_bytes(p2p['uploaded'])} uploaded, "
                       f"seeding {p2p['seeding']} file(s)")
    else:
        click.echo("daemon: no status file (not running?)")


@main.command()
@click.option("--repair", is_flag=True, help="Repair damaged files (from intact copies or the mirror).")
@click.pass_context
def verify(ctx: click.Context, repair: bool) -> None:
    """Re-hash every file of every kept snapshot against its manifest."""
    config = _load(ctx)
    cache = CacheReader(config.cache_dir)
    damaged = []
    for name in cache.models():
        for snap in cache.snapshots(name):
            problems = cache.check_snapshot(snap, full_hash=True)
            label = f"{name}/{snap.version}"
            if problems:
                damaged.append(snap)
                for p in problems:
                    click.echo(f"{label}: DAMAGED {p}")
            else:
                click.echo(f"{label}: ok ({len(snap.manifest().files)} files)")
    if damaged and repair:
        with Provisioner(config) as prov:
            for snap in damaged:
                prov.syncer.repair_snapshot(snap)
                click.echo(f"{snap.name}/{snap.version}: repaired")
        sys.exit(0)
    sys.exit(1 if damaged else 0)


@main.command()
@click.argument("name", required=False)
@click.pass_context
def snapshots(ctx: click.Context, name: str | None) -> None:
    """List kept snapshots (the current one is marked with *)."""
    config = _load(ctx)
    cache = CacheReader(config.cache_dir)
    names = [name] if name else cache.models()
    for n in names:
        cur = cache.current(n)
        for snap in cache.snapshots(n):
            mark = "*" if cur and cur.version == snap.version else " "
            size = sum(f.size for f in snap.manifest().files)
            click.echo(f"{mark} {n} {snap.version}  {human_bytes(size)}  {snap.completed_at() or ''}  {snap.path}")


@main.command()
@click.argument("name")
@click.argument("version", required=False)
@click.option("--release", is_flag=True, help="Release an earlier rollback hold instead (no VERSION needed).")
@click.pass_context
def rollback(ctx: click.Context, name: str, version: str | None, release: bool) -> None:
    """Switch NAME back to a kept snapshot VERSION and hold it there until the channel moves.

    `rollback NAME --release` ends the hold instead."""
    if version is None and not release:
        raise click.UsageError("Missing argument 'VERSION' (or --release to end a hold).")
    config = _load(ctx)
    if name not in {m.name for m in config.models}:
        raise CommandFailed(f"model {name!r} is not tracked by this config")
    if release:
        click.echo("hold released" if release_hold(config.cache_dir, name) else "no hold was set")
        return
    cache = CacheReader(config.cache_dir)
    snap = cache.snapshot(name, version)
    if snap is None or not snap.complete:
        kept = ", ".join(s.version for s in cache.snapshots(name)) or "none"
        raise CommandFailed(f"no complete snapshot {name}/{version} is kept (kept: {kept})")
    daemon = read_status(config.runtime_dir) or {}
    channel_version = ((daemon.get("models") or {}).get(name) or {}).get("wanted_version")
    current = cache.current(name)
    held = read_hold(config.cache_dir, name)
    if held is not None:
        # Already held: the status's wanted version is the held one, not the channel's;
        # recording it would release the new hold at the next poll (a re-run rollback.yml
        # sent the fleet back to the channel's version).
        channel_version = held.channel_version
    elif not channel_version:
        channel_version = current.version if current else None
    write_hold(config.cache_dir, name, Hold(version, channel_version))
    prov = Provisioner(config)
    try:
        prov.lock.acquire()
    except CacheLockedError as exc:
        try:
            pid = _daemon_holding(config, exc)
        except CommandFailed:
            _undo_hold(config, name, held)  # nothing of this rollback stays behind
            raise
        sys.exit(_follow_daemon(config, pid, 120, f"roll {name} back to {version}"))
    try:
        try:
            CacheWriter(config.cache_dir).rollback(name, version)
        except DamagedSnapshotError as exc:
            click.echo(f"{exc}; repairing it first", err=True)
            prov.open()  # aria2c, in case the mirror must supply the bytes
            try:
                prov.syncer.rollback(name, version)
            finally:
                prov.aria2.stop()
    except CacheError as exc:
        release_hold(config.cache_dir, name)
        where = current.version if current else "nothing"
        raise CommandFailed(f"rollback refused: {exc}; current stays at {where}") from None
    finally:
        prov.lock.release()
    click.echo(f"{name}: current -> {version} (held until the channel moves; --release to undo)")


def _undo_hold(config: ProvisionerConfig, name: str, before: Hold | None) -> None:
    if before is None:
        release_hold(config.cache_dir, name)
    else:
        write_hold(config.cache_dir, name, before)


@main.command()
@click.pass_context
def gc(ctx: click.Context) -> None:
    """Drop snapshots beyond keep_snapshots, unreferenced blobs and stale partials."""
    config = _load(ctx)
    prov = Provisioner(config)
    try:
        prov.lock.acquire()
    except CacheLockedError:
        raise CommandFailed("the daemon is running and owns the cache; it collects garbage after every sync "
                            "(run `tts-provisioner sync` to trigger one)") from None
    try:
        cache = CacheWriter(config.cache_dir)
        result = cache.gc(config.keep_snapshots)
        partials = cache.clean_partials()
    finally:
        prov.lock.release()
    click.echo(f"removed {result['snapshots']} snapshots, {result['blobs']} blobs "
               f"({human_bytes(result['bytes'])}), {partials} partial files")


# -- any model server on the cache (docs/models.md) ---------------------------------------

@main.command()
@click.argument("name")
@click.option("--version", default=None, help="Wait for this version (default: any complete one).")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds (default: never).")
@click.option("--serving", is_flag=True,
              help="Also wait until the model's supervisor (tts-model@NAME) serves it; fail at once if it "
                   "rolled back from that version.")
@click.option("--status-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              envvar="TTS_MODEL_STATUS_ROOT", help="Where supervisors write NAME/status.json (default /run/tts-model).")
@click.pass_context
def wait(ctx: click.Context, name: str, version: str | None, timeout: float | None, serving: bool,
         status_root: Path | None) -> None:
    """Block until current/NAME is a complete, verified snapshot (exit 0), woken by filesystem
    events; for ExecStartPre= and scripts. Exit 1 with one line on timeout."""
    from .modelwait import wait_for_model

    config = _load(ctx)
    tracked = [m.name for m in config.models]
    if name not in tracked:
        raise CommandFailed(f"model {name!r} is not tracked by {ctx.find_root().obj['config_path']} "
                            f"(tracked: {', '.join(tracked)}): no snapshot of it will ever appear", exit_code=2)
    snap = wait_for_model(config, name, version, timeout, serving, status_root,
                          progress=lambda line: click.echo(line, err=True))
    click.echo(f"{name} {snap.version} is complete: {snap.path}")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--on-change", type=click.Choice(["restart", "reload", "none"]), default="restart", show_default=True,
              help="What to do when current/NAME moves: restart the server, or send it --reload-signal.")
@click.option("--reload-signal", default="SIGHUP", show_default=True, help="The signal that reloads the server.")
@click.option("--health-url", default=None, help="Healthy when a GET of this URL answers 2xx.")
@click.option("--health-cmd", default=None, help="Healthy when this command (split like a shell) exits 0.")
@click.option("--health-audio", default=None,
              help="The audio gate: healthy when `tts-ctl check --url URL --api API` passes (a sentence "
                   "synthesized and checked as plausible speech).")
@click.option("--health-api", type=click.Choice(["openai", "piper", "wyoming"]), default="openai", show_default=True,
              help="What --health-audio speaks: /v1/audio/speech, piper's POST /synthesize, a Wyoming tcp:// server.")
@click.option("--health-timeout", type=float, default=120.0, show_default=True,
              help="Seconds a start or reload may take to pass the health check.")
@click.option("--stop-timeout", type=float, default=30.0, show_default=True,
              help="Seconds the server gets to stop after SIGTERM.")
@click.option("--status-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              envvar="TTS_MODEL_STATUS_ROOT", help="Where to write NAME/status.json (default /run/tts-model).")
@click.pass_context
def supervise(ctx: click.Context, name: str, command: tuple[str, ...], on_change: str, reload_signal: str,
              health_url: str | None, health_cmd: str | None, health_audio: str | None, health_api: str,
              health_timeout: float, stop_timeout: float, status_root: Path | None) -> None:
    """Run COMMAND (after `--`) as the server of model NAME on current/NAME: start it once the
    snapshot is complete, READY once healthy, reload or restart it when current moves, roll
    the provisioner back when a new version fails. The main process of tts-model@NAME.service."""
    import shlex

    from .supervise import DEFAULT_STATUS_ROOT, HealthCheck, ServeOptions, Supervisor

    config = _load(ctx)
    if name not in {m.name for m in config.models}:
        raise CommandFailed(f"model {name!r} is not tracked by {ctx.find_root().obj['config_path']}", exit_code=2)
    try:
        sig = signal.Signals[reload_signal.upper() if reload_signal.upper().startswith("SIG")
                             else f"SIG{reload_signal.upper()}"]
    except KeyError:
        raise CommandFailed(f"--reload-signal {reload_signal!r} is not a signal name (SIGHUP, SIGUSR1, ...)",
                            exit_code=2) from None
    if sum(x is not None for x in (health_url, health_cmd, health_audio)) > 1:
        raise CommandFailed("give one of --health-url, --health-cmd, --health-audio", exit_code=2)
    command_check = tuple(shlex.split(health_cmd)) if health_cmd else ()
    if health_audio:
        # tts-ctl beside this interpreter (the same venv): the runtime's speech checks.
        command_check = (str(Path(sys.executable).parent / "tts-ctl"), "check", "--url", health_audio,
                         "--api", health_api, "Health check.")
    health = HealthCheck(url=health_url, command=command_check, timeout=health_timeout)
    opts = ServeOptions(name, tuple(command), on_change, sig, health, stop_timeout,
                        status_root or DEFAULT_STATUS_ROOT)
    sys.exit(Supervisor(config, ctx.find_root().obj["config_path"], opts).run())


# -- known-bad mirror objects ---------------------------------------------------------

def _known_bad_lines(records: dict[str, dict]) -> list[str]:
    lines = []
    for key, rec in sorted(records.items(), key=lambda kv: (kv[1].get("model", ""), kv[1].get("file", ""), kv[0])):
        mirror, _, obj = key.partition(" ")
        lines.append(f"{rec.get('model', '?')} {rec.get('version', '?')} {rec.get('file', '?')} on mirror {mirror} "
                     f"({obj}): strike {rec.get('strikes', 1)}, first seen {rec.get('seen', '?')}, last "
                     f"{rec.get('last_seen', rec.get('seen', '?'))}, fetched again after "
                     f"{rec.get('retry_after_utc', 'its next try')}\n    {rec.get('error', '?')}")
    return lines


def _select(records: dict[str, dict], model: str | None, file: str | None) -> dict[str, dict]:
    return {k: v for k, v in records.items()
            if (model is None or v.get("model") == model) and (file is None or v.get("file") == file)}


@main.group("known-bad")
def known_bad() -> None:
    """Mirror objects that served bytes which failed verification.

    Such an object is not fetched again while it is unchanged, for 10 minutes after its
    first failure, then 20, 40... at most 6 hours; a changed object is fetched at once.
    """


@known_bad.command("list")
@click.argument("model", required=False)
@click.argument("file", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
@click.pass_context
def known_bad_list(ctx: click.Context, model: str | None, file: str | None, as_json: bool) -> None:
    """List the known-bad records (of MODEL, of its FILE)."""
    config = _load(ctx)
    records = _select(CacheReader(config.cache_dir).known_bad(), model, file)
    if as_json:
        click.echo(json.dumps(records, indent=2, sort_keys=True))
    elif records:
        click.echo("\n".join(_known_bad_lines(records)))
    else:
        click.echo("no known-bad records" + (f" of {' '.join(filter(None, [model, file]))}" if model else ""))


@known_bad.command("clear")
@click.argument("model", required=False)
@click.argument("file", required=False)
@click.pass_context
def known_bad_clear(ctx: click.Context, model: str | None, file: str | None) -> None:
    """Forget the known-bad records (of MODEL, of its FILE): the next sync pass fetches
    those objects again (`tts-provisioner sync` starts one now)."""
    config = _load(ctx)
    cache = CacheReader(config.cache_dir)
    if not cache.quarantine_dir.is_dir():
        raise CommandFailed(f"no cache at {config.cache_dir} (has the provisioner run?)")
    if model is not None and not _select(cache.known_bad(), model, file):
        what = f"{model} {file}" if file else model
        raise CommandFailed(f"no known-bad record of {what} (`tts-provisioner known-bad list` shows them all)")
    dropped = CacheWriter(config.cache_dir).clear_known_bad(model, file)
    for line in _known_bad_lines(dropped):
        click.echo(f"cleared: {line}")
    click.echo(f"cleared {len(dropped)} record(s); the next sync pass fetches them again")
