"""Audio from model servers nobody here wrote, for `tts-ctl check --url` (the audio gate of
any model server, docs/models.md): an OpenAI-compatible `/v1/audio/speech`, piper's own HTTP
server (`POST /synthesize`), or a Wyoming server (Home Assistant's protocol, `tcp://`).

Each returns (mono float32 samples, sample rate); any failure is a `RequestFailed` naming
the server and what went wrong. Wyoming is spoken with the `wyoming` library's client.
"""

from __future__ import annotations

import io

import httpx
import numpy as np

from .client import RequestFailed

APIS = ("openai", "piper", "wyoming")


def _decode_wav(content: bytes, where: str) -> tuple[np.ndarray, int]:
    import soundfile

    try:
        wave, rate = soundfile.read(io.BytesIO(content), dtype="float32")
    except RuntimeError as exc:
        raise RequestFailed(f"{where}: the answer is not a readable WAV ({exc})") from None
    return (wave.mean(axis=1) if wave.ndim > 1 else wave), rate


def _post(url: str, body: dict, timeout: float) -> bytes:
    try:
        response = httpx.post(url, json=body, timeout=timeout)
    except httpx.HTTPError as exc:
        raise RequestFailed(f"{url}: {exc}") from None
    if response.status_code >= 400:
        raise RequestFailed(f"{url}: HTTP {response.status_code}: {response.text[:200].strip()}")
    return response.content


async def _wyoming_audio(url: str, text: str, voice: str | None) -> tuple[list[bytes], int, int]:
    """Synthesize over Wyoming with the protocol's own library (the client Home Assistant uses)."""
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.client import AsyncClient
    from wyoming.error import Error
    from wyoming.tts import Synthesize, SynthesizeVoice

    chunks, rate, width = [], 22050, 2
    async with AsyncClient.from_uri(url) as client:
        await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(name=voice) if voice else None).event())
        for _ in range(100_000):  # bounded: a sentence is far fewer chunks
            event = await client.read_event()
            if event is None:
                raise EOFError("the server closed the connection before audio-stop")
            if Error.is_type(event.type):
                raise RequestFailed(f"{url}: the server answered error: {Error.from_event(event).text}")
            if AudioStart.is_type(event.type):
                start = AudioStart.from_event(event)
                rate, width = start.rate, start.width
            elif AudioChunk.is_type(event.type):
                chunk = AudioChunk.from_event(event)
                rate, width = chunk.rate, chunk.width
                chunks.append(chunk.audio)
            elif AudioStop.is_type(event.type):
                break
    return chunks, rate, width


def _wyoming(url: str, text: str, voice: str | None, timeout: float) -> tuple[np.ndarray, int]:
    import asyncio

    if not url.startswith(("tcp://", "unix://")):
        raise RequestFailed(f"{url}: a Wyoming server is addressed as tcp://HOST:PORT or unix://PATH")
    try:
        chunks, rate, width = asyncio.run(asyncio.wait_for(_wyoming_audio(url, text, voice), timeout))
    except (OSError, EOFError, ValueError, asyncio.TimeoutError) as exc:
        raise RequestFailed(f"{url}: {exc or type(exc).__name__}") from None
    if width != 2:
        raise RequestFailed(f"{url}: {width}-byte samples; only 16-bit audio is checked")
    pcm = np.frombuffer(b"".join(chunks), dtype="<i2").astype(np.float32) / 32768.0
    return pcm, int(rate)


def fetch_audio(url: str, api: str, text: str, voice: str | None, timeout: float) -> tuple[np.ndarray, int]:
    """Synthesize `text` on the server at `url` speaking `api`."""
    if api == "wyoming":
        return _wyoming(url, text, voice, timeout)
    if api == "piper":
        body = {"text": text, **({"voice": voice} if voice else {})}
    else:
        body = {"model": voice or "tts-1", "input": text, "voice": voice or "default", "response_format": "wav"}
    return _decode_wav(_post(url, body, timeout), url)
