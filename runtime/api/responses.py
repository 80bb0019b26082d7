"""From a speech request to its HTTP answer, for both synthesis endpoints (native and OpenAI):
the checks, the synthesis service's work, the headers, and the plain (whole) answer. Streamed
answers are streaming.py's."""

from __future__ import annotations

from functools import partial
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from .. import audio
from .errors import HttpError
from .record import access_record
from .service import Runtime
from .streaming import streamable, streamed_response
from .synthesis import ClientGone, admit, prepare


async def until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def synthesize(
    runtime: Runtime, request: Request, *, text: str, voice: str, fmt: str, param: str,
    sample_rate: int | None, volume: float, stream: bool, speaker_param: str = "speaker", **scales: Any,
) -> Response:
    """`param` and `speaker_param` name the fields that carried the text and the speaker (errors
    name them); `scales` go to the planner (seed, speaker, length_scale, noise_scale, noise_w, speed)."""
    record = access_record(request)
    record.synthesizing(voice, text)
    model = admit(runtime, text, voice, param)
    if stream and not streamable(fmt):
        raise HttpError(422, f"format {fmt!r} cannot be streamed; use wav, pcm, mp3, ogg or opus",
                        "invalid_request_error", "format")
    synthesis = await prepare(runtime, model, voice, text, param, speaker_param, **scales)
    sr = synthesis.sample_rate
    # the version that planned it synthesizes all of it (synthesis.py: one version per request)
    headers = {"X-Voice": voice, "X-Voice-Version": synthesis.version,
               "X-Sample-Rate": str(audio.output_rate(fmt, sample_rate or sr))}
    synthesis.submit(stream=stream, progressive=stream)
    try:
        first = await synthesis.first(partial(until_disconnect, request))
    except ClientGone:
        record.client_gone()
        return Response(status_code=499)
    if stream:
        return streamed_response(synthesis, first, fmt, sample_rate, volume, record, headers)
    record.timings(synthesis.jobs)
    wave = synthesis.joined(first)
    record.audio_s = len(wave) / sr
    headers["X-Audio-Seconds"] = f"{len(wave) / sr:.3f}"
    data = await run_in_threadpool(audio.encode, wave, sr, fmt, target_rate=sample_rate, volume=volume)
    return Response(content=data, media_type=audio.SUPPORTED_FORMATS[fmt], headers=headers)
