"""`tts-ctl`: how people use the runtime.

    tts-ctl synth "Hello." -o hello.wav [--voice --speaker --format --rate --speed --seed --stream --local]
    tts-ctl batch lines.{txt,csv,jsonl} --out-dir out/ [--concurrency 4]
    tts-ctl status [--json]     tts-ctl voices [--json]     tts-ctl wait-ready --timeout 120
    tts-ctl cache ...           (the provisioner's CLI: snapshots, verify, rollback, gc)

The socket comes from --socket, $TTS_RUNTIME_SOCKET, the runtime config's socket_path
(--config), or /run/tts/runtime.sock. Files are written to a temporary name and
renamed, so an interrupted run never leaves a half-written output behind.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import httpx
import structlog

from tts_common.atomic import atomic_writer, write_atomic
from tts_common.backoff import backoff_delay
from tts_common.cli import CliGroup, CommandFailed
from tts_common.logs import configure_logging

from .client import RequestFailed, RuntimeClient, async_http_client, default_socket, error_from_response, transport_error
from .config import DEFAULT_CONFIG_PATH, RuntimeConfig, load_config
from .omp import prefer_passive_wait

log = structlog.get_logger(__name__)

PROVISIONER_CLI = "tts-provisioner"
FORMAT_SUFFIX = {"wav": ".wav", "mp3": ".mp3", "flac": ".flac", "ogg": ".ogg", "opus": ".opus", "pcm": ".pcm"}


@dataclass
class Ctx:
    config: RuntimeConfig
    socket: Path
    config_given: bool

    def client(self, timeout: float = 120.0) -> RuntimeClient:
        return RuntimeClient(self.socket, timeout=timeout)


def _format_for(output: Path | None, fmt: str | None) -> str:
    if fmt:
        return fmt.lower()
    if output is not None:
        for name, suffix in FORMAT_SUFFIX.items():
            if output.suffix.lower() == suffix:
                return name
    return "wav"


@click.group(cls=CliGroup)
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), default=None,
              help="runtime socket (default: $TTS_RUNTIME_SOCKET, the config's socket_path, /run/tts/runtime.sock)")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"runtime config, for the socket, cache and model names (default {DEFAULT_CONFIG_PATH} if present)")
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
@click.pass_context
def main(ctx: click.Context, socket_path: Path | None, config_path: Path | None, verbose: bool) -> None:
    """Use the tts-fleet runtime: synthesize, run batch jobs, check status."""
    prefer_passive_wait()  # `synth --local` runs the engine in this process
    configure_logging("debug" if verbose else "warning")
    given = config_path is not None
    if config_path is None and DEFAULT_CONFIG_PATH.exists():
        config_path = DEFAULT_CONFIG_PATH
    config = load_config(config_path)
    if socket_path is None:
        socket_path = Path(os.environ["TTS_RUNTIME_SOCKET"]) if os.environ.get("TTS_RUNTIME_SOCKET") else (
            config.socket_path if config_path is not None else default_socket())
    ctx.obj = Ctx(config=config, socket=socket_path, config_given=given)


# -- synth -------------------------------------------------------------------------------

def synth_local(config: RuntimeConfig, text: str, *, voice: str, fmt: str, rate: int | None, seed: int,
                speed: float | None, length_scale: float | None, noise_scale: float | None,
                noise_w: float | None, volume: float = 1.0, speaker: str | None = None) -> bytes:
    """The server's synthesis path, in-process: same planning, joining and encoding."""
    from provisioner.cache import CacheReader

    from . import audio
    from .engine import UnknownSpeakerError
    from .gate import ReadinessGate
    from .models import join_sentences, load_engine, plan_utterances, synthesize_local

    if fmt not in audio.SUPPORTED_FORMATS:
        raise click.UsageError(f"unsupported format {fmt!r}; use one of {sorted(audio.SUPPORTED_FORMATS)}")
    gate = ReadinessGate(config.cache_dir, config.provisioner_runtime_dir, config.verify_full_hash)
    result = gate.check(voice)
    if not result.ok:
        known = CacheReader(config.cache_dir).models()
        raise RequestFailed(f"{result.reason} (cache {config.cache_dir}; models there: {', '.join(known) or 'none'})")
    engine = load_engine(config, result.snapshot)
    try:
        try:
            requests, pauses = plan_utterances(engine, text, seed=seed, length_scale=length_scale,
                                               noise_scale=noise_scale, noise_w=noise_w, speed=speed,
                                               speaker=speaker)
        except UnknownSpeakerError as exc:
            raise RequestFailed(f"speaker: {exc}") from None
        wave = join_sentences(synthesize_local(engine, requests, config.max_batch_size), engine.sample_rate, pauses)
        return audio.encode(wave, engine.sample_rate, fmt, target_rate=rate, volume=volume)
    finally:
        engine.close()


@main.command()
@click.argument("text")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="output file ('-' for stdout)")
@click.option("--voice", default=None, help="voice (default: the runtime's default)")
@click.option("--speaker", default=None, help="speaker of a multi-speaker voice: name or id (tts-ctl voices)")
@click.option("--format", "fmt", default=None, help="wav, mp3, flac, ogg, pcm... (default: from -o, else wav)")
@click.option("--rate", type=int, default=None, help="output sample rate (resampled)")
@click.option("--speed", type=float, default=None, help="speaking speed multiplier (2.0 = twice as fast)")
@click.option("--seed", type=int, default=0, show_default=True, help="noise seed: same seed, same audio")
@click.option("--length-scale", type=float, default=None)
@click.option("--noise-scale", type=float, default=None)
@click.option("--noise-w", type=float, default=None)
@click.option("--stream", is_flag=True, help="receive sentence by sentence (writes as audio arrives)")
@click.option("--local", is_flag=True, help="load the engine in-process from the cache; no daemon needed")
@click.option("--timeout", type=float, default=300.0, show_default=True)
@click.pass_obj
def synth(obj: Ctx, text: str, output: Path, voice: str | None, speaker: str | None, fmt: str | None, rate: int | None,
          speed: float | None, seed: int, length_scale: float | None, noise_scale: float | None,
          noise_w: float | None, stream: bool, local: bool, timeout: float) -> None:
    """Synthesize TEXT ('-' reads stdin) into a file."""
    if text == "-":
        text = sys.stdin.read()
    to_stdout = str(output) == "-"
    fmt = _format_for(None if to_stdout else output, fmt)
    params = dict(voice=voice, format=fmt, sample_rate=rate, speed=speed, seed=seed,
                  length_scale=length_scale, noise_scale=noise_scale, noise_w=noise_w, speaker=speaker)
    try:
        if local:
            if stream:
                raise click.UsageError("--stream needs the daemon; --local writes the whole file")
            data = synth_local(obj.config, text, voice=voice or obj.config.default_voice, fmt=fmt, rate=rate,
                               seed=seed, speed=speed, length_scale=length_scale, noise_scale=noise_scale,
                               noise_w=noise_w, speaker=speaker)
        else:
            with obj.client(timeout) as client:
                if stream and not to_stdout:
                    with atomic_writer(output) as f:
                        for chunk in client.stream(text, **params):
                            f.write(chunk)
                    click.echo(str(output))
                    return
                if stream:
                    for chunk in client.stream(text, **params):
                        sys.stdout.buffer.write(chunk)
                        sys.stdout.buffer.flush()
                    return
                data = client.synthesize(text, **params)
    except ValueError as exc:  # the engine's own request checks (--local)
        raise CommandFailed(str(exc)) from None
    if to_stdout:
        sys.stdout.buffer.write(data)
    else:
        write_atomic(output, data)
        click.echo(str(output))


# -- check (the rollout's health gate) ----------------------------------------------------

@main.command()
@click.argument("text", default="Health check.")
@click.option("--voice", default=None, help="voice (default: the runtime's default)")
@click.option("--expect-version", default=None, help="fail unless this version answered (X-Voice-Version)")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also keep the WAV here")
@click.option("--timeout", type=float, default=120.0, show_default=True)
@click.option("--reload", "reload_first", is_flag=True,
              help="first make the runtime re-check the cache and wait for that pass (POST /v1/reload); "
                   "with --expect-version, fail at once unless the voice is then at that version")
@click.option("--url", default=None,
              help="check another model server instead of the runtime: its endpoint (docs/models.md)")
@click.option("--api", type=click.Choice(["openai", "piper", "wyoming"]), default="openai", show_default=True,
              help="with --url: /v1/audio/speech, piper's POST /synthesize, or a Wyoming tcp:// server")
@click.pass_obj
def check(obj: Ctx, text: str, voice: str | None, expect_version: str | None, output: Path | None,
          timeout: float, reload_first: bool, url: str | None, api: str) -> None:
    """Synthesize TEXT through the daemon and check that the audio is plausibly speech for it
    (duration, silence, clipping, speech-band energy, noise: runtime/speechcheck.py). Exit 1
    with one line saying what is wrong; the ansible health gate runs this (with --reload:
    the whole gate, reload included, in one process and one SSH round trip). With --url the
    same checks run on the audio of another model server (piper, wyoming, OpenAI-compatible)."""
    import soundfile

    from .speechcheck import check_speech

    if url is not None:
        _check_external(url, api, text, voice, timeout, output, expect_version or reload_first)
        return
    if reload_first:
        _reload_for_check(obj, voice or obj.config.default_voice, expect_version, timeout)
    with obj.client(timeout) as client:
        # Inside the package: the response's headers say which version answered.
        response = client._request("POST", "/v1/synthesize", json={"text": text, "voice": voice, "format": "wav"})
    served = response.headers.get("x-voice-version", "?")
    name = response.headers.get("x-voice", voice or "?")
    if expect_version is not None and served != expect_version:
        raise CommandFailed(f"{name} {served} answered, expected {expect_version}")
    try:
        wave, rate = soundfile.read(io.BytesIO(response.content), dtype="float32")
    except RuntimeError as exc:
        raise CommandFailed(f"{name} {served}: the answer is not a readable WAV ({exc})")
    if output is not None:
        write_atomic(output, response.content)
    verdict = check_speech(wave, rate, text)
    if not verdict.ok:
        raise CommandFailed(f"{name} {served}: {verdict.line()}")
    click.echo(f"{name} {served}: {verdict.line()}")


def _check_external(url: str, api: str, text: str, voice: str | None, timeout: float, output: Path | None,
                    runtime_only: bool) -> None:
    import soundfile

    from .external import fetch_audio
    from .speechcheck import check_speech

    if runtime_only:
        raise click.UsageError("--reload and --expect-version ask tts-runtime; another server's version is "
                               "gated by `tts-provisioner wait NAME --version V --serving`")
    try:
        wave, rate = fetch_audio(url, api, text, voice, timeout)
    except RequestFailed as exc:
        raise CommandFailed(str(exc)) from None
    if output is not None:
        buf = io.BytesIO()
        soundfile.write(buf, wave, rate, format="WAV", subtype="PCM_16")
        write_atomic(output, buf.getvalue())
    verdict = check_speech(wave, rate, text)
    if not verdict.ok:
        raise CommandFailed(f"{url}: {verdict.line()}")
    click.echo(f"{url}: {verdict.line()}")


def _reload_for_check(obj: Ctx, voice: str, expect_version: str | None, timeout: float) -> None:
    """The reload's answer comes after a whole pass over the cache, so the voice is then
    either at the version `current` names or that version failed to load: no polling."""
    try:
        with obj.client(timeout) as client:
            answer = client.reload()
    except RequestFailed as exc:
        raise CommandFailed(f"reload: {exc}")
    if not answer.get("finished"):
        raise CommandFailed("reload: the runtime did not finish re-checking the cache in time")
    model = (answer.get("models") or {}).get(voice) or {}
    if expect_version is not None and model.get("version") != expect_version:
        why = model.get("last_error") or model.get("waiting") or "no error reported"
        raise CommandFailed(f"the runtime serves {voice} {model.get('version') or 'nothing'}, not {expect_version}: {why}")
    if not answer.get("ready"):
        raise CommandFailed(f"the runtime is not ready after the reload: {model.get('waiting') or 'another voice is not loaded'}")


# -- batch -------------------------------------------------------------------------------

ITEM_KEYS = {"id", "text", "voice", "speaker", "seed", "speed", "length_scale", "noise_scale", "noise_w", "format", "sample_rate"}
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class Item:
    line: int
    name: str
    text: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Failure:
    line: int
    name: str | None
    error: str


def _coerce(key: str, value: Any) -> Any:
    if value is None or value == "":
        return None
    if key in ("seed", "sample_rate"):
        return int(value)
    if key in ("speed", "length_scale", "noise_scale", "noise_w"):
        return float(value)
    return str(value)


def read_items(path: Path) -> tuple[list[Item], list[Failure]]:
    """Items from .txt (a line each), .csv (header with 'text', optional 'id' etc.) or
    .jsonl (an object per line). Bad lines become failures, not a crash."""
    items: list[Item] = []
    failures: list[Failure] = []
    suffix = path.suffix.lower()
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CommandFailed(f"{path} is not UTF-8: {exc}") from None
    except OSError as exc:
        raise CommandFailed(f"cannot read {path}: {exc.strerror}") from None

    def add(line: int, record: dict[str, Any]) -> None:
        unknown = set(record) - ITEM_KEYS
        if unknown:
            failures.append(Failure(line, None, f"unknown fields: {', '.join(sorted(unknown))}"))
            return
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            failures.append(Failure(line, None, "no text"))
            return
        ident = record.get("id")
        name = _SAFE_NAME.sub("_", str(ident)).strip("._")[:120] if ident not in (None, "") else f"{line:06d}"
        if not name:
            failures.append(Failure(line, None, f"id {ident!r} makes no usable file name"))
            return
        try:
            params = {k: _coerce(k, v) for k, v in record.items() if k not in ("id", "text")}
        except (TypeError, ValueError) as exc:
            failures.append(Failure(line, name, f"bad value: {exc}"))
            return
        items.append(Item(line, name, text, {k: v for k, v in params.items() if v is not None}))

    if suffix == ".txt":
        for n, text in enumerate(raw.splitlines(), 1):
            if text.strip():
                add(n, {"text": text})
    elif suffix == ".jsonl":
        for n, text in enumerate(raw.splitlines(), 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except ValueError as exc:
                failures.append(Failure(n, None, f"not JSON: {exc}"))
                continue
            if not isinstance(record, dict):
                failures.append(Failure(n, None, "not a JSON object"))
                continue
            add(n, record)
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(raw, newline=""))
        if not reader.fieldnames or "text" not in reader.fieldnames:
            raise CommandFailed(f"{path}: the CSV needs a header row with a 'text' column")
        for record in reader:
            add(reader.line_num, {k: v for k, v in record.items() if k is not None})
    else:
        raise CommandFailed(f"{path}: use a .txt, .csv or .jsonl file")
    seen: dict[str, int] = {}
    unique = []
    for item in items:
        if item.name in seen:
            failures.append(Failure(item.line, item.name, f"duplicate id (first on line {seen[item.name]})"))
        else:
            seen[item.name] = item.line
            unique.append(item)
    return unique, failures


def output_is_valid(path: Path, fmt: str) -> bool:
    """An existing output counts as done only if it decodes (a previous run renamed it
    into place only when complete, but a user may have copied junk there)."""
    try:
        if path.stat().st_size == 0:
            return False
    except OSError:
        return False
    if fmt == "pcm":
        return path.stat().st_size % 2 == 0
    try:
        import soundfile

        return soundfile.info(str(path)).frames > 0
    except Exception:
        return False


async def _run_batch(obj: Ctx, items: list[Item], out_dir: Path, defaults: dict[str, Any], concurrency: int,
                     retries: int, timeout: float, progress, task) -> tuple[list[Failure], int]:
    failures: list[Failure] = []
    written = 0
    sem = asyncio.Semaphore(concurrency)
    async with async_http_client(obj.socket, timeout=timeout, connections=concurrency) as client:

        async def one(item: Item) -> None:
            nonlocal written
            params = {**defaults, **item.params}
            fmt = params.get("format") or "wav"
            target = out_dir / f"{item.name}{FORMAT_SUFFIX.get(fmt, '.' + fmt)}"
            body = {"text": item.text, **params, "format": fmt}
            async with sem:
                error: RequestFailed | None = None
                for attempt in range(retries + 1):
                    try:
                        response = await client.post("/v1/synthesize", json=body)
                        if response.status_code == 200:
                            write_atomic(target, response.content)
                            written += 1
                            error = None
                            break
                        error = error_from_response(response)
                    except httpx.HTTPError as exc:
                        error = transport_error(exc, obj.socket)
                    if not error.retryable or attempt == retries:
                        break
                    # Honour Retry-After (never sooner, spread a little); otherwise back off.
                    if error.retry_after is not None:
                        await asyncio.sleep(error.retry_after * random.uniform(1.0, 1.2))
                    else:
                        await asyncio.sleep(backoff_delay(attempt, base=0.5, cap=30.0))
                if error is not None:
                    failures.append(Failure(item.line, item.name, str(error)))
            progress.advance(task)

        await asyncio.gather(*(one(item) for item in items))
    return failures, written


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--concurrency", type=click.IntRange(1, 256), default=4, show_default=True)
@click.option("--voice", default=None)
@click.option("--speaker", default=None, help="default speaker for lines without a 'speaker' field")
@click.option("--format", "fmt", default="wav", show_default=True)
@click.option("--rate", type=int, default=None, help="output sample rate")
@click.option("--speed", type=float, default=None)
@click.option("--seed", type=int, default=None, help="default seed for lines without one")
@click.option("--retries", type=click.IntRange(0, 20), default=5, show_default=True,
              help="per line, on 503/5xx/timeouts/connection errors")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="per request, seconds")
@click.pass_obj
def batch(obj: Ctx, input_path: Path, out_dir: Path, concurrency: int, voice: str | None, speaker: str | None,
          fmt: str,
          rate: int | None, speed: float | None, seed: int | None, retries: int, timeout: float) -> None:
    """Synthesize every line of INPUT (.txt, .csv or .jsonl) into OUT_DIR; resumable."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Table

    console = Console(stderr=True)
    items, failures = read_items(input_path)
    defaults = {k: v for k, v in dict(voice=voice, speaker=speaker, format=fmt.lower(), sample_rate=rate, speed=speed,
                                      seed=seed).items()
                if v is not None}
    out_dir.mkdir(parents=True, exist_ok=True)
    todo, skipped = [], 0
    for item in items:
        item_fmt = item.params.get("format") or defaults["format"]
        if output_is_valid(out_dir / f"{item.name}{FORMAT_SUFFIX.get(item_fmt, '.' + item_fmt)}", item_fmt):
            skipped += 1
        else:
            todo.append(item)
    started = time.monotonic()
    with Progress(TextColumn("[bold]synthesizing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False) as progress:
        task = progress.add_task("batch", total=len(todo))
        run_failures, written = asyncio.run(
            _run_batch(obj, todo, out_dir, defaults, concurrency, retries, timeout, progress, task))
    failures.extend(run_failures)
    failures.sort(key=lambda f: f.line)
    report = out_dir / "failures.jsonl"
    if failures:
        write_atomic(report, "".join(json.dumps(f.__dict__) + "\n" for f in failures).encode())
    else:
        report.unlink(missing_ok=True)
    elapsed = time.monotonic() - started
    console.print(f"{written} written, {skipped} already done, {len(failures)} failed, in {elapsed:.1f} s -> {out_dir}")
    if failures:
        table = Table("line", "output", "error", title=f"failures (all in {report})")
        for f in failures[:20]:
            table.add_row(str(f.line), f.name or "-", f.error)
        if len(failures) > 20:
            table.add_row("...", "", f"{len(failures) - 20} more")
        console.print(table)
        sys.exit(1)


# -- status / voices / wait-ready ------------------------------------------------------------

@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def status(obj: Ctx, as_json: bool) -> None:
    """Provisioner and runtime side by side."""
    from provisioner.status import read_status

    prov = read_status(obj.config.provisioner_runtime_dir)
    try:
        with obj.client(10.0) as client:
            rt: dict[str, Any] = client.status()
    except RequestFailed as exc:
        rt = {"error": str(exc)}
    from .alerts import diagnose

    found = diagnose(prov, rt)
    if as_json:
        watch = [{"failure": w, "model": m, "alert": a, "metric": x} for w, m, a, x in found]
        click.echo(json.dumps({"provisioner": prov, "runtime": rt, "watch": watch}, indent=2, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("", "provisioner", "runtime", title="tts-fleet status")
    if prov is None:
        prov_state = f"no status in {obj.config.provisioner_runtime_dir}"
    else:
        prov_state = f"{prov.get('state')} (ready: {prov.get('ready')}), updated {prov.get('updated')}"
    if "error" in rt:
        rt_state = rt["error"]
    else:
        rt_state = "ready" if rt.get("ready") else f"not ready: {rt.get('reason')}"
        rt_state += f", worker {'alive' if rt.get('worker_alive') else 'NOT alive'}"
    table.add_row("state", prov_state, rt_state)
    if "error" not in rt:
        q = rt.get("queue", {})
        table.add_row("work", f"{(prov or {}).get('syncs_completed', 0)} syncs",
                      f"queue {q.get('depth')}/{q.get('capacity')}, {rt.get('batches_served')} batches, "
                      f"{rt.get('requests_served')} requests")
    names = sorted(set((prov or {}).get("models", {})) | set(rt.get("models", {}) or {}))
    for name in names:
        p = (prov or {}).get("models", {}).get(name)
        r = (rt.get("models") or {}).get(name)
        if p:
            p_text = f"{p.get('state')}: current {p.get('current_version')}, wanted {p.get('wanted_version')}"
            if p.get("files_total"):
                p_text += f", {p.get('files_done')}/{p.get('files_total')} files"
            if p.get("error"):
                p_text += f", error: {p['error']}"
        else:
            p_text = "-"
        if r:
            r_text = (f"serving {r.get('version')} on {r.get('device')}" if r.get("loaded")
                      else f"waiting: {r.get('waiting')}")
            if r.get("last_error"):
                r_text += f", last error: {r['last_error']}"
        else:
            r_text = "-"
        table.add_row(f"model {name}", p_text, r_text)
    for what, model, alert, metric in found:  # where the fleet's monitoring shows it (docs/operations.md)
        table.add_row("watch", f"{what}{'' if model == '-' else f' ({model})'}", f"alert {alert}, metric {metric}")
    Console().print(table)


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def voices(obj: Ctx, as_json: bool) -> None:
    """Voices the runtime serves."""
    with obj.client(10.0) as client:
        data = client.voices()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("voice", "default", "loaded", "version", "language", "quality", "sample rate", "speakers", "device")
    for v in data.get("voices", []):
        names = list(v.get("speakers") or {})
        speakers = str(v.get("num_speakers") or "-") + (
            f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else "")
        table.add_row(v["name"], "yes" if v.get("default") else "", "yes" if v.get("loaded") else "no",
                      str(v.get("version") or "-"), str(v.get("language") or "-"), str(v.get("quality") or "-"),
                      str(v.get("sample_rate") or "-"), speakers, str(v.get("device") or "-"))
    Console().print(table)


@main.command("wait-ready")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="seconds; exit 1 after that")
@click.option("--quiet", "-q", is_flag=True)
@click.pass_obj
def wait_ready(obj: Ctx, timeout: float, quiet: bool) -> None:
    """Wait until the runtime can synthesize (exit 0) or the timeout passes (exit 1)."""
    deadline = time.monotonic() + timeout
    delay = 0.2
    last = None
    with obj.client(5.0) as client:
        while True:
            # A starting runtime answers once its first look at the cache is over (docs/runtime.md):
            # until then the probe waits in the socket's backlog, up to 30 s at a time.
            ready, reason = client.ready(timeout=max(0.5, min(30.0, deadline - time.monotonic())))
            if ready:
                if not quiet:
                    click.echo("ready")
                return
            if reason != last and not quiet:
                click.echo(f"waiting: {reason}", err=True)
                last = reason
            left = deadline - time.monotonic()
            if left <= 0:
                raise CommandFailed(f"not ready after {timeout:g} s: {reason}")
            time.sleep(min(delay, left))
            delay = min(delay * 1.5, 2.0)


@main.command("cache", add_help_option=False,
              context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def cache(args: tuple[str, ...]) -> None:
    """The provisioner's CLI (snapshots, verify, rollback, gc): runs `tts-provisioner ARGS`."""
    # By its console script, not an import: the runtime side uses only the provisioner's
    # read-only cache API (pyproject.toml's import contracts).
    beside = Path(sys.executable).parent / PROVISIONER_CLI  # the same virtualenv's bin/
    exe = str(beside) if beside.is_file() else shutil.which(PROVISIONER_CLI)
    if exe is None:
        raise CommandFailed(f"{PROVISIONER_CLI} is not installed (it comes with the provisioner)")
    os.execv(exe, [exe, *args])


if __name__ == "__main__":
    main()
