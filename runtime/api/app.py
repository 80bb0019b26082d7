"""create_app: the FastAPI app with every route, inside the access layer.

Endpoints: POST /v1/synthesize (native; `stream=true` sends sentence-sized chunks),
POST /v1/audio/speech (OpenAI-compatible, openai.py), GET /v1/voices, GET /healthz,
GET /readyz, GET /v1/status, GET /metrics (Prometheus), POST /v1/reload.
"""

from __future__ import annotations

import asyncio
import signal
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from .. import audio
from . import openai, responses, streaming
from .access import AccessLayer
from .auth import AuthLayer, BearerTokens
from .errors import install_handlers
from .schemas import SynthesizeBody, supported_format
from .service import Runtime

log = structlog.get_logger(__name__)


def create_app(runtime: Runtime, tokens: BearerTokens | None = None) -> AccessLayer:
    """The ASGI app to serve: the access layer around the bearer-token check (TCP connections
    only, auth.py) around the FastAPI app (the body-size limit is the access layer's, outside
    FastAPI). Without `tokens` a request over TCP is always refused."""
    app = FastAPI(title="tts-runtime", lifespan=_lifespan(runtime), docs_url=None, redoc_url=None)
    app.state.runtime = runtime
    install_handlers(app)
    streaming.quiet_stream_aborts()
    _add_native_routes(app, runtime)
    openai.add_routes(app, runtime)
    _add_service_routes(app, runtime)
    return AccessLayer(AuthLayer(app, tokens), runtime)


def _lifespan(runtime: Runtime):
    def on_sighup() -> None:
        log.info("SIGHUP: re-checking the model cache")
        runtime.manager.request_reload()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start()
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
        except (ValueError, RuntimeError, NotImplementedError):  # not the main thread (tests)
            pass
        try:
            yield
        finally:
            await run_in_threadpool(runtime.stop)

    return lifespan


def _add_native_routes(app: FastAPI, runtime: Runtime) -> None:
    """POST /v1/synthesize: this API's own synthesis, every option (OpenAI's is openai.py)."""
    config = runtime.config

    @app.post("/v1/synthesize")
    async def synthesize(body: SynthesizeBody, request: Request):
        fmt = supported_format(body.format, "format")
        return await responses.synthesize(
            runtime, request, text=body.text, voice=body.voice or config.default_voice, fmt=fmt, param="text",
            sample_rate=body.sample_rate, volume=body.volume, stream=body.stream, seed=body.seed,
            length_scale=body.length_scale, noise_scale=body.noise_scale, noise_w=body.noise_w, speed=body.speed,
            speaker=body.speaker,
        )


def _add_service_routes(app: FastAPI, runtime: Runtime) -> None:
    """Voices, probes, status, metrics and reload."""
    config = runtime.config

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
        return {"voices": out, "default": config.default_voice, "openai_aliases": sorted(openai.OPENAI_VOICES),
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

