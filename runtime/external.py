"""Audio from model servers nobody here wrote, for `tts-ctl check --url` (the audio gate of
any model server, docs/models.md): an OpenAI-compatible `/v1/audio/speech`, piper's own HTTP
server (`POST /synthesize`), or a Wyoming server (Home Assistant's protocol, `tcp://`).

Each returns (mono float32 samples, sample rate); any failure is a `RequestFailed` naming
the server and what went wrong.
"""

from __future__ import annotations

import io
import json
import socket
from urllib.parse import urlsplit

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


def _read_event(f) -> tuple[dict, dict, bytes]:
    """One Wyoming event: a JSON header line, then data_length bytes of JSON data and
    payload_length bytes of payload."""
    line = f.readline()
    if not line:
        raise EOFError("connection closed")
    header = json.loads(line)
    data = dict(header.get("data") or {})
    if header.get("data_length"):
        data.update(json.loads(f.read(header["data_length"])))
    payload = f.read(header["payload_length"]) if header.get("payload_length") else b""
    return header, data, payload


def _wyoming(url: str, text: str, voice: str | None, timeout: float) -> tuple[np.ndarray, int]:
    parts = urlsplit(url)
    if parts.scheme != "tcp" or not parts.hostname or not parts.port:
        raise RequestFailed(f"{url}: a Wyoming server is addressed as tcp://HOST:PORT")
    request = {"text": text, **({"voice": {"name": voice}} if voice else {})}
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock, \
                sock.makefile("rwb") as f:
            body = json.dumps(request).encode()
            f.write(json.dumps({"type": "synthesize", "data_length": len(body)}).encode() + b"\n" + body)
            f.flush()
            chunks, rate, width = [], 22050, 2
            for _ in range(100_000):  # bounded: a sentence is far fewer chunks
                kind, data, payload = _read_event(f)
                kind = kind.get("type")
                if kind == "error":
                    raise RequestFailed(f"{url}: the server answered error: {data.get('text')}")
                if kind in ("audio-start", "audio-chunk"):
                    rate, width = data.get("rate", rate), data.get("width", width)
                    chunks.append(payload)
                elif kind == "audio-stop":
                    break
    except (OSError, EOFError, ValueError) as exc:
        raise RequestFailed(f"{url}: {exc}") from None
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
