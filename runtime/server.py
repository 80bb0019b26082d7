"""The HTTP API (FastAPI) in front of the scheduler, and the runtime object behind it.

Endpoints: POST /v1/synthesize (native; `stream=true` sends sentence-sized chunks),
POST /v1/audio/speech (OpenAI-compatible), GET /v1/voices, GET /healthz, GET /readyz,
GET /v1/status, GET /metrics (Prometheus), POST /v1/reload.

Nothing here calls the engine: text goes to phoneme ids on a single frontend thread
(espeak is not thread-safe), the sentences go to the scheduler's worker thread, and
the event loop only waits on futures. Every error a client can cause is a JSON answer
with a status code (never a traceback), in one shape:
`{"detail": "...", "error": {"message", "type", "param"}}` - `detail` for curl users
and FastAPI habits, `error` for OpenAI clients.
"""

from __future__ import annotations

import asyncio
import re
import struct
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import numpy as np
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tts_common.notify import notify, watchdog_interval

from . import audio
from .config import RuntimeConfig
from .models import LoadedModel, ModelManager, join_sentences, plan_utterances, silence
from .scheduler import DeadlineExceeded, Job, ModelUnavailable, QueueFull, Scheduler, WorkerStopped

log = structlog.get_logger(__name__)
access_log = structlog.get_logger("runtime.access")

# OpenAI's built-in voice names: existing client code sends these; they mean "the
# default voice" here, so such code works unchanged.
OPENAI_VOICES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse", "marin", "cedar"}
)
OPENAI_PCM_RATE = 24000  # OpenAI's "pcm" is 24 kHz 16-bit little-endian mono
MAX_SEED = 2**63 - 1
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_QUIET_PATHS = {"/healthz", "/readyz", "/metrics"}


# -- errors --------------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers, self.extra = headers or {}, extra


def _error_response(status: int, message: str, kind: str, param: str | None = None,
                    headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body = {"detail": message, "error": {"message": message, "type": kind, "param": param, "code": status}, **extra}
    return JSONResponse(body, status_code=status, headers=headers)


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


# -- request bodies --------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_lone_surrogates(text: str) -> str:
    # JSON's "\ud800" escape decodes to a lone surrogate: not a character anyone can speak
    found = _SURROGATE.search(text)
    if found:
        raise ValueError(f"contains a lone UTF-16 surrogate (U+{ord(found.group()):04X}) at character {found.start()}")
    return text


class SynthesizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str
    voice: str | None = None
    speaker: int | str | None = None  # multi-speaker voices: name (speaker_id_map) or id
    format: str = "wav"
    sample_rate: int | None = None
    length_scale: float | None = Field(None, gt=0.1, le=5.0)
    noise_scale: float | None = Field(None, ge=0.0, le=2.0)
    noise_w: float | None = Field(None, ge=0.0, le=2.0)
    speed: float | None = Field(None, ge=0.25, le=4.0)
    volume: float = Field(1.0, ge=0.0, le=4.0)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    stream: bool = False

    _text = field_validator("text")(_no_lone_surrogates)

    @field_validator("sample_rate")
    @classmethod
    def _rate(cls, v: int | None) -> int | None:
        if v is not None and v not in audio.SUPPORTED_RATES:
            raise ValueError(f"unsupported sample rate {v}; use one of {list(audio.SUPPORTED_RATES)}")
        return v


class SpeechBody(BaseModel):
    # OpenAI clients send fields this server has no use for (instructions,
    # stream_format): ignore them rather than break the client.
    model_config = ConfigDict(extra="ignore")

    model: str = "tts-1"
    input: str
    voice: str
    response_format: str = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)

    _input = field_validator("input")(_no_lone_surrogates)


# -- metrics ---------------------------------------------------------------------------

class Metrics:
    """One registry per app, so several apps (tests) never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tts_requests_total", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram(
            "tts_request_duration_seconds", "Request latency", ["endpoint"], registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
        )
        self.queue_depth = Gauge("tts_queue_depth", "Sentences waiting for the inference worker", registry=r)
        self.batch_size = Histogram("tts_batch_size", "Sentences per batch", registry=r,
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
        self.batch_seconds = Histogram("tts_batch_duration_seconds", "Engine time per batch", registry=r,
                                       buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.audio_seconds = Counter("tts_audio_seconds_total", "Audio produced", ["voice"], registry=r)
        self.errors = Counter("tts_errors_total", "Errors by kind", ["kind"], registry=r)
        self.ready = Gauge("tts_ready", "1 when every configured voice can synthesize", registry=r)

    def observe_batch(self, voice: str, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)


# -- the runtime -----------------------------------------------------------------------

class Runtime:
    """Model manager + scheduler + metrics + the systemd watchdog, started together."""

    def __init__(self, config: RuntimeConfig, loader=None):
        self.config = config
        self.metrics = Metrics()
        self.manager = ModelManager(config, loader)
        self.scheduler = Scheduler(
            self.manager.holder,
            max_batch_size=config.max_batch_size,
            max_batch_ids=config.max_batch_ids,
            express_max_ids=config.express_max_ids,
            max_wait_ms=config.max_wait_ms,
            queue_size=config.queue_size,
            on_batch=self.metrics.observe_batch,
        )
        self.metrics.queue_depth.set_function(lambda: self.scheduler.depth)
        self.metrics.ready.set_function(lambda: 1.0 if self.manager.ready else 0.0)
        # espeak (inside the frontend) keeps global state: one thread does all text work
        self.frontend_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="frontend")
        self.started_at = time.time()
        self.requests_served = 0
        self._stop = threading.Event()
        self._pinger: threading.Thread | None = None

    def start(self) -> None:
        self.scheduler.start()
        self.manager.start()
        interval = watchdog_interval()
        if interval:
            self._pinger = threading.Thread(target=self._watchdog, args=(interval,), name="watchdog", daemon=True)
            self._pinger.start()

    def stop(self) -> None:
        notify(STOPPING=1)
        self._stop.set()
        self.scheduler.stop()
        self.manager.stop()
        self.frontend_pool.shutdown(wait=False, cancel_futures=True)

    def _watchdog(self, interval: float) -> None:
        # Ping only while the inference worker is alive; a dead or wedged worker stops
        # the pings and systemd restarts the service.
        while not self._stop.wait(interval):
            if self.scheduler.alive(stuck_after=max(60.0, 2 * self.config.deadline_s)):
                notify(WATCHDOG=1)
            else:
                log.error("inference worker is not alive; withholding watchdog ping")

    async def frontend(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.frontend_pool, lambda: fn(*args, **kwargs))

    def status(self) -> dict[str, Any]:
        s = self.scheduler
        return {
            "ready": self.manager.ready,
            "reason": self.manager.reason or None,
            "default_voice": self.config.default_voice,
            "models": self.manager.describe(),
            "queue": {
                "depth": s.depth,
                "capacity": s.queue_size,
                "max_batch_size": s.max_batch_size,
                "max_batch_ids": s.max_batch_ids,
                "largest_batch_ids": s.largest_batch_ids,  # since start: padded size of the largest batch
                "longest_utterance_ids": s.longest_utterance,  # since start: longest utterance synthesized
                "max_wait_ms": s.max_wait * 1000,
                "held": s.held(),  # $TTS_RUNTIME_HOLD_FILE exists: no batch starts (drills, tests)
                "express_max_ids": s.express_max_ids,
                "overtakes": s.overtakes,  # short requests that ran while a long batch was paused
            },
            "worker_alive": s.alive(),
            "batches_served": s.batches_served,
            "sentences_served": s.jobs_served,
            "requests_served": self.requests_served,
            "uptime_s": round(time.time() - self.started_at, 1),
        }


# -- access log + request metrics (plain ASGI, so streaming and disconnects pass through) --

def _utf8_error(body: bytes) -> str | None:
    """Why a request body is not UTF-8, or None. Strict: an encoded lone surrogate (ED A0 80),
    which Python's JSON reader would let through, is invalid UTF-8 like any other bad byte."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"the request body is not valid UTF-8 (byte {exc.start}: {exc.reason})"
    return None


class AccessLog:
    """The outermost layer: request id, access log, metrics, and the body-size limit (here
    rather than FastAPI's, whose refusal is a plain-text 413 that skips the JSON error shape)."""

    def __init__(self, app, runtime: Runtime):
        self.app = app
        self.runtime = runtime
        # Room for the longest allowed text in JSON: a character outside the BMP escapes as a
        # surrogate pair, 12 bytes ("\ud83d\ude00"); max_chars counts it as one.
        self.max_body = runtime.config.max_chars * 12 + 16384

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid, declared = None, None
        for key, value in scope.get("headers", []):
            if key == b"x-request-id":
                candidate = value.decode("latin-1")
                rid = candidate if _REQUEST_ID.match(candidate) else None
            elif key == b"content-length" and value.isdigit():
                declared = int(value)
        info: dict[str, Any] = {"id": rid or uuid.uuid4().hex[:16]}
        scope["tts.access"] = info
        state = {"status": 500}
        started = time.monotonic()
        info["started"] = started

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", info["id"].encode())]
            await send(message)

        # The whole body is read here (it is small: max_body at most) so an oversized one, with or
        # without Content-Length, is refused before the app sees it.
        body, size, too_large = [], 0, declared is not None and declared > self.max_body
        while not too_large:
            message = await receive()
            body.append(message)
            if message["type"] != "http.request":
                break  # a disconnect: the app sees it
            size += len(message.get("body", b""))
            too_large = size > self.max_body
            if not message.get("more_body", False):
                break
        bad_utf8 = None if too_large else _utf8_error(b"".join(m.get("body", b"") for m in body))

        async def replay():
            return body.pop(0) if body else await receive()

        try:
            if too_large:
                message = (f"request body is over the limit of {self.max_body} bytes "
                           f"(max_chars {self.runtime.config.max_chars} characters of text)")
                info.update(error=message, error_kind="body_too_large")
                response = _error_response(413, message, "body_too_large", headers={"Connection": "close"})
                await response(scope, receive, send_wrapper)
            elif bad_utf8:
                info.update(error=bad_utf8, error_kind="bad_request")
                await _error_response(400, bad_utf8, "bad_request")(scope, receive, send_wrapper)
            else:
                await self.app(scope, replay, send_wrapper)
        finally:
            self._record(scope, info, state["status"], time.monotonic() - started)

    def _record(self, scope, info: dict[str, Any], status: int, seconds: float) -> None:
        path = scope.get("path", "")
        endpoint = path if path in _KNOWN_PATHS else "other"
        metrics = self.runtime.metrics
        status = info.get("status_override", status)
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.latency.labels(endpoint).observe(seconds)
        if info.get("error_kind"):
            metrics.errors.labels(info["error_kind"]).inc()
        if info.get("audio_s"):
            metrics.audio_seconds.labels(info.get("voice") or "?").inc(info["audio_s"])
        if endpoint in ("/v1/synthesize", "/v1/audio/speech") and status == 200:
            self.runtime.requests_served += 1
        text = info.pop("text", None)
        fields = {
            "id": info["id"], "method": scope.get("method"), "path": path, "status": status,
            "voice": info.get("voice"), "chars": info.get("chars"),
            "audio_s": round(info["audio_s"], 3) if info.get("audio_s") else None,
            "queue_ms": info.get("queue_ms"), "synth_ms": info.get("synth_ms"),
            "first_audio_ms": info.get("first_audio_ms"), "first_piece_s": info.get("first_piece_s"),
            "total_ms": round(seconds * 1000, 1),
        }
        if info.get("error"):
            fields["error"] = info["error"]
        fields = {k: v for k, v in fields.items() if v is not None}
        if path in _QUIET_PATHS:  # probes poll these; keep them out of the journal
            access_log.debug("request", **fields)
            return
        if text is not None and access_log.isEnabledFor(10):  # the text only when debugging
            fields["text"] = text
        access_log.info("request", **fields)


_KNOWN_PATHS = {
    "/v1/synthesize", "/v1/audio/speech", "/v1/voices", "/healthz", "/readyz",
    "/v1/status", "/metrics", "/v1/reload",
}


# -- helpers for the synthesis endpoints -------------------------------------------------

def _supported_format(fmt: str, param: str) -> str:
    fmt = fmt.lower()
    if fmt not in audio.SUPPORTED_FORMATS:
        raise ApiError(422, f"{param}: unsupported format {fmt!r}; use one of {sorted(audio.SUPPORTED_FORMATS)}",
                       "invalid_request_error", param)
    return fmt


def _streamable(fmt: str) -> bool:
    # Formats that can go out piece by piece as one valid stream.
    return fmt in {"wav", "pcm", "mp3", "ogg", "opus"}


# Streamed formats whose pieces go through one resampler and one encoder run (raw samples, or
# audio.StreamEncoder), so a stream can start with part of its first sentence.
PROGRESSIVE_FORMATS = frozenset({"wav", "pcm"} | (audio.STREAM_ENCODED & set(audio.SUPPORTED_FORMATS)))


def _check_text(runtime: Runtime, text: str, param: str) -> None:
    if not text.strip():
        raise ApiError(422, f"{param}: text is empty", "invalid_request_error", param)
    if len(text) > runtime.config.max_chars:
        raise ApiError(413, f"{param}: text is {len(text)} characters, over the limit of {runtime.config.max_chars}",
                       "text_too_long", param)


def _require_voice(runtime: Runtime, voice: str, param: str) -> LoadedModel:
    if voice not in runtime.config.models:
        raise ApiError(404, f"unknown voice {voice!r}; available: {', '.join(runtime.config.models)}",
                       "unknown_voice", param, voices=list(runtime.config.models))
    model = runtime.manager.holder.get(voice)
    if model is None:
        raise ApiError(503, f"not ready: {runtime.manager.reasons.get(voice) or 'loading'}", "not_ready",
                       headers={"Retry-After": "5"})
    return model


async def _plan(runtime: Runtime, model: LoadedModel, text: str, param: str, speaker_param: str = "speaker",
                **kwargs):
    """The request's utterances and, for each, whether a sentence pause follows it."""
    from .engine import UnknownSpeakerError
    from .frontend import EmptyTextError, TextTooLongError

    try:
        requests, pauses = await runtime.frontend(plan_utterances, model.engine, text, **kwargs)
    except UnknownSpeakerError as exc:
        raise ApiError(404, f"{speaker_param}: {exc}", "unknown_speaker", speaker_param) from None
    except TextTooLongError as exc:
        raise ApiError(413, f"{param}: {exc}", "text_too_long", param) from None
    except EmptyTextError as exc:
        raise ApiError(422, f"{param}: {exc}", "invalid_request_error", param) from None
    if not requests:
        raise ApiError(422, f"{param}: nothing to speak in this text", "invalid_request_error", param)
    total = sum(len(r.phoneme_ids) for r in requests)
    limit = runtime.config.max_request_ids
    if total > limit:  # its audio and its time on the worker grow with it: refuse before queueing
        raise ApiError(413, f"{param}: text is {total} phoneme ids, over the limit of {limit} (max_request_ids)",
                       "text_too_long", param, limit={"max_request_ids": limit, "phoneme_ids": total})
    return requests, pauses


def _submit(runtime: Runtime, voice: str, requests: list, deadline: float, first_alone: bool = False,
            on_first_piece=None) -> list[Job]:
    try:
        return runtime.scheduler.submit(voice, requests, deadline, first_alone=first_alone,
                                        on_first_piece=on_first_piece)
    except QueueFull as exc:
        raise ApiError(503, str(exc), "queue_full", headers={"Retry-After": str(exc.retry_after)}) from None
    except WorkerStopped as exc:
        raise ApiError(503, str(exc), "shutting_down", headers={"Retry-After": "5"}) from None


class ClientGone(Exception):
    pass


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _await_jobs(runtime: Runtime, request: Request | None, jobs: list[Job], deadline: float,
                      early: asyncio.Future | None = None) -> list[np.ndarray]:
    """Wait for jobs; cancel them if the client goes away or the deadline passes. With
    `early` (a stream's first piece), return [that piece] as soon as it comes, the jobs
    running on."""
    gathered = asyncio.gather(*(asyncio.wrap_future(job.future) for job in jobs))
    watchers = {gathered} if early is None else {gathered, early}
    gone = asyncio.ensure_future(_until_disconnect(request)) if request is not None else None
    if gone is not None:
        watchers.add(gone)
    try:
        done, _ = await asyncio.wait(watchers, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if gathered in done:
            return gathered.result()
        if early is not None and early in done:
            return [early.result()]
        if gone is not None and gone in done:
            raise ClientGone()
        raise DeadlineExceeded("deadline passed")
    finally:
        if gone is not None:
            gone.cancel()
        first_piece_out = early is not None and early.done()  # then the jobs run on for the rest
        if not gathered.done() and not first_piece_out:
            runtime.scheduler.cancel(jobs)
            gathered.cancel()
            try:
                await gathered
            except BaseException:
                pass


def _job_error(exc: BaseException) -> ApiError:
    if isinstance(exc, DeadlineExceeded):
        return ApiError(504, "synthesis did not finish within the deadline", "deadline_exceeded")
    if isinstance(exc, (ModelUnavailable, WorkerStopped)):
        return ApiError(503, str(exc), "not_ready", headers={"Retry-After": "5"})
    from .engine import EngineOOMError  # lazily: torch is loaded by then

    if isinstance(exc, EngineOOMError):  # halving the batch did not help; the worker goes on
        log.error("synthesis out of memory", error=str(exc))
        return ApiError(503, f"insufficient memory: {exc}", "insufficient_memory", headers={"Retry-After": "10"})
    log.error("synthesis failed", error=f"{type(exc).__name__}: {exc}")
    return ApiError(500, f"synthesis failed: {type(exc).__name__}", "synthesis_error")


def _timings(info: dict[str, Any], jobs: list[Job]) -> None:
    info["queue_ms"] = round(max(j.queue_seconds for j in jobs) * 1000, 1)
    # wall time from the first sentence starting to the last finishing (batches overlap jobs)
    starts = [j.started for j in jobs if j.started is not None]
    ends = [j.finished for j in jobs if j.finished is not None]
    info["synth_ms"] = round((max(ends) - min(starts)) * 1000, 1) if starts and ends else None


def _first_audio(info: dict[str, Any], piece_s: float) -> None:
    """Access-log fields of a stream: when its first audio went out and how much it held."""
    info["first_audio_ms"] = round((time.monotonic() - info["started"]) * 1000, 1) if "started" in info else None
    info["first_piece_s"] = round(piece_s, 3)


def _wav_stream_header(rate: int) -> bytes:
    # Streaming WAV: the length is unknown up front; 0xFFFFFFFF is what players accept.
    return b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16
    ) + b"data" + struct.pack("<I", 0xFFFFFFFF)


async def _synthesize(
    runtime: Runtime, request: Request, *, text: str, voice: str, fmt: str, param: str,
    sample_rate: int | None, volume: float, stream: bool, speaker_param: str = "speaker", **scales: Any,
) -> Response:
    info = request.scope.get("tts.access", {})
    info.update(voice=voice, chars=len(text), text=text)
    _check_text(runtime, text, param)
    model = _require_voice(runtime, voice, "voice")
    if stream and not _streamable(fmt):
        raise ApiError(422, f"format {fmt!r} cannot be streamed; use wav, pcm, mp3, ogg or opus",
                       "invalid_request_error", "format")
    requests, pauses = await _plan(runtime, model, text, param, speaker_param, **scales)
    deadline = time.monotonic() + runtime.config.deadline_s
    sr = model.engine.sample_rate
    out_rate = sample_rate or sr
    media_type = audio.SUPPORTED_FORMATS[fmt]
    headers = {"X-Voice": voice, "X-Voice-Version": model.snapshot.version,
               "X-Sample-Rate": str(audio.output_rate(fmt, out_rate))}
    # Streamed WAV/PCM/Opus starts before the first sentence is fully decoded: their pieces go
    # through one resampler and one encoder run, so they join seamlessly. MP3 pieces are
    # separate encoder runs (see audio.StreamEncoder), which leave a gap where they meet, so
    # MP3 streams send whole sentences.
    early = None
    if stream and fmt in PROGRESSIVE_FORMATS:
        loop = asyncio.get_running_loop()
        early = loop.create_future()

        def on_first_piece(piece: np.ndarray) -> None:  # the worker thread
            try:
                loop.call_soon_threadsafe(lambda: early.done() or early.set_result(piece))
            except RuntimeError:  # the loop has closed (shutdown): nobody is waiting for the piece
                pass
    jobs = _submit(runtime, voice, requests, deadline, first_alone=stream,
                   on_first_piece=on_first_piece if early is not None else None)
    try:
        if not stream:
            waves = await _await_jobs(runtime, request, jobs, deadline)
        else:
            waves = await _await_jobs(runtime, request, jobs[:1], deadline, early)
    except ClientGone:
        runtime.scheduler.cancel(jobs)
        info.update(status_override=499, error="client disconnected", error_kind="client_gone")
        return Response(status_code=499)
    except BaseException as exc:
        runtime.scheduler.cancel(jobs)
        if isinstance(exc, Exception):
            raise _job_error(exc) from None
        raise
    if not stream:
        _timings(info, jobs)
        wave = join_sentences(waves, sr, pauses)
        info["audio_s"] = len(wave) / sr
        headers["X-Audio-Seconds"] = f"{len(wave) / sr:.3f}"
        data = await run_in_threadpool(audio.encode, wave, sr, fmt, target_rate=sample_rate, volume=volume)
        return Response(content=data, media_type=media_type, headers=headers)

    async def chunks() -> AsyncIterator[bytes]:
        done = 0
        produced = 0.0
        try:
            if fmt == "wav":
                yield _wav_stream_header(out_rate)
            one_run = fmt in PROGRESSIVE_FORMATS
            resampler = audio.StreamResampler(sr, out_rate) if one_run else None
            encoder = audio.StreamEncoder(fmt, out_rate, volume) if fmt in audio.STREAM_ENCODED else None

            def encode_piece(wave: np.ndarray, last: bool) -> bytes:
                if resampler is None:  # whole sentences, each its own encoder run
                    return audio.encode(wave, sr, fmt, target_rate=sample_rate, volume=volume)
                if encoder is not None:
                    return encoder(resampler(wave, last), last)
                return audio.encode(resampler(wave, last), out_rate, "pcm", volume=volume)

            for i, job in enumerate(jobs):
                wave = waves[0] if i == 0 else (await _await_jobs(runtime, None, [job], deadline))[0]
                if i == 0 and early is not None and early.done() and wave is early.result():
                    # only the first piece so far: send it, then the rest of the sentence
                    yield await run_in_threadpool(encode_piece, wave, False)
                    _first_audio(info, len(wave) / sr)
                    produced += len(wave) / sr
                    wave = (await _await_jobs(runtime, None, [job], deadline))[0][len(wave):]
                if i < len(jobs) - 1 and pauses[i]:
                    wave = np.concatenate([wave, silence(sr, pauses[i])])
                produced += len(wave) / sr
                info["audio_s"] = produced
                yield await run_in_threadpool(encode_piece, wave, i == len(jobs) - 1)
                if i == 0 and "first_audio_ms" not in info:
                    _first_audio(info, len(wave) / sr)
                done = i + 1
        except Exception as exc:  # the status line is gone already: end the stream early, say so in the log
            err = _job_error(exc)
            info.update(error=f"stream ended after {done} of {len(jobs)} sentences: {err.message}", error_kind=err.kind)
        finally:
            runtime.scheduler.cancel(jobs[done:])
            _timings(info, jobs[:max(done, 1)])

    return StreamingResponse(chunks(), media_type=media_type, headers=headers)


# -- the app ---------------------------------------------------------------------------------

def create_app(runtime: Runtime) -> FastAPI:
    config = runtime.config

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start()
        loop = asyncio.get_running_loop()
        try:
            import signal

            loop.add_signal_handler(signal.SIGHUP, _sighup)
        except (ValueError, RuntimeError, NotImplementedError):  # not the main thread (tests)
            pass
        try:
            yield
        finally:
            await run_in_threadpool(runtime.stop)

    def _sighup() -> None:
        log.info("SIGHUP: re-checking the model cache")
        runtime.manager.request_reload()

    # (the body-size limit is AccessLog's, outside the app)
    app = FastAPI(title="tts-runtime", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.runtime = runtime

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        info = request.scope.get("tts.access", {})
        info.update(error=exc.message, error_kind=exc.kind)
        return _error_response(exc.status, exc.message, exc.kind, exc.param, exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        problems = []
        kind = "invalid_request_error"
        first_param = None
        for err in exc.errors():
            if err.get("type") == "json_invalid":
                problems.append(f"malformed JSON: {err.get('ctx', {}).get('error', 'decode error')} at position {err['loc'][-1]}")
                kind = "malformed_json"
                continue
            where = _loc(tuple(err.get("loc", ())))
            first_param = first_param or where
            msg = "unknown field" if err.get("type") == "extra_forbidden" else (
                "required field is missing" if err.get("type") == "missing" else err.get("msg", "invalid"))
            problems.append(f"{where}: {msg.removeprefix('Value error, ')}")
        message = "; ".join(problems) or "invalid request"
        request.scope.get("tts.access", {}).update(error=message, error_kind=kind)
        return _error_response(422, message, kind, first_param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
            exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "the request body could not be parsed (is it UTF-8 JSON?)"
        request.scope.get("tts.access", {}).update(error=message, error_kind=kind)
        return _error_response(exc.status_code, message, kind, headers=getattr(exc, "headers", None))

    @app.post("/v1/synthesize")
    async def synthesize(body: SynthesizeBody, request: Request):
        fmt = _supported_format(body.format, "format")
        return await _synthesize(
            runtime, request, text=body.text, voice=body.voice or config.default_voice, fmt=fmt, param="text",
            sample_rate=body.sample_rate, volume=body.volume, stream=body.stream, seed=body.seed,
            length_scale=body.length_scale, noise_scale=body.noise_scale, noise_w=body.noise_w, speed=body.speed,
            speaker=body.speaker,
        )

    @app.post("/v1/audio/speech")
    async def speech(body: SpeechBody, request: Request):
        fmt = _supported_format(body.response_format, "response_format")
        # `voice` is "<voice>", "<voice>:<speaker>" (name or id) or an OpenAI stock name
        # (the default voice, or `model` when that names one, with its default speaker)
        voice, speaker = body.voice, None
        if voice not in config.models and ":" in voice:
            voice, speaker = voice.rsplit(":", 1)
        if voice not in config.models and (voice.lower() in OPENAI_VOICES or body.model in config.models):
            voice = body.model if body.model in config.models else config.default_voice
        # Streamed like OpenAI's own endpoint (chunked, first sentence first) where the format
        # allows; flac is sent whole.
        return await _synthesize(
            runtime, request, text=body.input, voice=voice, fmt=fmt, param="input",
            sample_rate=OPENAI_PCM_RATE if fmt == "pcm" else None, volume=1.0, stream=_streamable(fmt),
            speaker_param="voice", seed=0, speed=body.speed, speaker=speaker,
        )

    @app.get("/v1/voices")
    async def voices():
        out = []
        described = runtime.manager.describe()
        for name in config.models:
            d = described[name]
            out.append({
                "name": name, "default": name == config.default_voice, "loaded": d["loaded"],
                "version": d.get("version"), "sample_rate": d.get("sample_rate"), "device": d.get("device"),
                "language": d.get("language"), "quality": d.get("quality"), "num_speakers": d.get("num_speakers"),
                "speakers": d.get("speakers"), "default_speaker": d.get("default_speaker"),
            })
        return {"voices": out, "default": config.default_voice, "openai_aliases": sorted(OPENAI_VOICES),
                "formats": sorted(audio.SUPPORTED_FORMATS)}

    @app.get("/healthz")
    async def healthz():
        alive = runtime.scheduler.alive()
        return JSONResponse({"status": "ok" if alive else "worker not alive", "worker_alive": alive},
                            status_code=200 if alive else 503)

    @app.get("/readyz")
    async def readyz():
        if runtime.manager.ready:
            return {"ready": True}
        return JSONResponse({"ready": False, "reason": runtime.manager.reason or "starting"}, status_code=503,
                            headers={"Retry-After": "5"})

    @app.get("/v1/status")
    async def status():
        return runtime.status()

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/reload")
    async def reload():
        before = {n: (m.get("version")) for n, m in runtime.manager.describe().items()}
        cycle = runtime.manager.request_reload()
        finished = await run_in_threadpool(runtime.manager.wait_cycle, cycle, 300.0)
        models = runtime.manager.describe()
        return JSONResponse({
            "finished": finished, "ready": runtime.manager.ready,
            "changed": {n: {"from": before[n], "to": m.get("version")} for n, m in models.items()
                        if before[n] != m.get("version")},
            "models": models,
        }, status_code=200 if finished else 202)

    return AccessLog(app, runtime)  # type: ignore[return-value]
