"""The runtime's HTTP API on a real Unix socket, with the real voice and engine."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.voice_fixtures import SERVER_MAX_CHARS

pytestmark = pytest.mark.integration

TEXTS = [
    "The quick brown fox jumps.",
    "A short test sentence.",
    "Servers answer many clients at once.",
    "Hello there!",
    "Batching must not mix audio between requests.",
    "One more line to speak.",
]


def _pcm(data: bytes) -> np.ndarray:
    wave, rate = sf.read(io.BytesIO(data), dtype="int16")
    assert rate == 22050
    return wave.astype(np.int32)


def _reference(engine, text: str, seed: int) -> np.ndarray:
    from runtime import audio

    return _pcm(audio.encode(engine.synthesize_text(text, seed=seed), engine.sample_rate, "wav"))


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    # batch invariance holds up to float rounding; after 16-bit quantisation that is a few LSB
    return a.shape == b.shape and int(np.abs(a - b).max()) <= 4


def test_same_seed_same_audio_alone_or_batched(server, engine):
    refs = {i: _reference(engine, t, seed=100 + i) for i, t in enumerate(TEXTS)}
    with server.client() as c:
        alone = c.post("/v1/synthesize", json={"text": TEXTS[0], "seed": 100})
        assert alone.status_code == 200, alone.text
        assert alone.headers["content-type"] == "audio/wav"
        assert _close(_pcm(alone.content), refs[0])

        def one(i):
            return i, c.post("/v1/synthesize", json={"text": TEXTS[i], "seed": 100 + i})

        with ThreadPoolExecutor(len(TEXTS)) as pool:
            results = list(pool.map(one, range(len(TEXTS))))
        batches_after = c.get("/v1/status").json()["batches_served"]
    for i, r in results:
        assert r.status_code == 200, r.text
        got = _pcm(r.content)
        assert _close(got, refs[i]), f"request {i} does not match its own audio"
        for j, ref in refs.items():  # and is nobody else's
            if j != i and ref.shape == got.shape:
                assert not _close(got, ref)
    # 7 requests took fewer batches than requests: they really were batched together
    assert batches_after < 7 + 1


def test_seed_changes_audio_and_voice_default(server):
    with server.client() as c:
        a = c.post("/v1/synthesize", json={"text": "Seeds matter.", "seed": 1}).content
        b = c.post("/v1/synthesize", json={"text": "Seeds matter.", "seed": 1, "voice": "joe"}).content
        d = c.post("/v1/synthesize", json={"text": "Seeds matter.", "seed": 2}).content
    assert _close(_pcm(a), _pcm(b))
    pa, pd = _pcm(a), _pcm(d)
    assert pa.shape != pd.shape or not _close(pa, pd)


def test_stream_sends_sentences_and_matches_full(server):
    text = "First sentence here. Second one follows. Third is short. Fourth arrives now. Fifth ends it."
    with server.client() as c:
        full = c.post("/v1/synthesize", json={"text": text, "seed": 7})
        assert full.status_code == 200
        chunks = []
        with c.stream("POST", "/v1/synthesize", json={"text": text, "seed": 7, "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers.get("transfer-encoding") == "chunked"
            for chunk in r.iter_bytes():
                chunks.append(chunk)
    data = b"".join(chunks)
    assert data[:4] == b"RIFF" and len(chunks) > 1
    streamed = np.frombuffer(data[44:], dtype="<i2").astype(np.int32)
    whole = _pcm(full.content)
    assert streamed.shape == whole.shape
    assert int(np.abs(streamed - whole).max()) <= 4


def test_formats_rates_and_speed(server):
    with server.client() as c:
        mp3 = c.post("/v1/synthesize", json={"text": "Format test.", "format": "mp3"})
        assert mp3.status_code == 200 and mp3.headers["content-type"] == "audio/mpeg"
        r16 = c.post("/v1/synthesize", json={"text": "Format test.", "sample_rate": 16000})
        assert sf.info(io.BytesIO(r16.content)).samplerate == 16000


def test_speed_scales_duration_as_one_over_speed(server):
    # Two sentences: the speech and the pause between them both scale. Each utterance's end
    # is rounded to a whole latent frame (256 samples), the pause to a sample.
    text = "Speed test, first sentence. And the second one."
    with server.client() as c:
        def frames(endpoint: str, speed: float) -> int:
            body = ({"text": text, "speed": speed} if endpoint == "/v1/synthesize" else
                    {"input": text, "voice": "joe", "response_format": "wav", "speed": speed})
            r = c.post(endpoint, json=body)
            assert r.status_code == 200, r.text
            return sf.info(io.BytesIO(r.content)).frames

        for endpoint in ("/v1/synthesize", "/v1/audio/speech"):
            base = frames(endpoint, 1.0)
            for speed in (0.25, 0.5, 1.5, 2.0, 4.0):
                got = frames(endpoint, speed)
                assert abs(got - base / speed) <= 2 * 256 + 2, (endpoint, speed, got, base / speed)


def test_openai_client_unchanged(server):
    openai = pytest.importorskip("openai")
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(server.socket)))
    client = openai.OpenAI(base_url="http://localhost/v1", api_key="x", http_client=http)
    speech = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello from the OpenAI client.",
                                        response_format="wav")
    assert sf.info(io.BytesIO(speech.content)).frames > 10000
    mp3 = client.audio.speech.create(model="tts-1", voice="joe", input="Default format is mp3.")
    assert mp3.content[:3] == b"ID3" or mp3.content[0] == 0xFF
    pcm = client.audio.speech.create(model="tts-1", voice="joe", input="Raw pcm.", response_format="pcm")
    assert len(pcm.content) % 2 == 0 and len(pcm.content) > 0
    with pytest.raises(openai.NotFoundError):
        client.audio.speech.create(model="tts-1", voice="nobody", input="x")


def test_voices_status_health_metrics(server):
    with server.client() as c:
        voices = c.get("/v1/voices").json()
        assert voices["default"] == "joe" and voices["voices"][0]["loaded"] is True
        assert "wav" in voices["formats"]
        status = c.get("/v1/status").json()
        assert status["ready"] is True and status["models"]["joe"]["version"] == "1.0.0"
        assert status["models"]["joe"]["device"] == "cpu"
        assert {"depth", "capacity"} <= set(status["queue"])
        assert c.get("/healthz").json()["worker_alive"] is True
        assert c.get("/readyz").status_code == 200
        metrics = c.get("/metrics").text
    for name in ("tts_requests_total", "tts_request_duration_seconds_bucket", "tts_queue_depth", "tts_batch_size_bucket",
                 "tts_audio_seconds_total", "tts_ready 1.0"):
        assert name in metrics


BAD = [
    ({"text": ""}, 422, "text"),
    ({"text": "   \n\t "}, 422, "text"),
    ({"text": "a" * 601}, 413, "limit"),
    ({"text": "hi", "voice": "nobody"}, 404, "joe"),
    ({"text": "hi", "format": "xyz"}, 422, "format"),
    ({"text": "hi", "length_scale": 1e9}, 422, "length_scale"),
    ({"text": "hi", "noise_scale": -1}, 422, "noise_scale"),
    ({"text": "hi", "noise_w": 99}, 422, "noise_w"),
    ({"text": "hi", "speed": 0}, 422, "speed"),
    ({"text": "hi", "sample_rate": 1}, 422, "sample_rate"),
    ({"text": "hi", "sample_rate": 10**9}, 422, "sample_rate"),
    ({"text": "hi", "seed": -5}, 422, "seed"),
    ({"text": "hi", "stream": True, "format": "flac"}, 422, "format"),
    ({"text": "hi", "unknown_field": 1}, 422, "unknown_field"),
    ({"text": 5}, 422, "text"),
    ({}, 422, "text"),
    ({"text": "?!. ,"}, 422, "text"),
]


@pytest.mark.parametrize("body,status,word", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_answers_and_server_keeps_serving(server, body, status, word):
    with server.client() as c:
        r = c.post("/v1/synthesize", json=body)
        assert r.status_code == status, r.text
        detail = r.json()["detail"]
        assert word in detail
        if status == 404:
            assert r.json()["voices"] == ["joe"]
        assert "Traceback" not in r.text


def test_malformed_json_invalid_utf8_and_huge_body(server):
    with server.client() as c:
        for raw, allowed in ((b'{"text": ', (422,)), (b'{"text": "\xff\xfe"}', (400, 422)), (b"[1,2", (422,))):
            r = c.post("/v1/synthesize", content=raw, headers={"content-type": "application/json"})
            assert r.status_code in allowed, r.text
            assert "detail" in r.json()
        huge = c.post("/v1/synthesize", content=b'{"text": "' + b"a" * 5_000_000 + b'"}',
                      headers={"content-type": "application/json"})
        assert huge.status_code == 413
        assert c.post("/v1/synthesize", json={"text": "Still serving."}).status_code == 200


def test_oversized_body_is_a_json_413_with_or_without_content_length(server):
    limit = SERVER_MAX_CHARS * 12 + 16384  # runtime.api.access.AccessLayer's room for max_chars
    payload = b'{"text": "' + b"a" * (limit + 10) + b'"}'

    def chunked():
        for i in range(0, len(payload), 4096):
            yield payload[i:i + 4096]

    with server.client() as c:
        for content in (payload, chunked()):
            r = c.post("/v1/synthesize", content=content, headers={"content-type": "application/json"})
            assert r.status_code == 413, r.text
            assert r.headers["content-type"] == "application/json"
            assert r.json()["error"]["type"] == "body_too_large" and str(limit) in r.json()["detail"]
        assert c.post("/v1/synthesize", json={"text": "Still serving."}).status_code == 200


def test_max_chars_of_escaped_emoji_fit_the_body_limit(server):
    # json.dumps escapes each emoji as a 12-byte surrogate pair: max_chars of them must reach the
    # text checks (this voice finds nothing to speak in emoji: 422), never the body limit.
    text = "\U0001F600" * SERVER_MAX_CHARS
    body = json.dumps({"text": text}).encode()
    assert len(body) > SERVER_MAX_CHARS * 12
    with server.client() as c:
        r = c.post("/v1/synthesize", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "nothing speakable" in r.json()["detail"], r.text
        over = c.post("/v1/synthesize", content=json.dumps({"text": text + "\U0001F600"}).encode(),
                      headers={"content-type": "application/json"})
        assert over.status_code == 413 and over.json()["error"]["type"] == "text_too_long", over.text


def test_lone_surrogates_are_refused(server):
    with server.client() as c:
        encoded = c.post("/v1/synthesize", content=b'{"text": "a\xed\xa0\x80b"}',
                         headers={"content-type": "application/json"})
        assert encoded.status_code == 400 and "UTF-8" in encoded.json()["detail"], encoded.text
        escaped = c.post("/v1/synthesize", content=b'{"text": "a\\ud800b"}',
                         headers={"content-type": "application/json"})
        assert escaped.status_code == 422 and "surrogate" in escaped.json()["detail"], escaped.text
        speech = c.post("/v1/audio/speech", content=b'{"input": "a\\udfffb", "voice": "joe"}',
                        headers={"content-type": "application/json"})
        assert speech.status_code == 422 and speech.json()["error"]["param"] == "input", speech.text


def test_openai_speech_is_streamed_and_matches_the_whole(server):
    text = "First sentence of the speech. And a second one."
    with server.client() as c:
        whole = c.post("/v1/synthesize", json={"text": text})
        with c.stream("POST", "/v1/audio/speech",
                      json={"input": text, "voice": "joe", "response_format": "wav"}) as r:
            assert r.status_code == 200
            assert r.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.headers
            data = b"".join(r.iter_bytes())
        streamed = np.frombuffer(data[44:], dtype="<i2").astype(np.int32)
        assert _close(streamed, _pcm(whole.content))
        flac = c.post("/v1/audio/speech", json={"input": text, "voice": "joe", "response_format": "flac"})
        assert flac.status_code == 200 and "content-length" in flac.headers  # flac goes whole


def test_opus_says_its_real_rate_and_streams_as_one_encoder_run(server):
    text = "Opus runs at twenty four kilohertz. This is the second sentence."
    with server.client() as c:
        whole = c.post("/v1/synthesize", json={"text": text, "format": "opus"})
        assert whole.status_code == 200
        info = sf.info(io.BytesIO(whole.content))
        assert whole.headers["x-sample-rate"] == str(info.samplerate) == "24000"
        with c.stream("POST", "/v1/synthesize", json={"text": text, "format": "opus", "stream": True}) as r:
            assert r.headers["x-sample-rate"] == "24000"
            data = b"".join(r.iter_bytes())
    # one Ogg stream (one header), as long as the whole: per-sentence runs would each add a header
    assert data.count(b"OpusHead") == 1
    streamed, rate = sf.read(io.BytesIO(data))
    reference, _ = sf.read(io.BytesIO(whole.content))
    assert rate == 24000 and abs(len(streamed) - len(reference)) <= 960  # one 20 ms Opus frame


def test_half_request_is_timed_out(server):
    # request_timeout_s = 2 in the fixture's config. The lower bound is causal (the server's
    # timer starts after our connect begins); the socket timeout is only a safety net.
    for payload in (b"POST /v1/synthesize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100\r\n\r\n{\"text\":",
                    b"POST /v1/synth"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(60)
        started = time.monotonic()
        s.connect(str(server.socket))
        s.sendall(payload)
        assert s.recv(100) == b""  # closed by the server
        assert time.monotonic() - started >= 2.0
        s.close()
    with server.client() as c:
        assert c.post("/v1/synthesize", json={"text": "Still serving."}).status_code == 200


def _rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_thousand_requests_at_once(server):
    # One text for all: the engine's own memory grows with every new batch shape (a torch/
    # allocator effect outside the server), so fixed shapes isolate what the server holds.
    with server.client() as c:
        c.post("/v1/synthesize", json={"text": "Number one."})
        capacity = c.get("/v1/status").json()["queue"]["capacity"]
    rss_before = _rss_kib(server.process.pid)

    async def flood():
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
        async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(server.socket), limits=limits),
                                     base_url="http://tts", timeout=120) as c:
            tasks = [asyncio.create_task(c.post("/v1/synthesize", json={"text": "Number one."}))
                     for _ in range(1000)]
            # The worker is held, so exactly `capacity` requests fit in the queue and every
            # other one must be refused at once, however fast this machine is.
            for _ in range(1200):  # at most 120 s
                if sum(t.done() for t in tasks) >= 1000 - capacity:
                    break
                await asyncio.sleep(0.1)
            server.hold_file.unlink()
            return await asyncio.gather(*tasks, return_exceptions=True)

    with server.held():
        results = asyncio.run(flood())
    codes = [getattr(r, "status_code", type(r).__name__) for r in results]
    assert codes.count(503) == 1000 - capacity and codes.count(200) == capacity, \
        {c: codes.count(c) for c in set(codes)}
    busy = [r for r in results if r.status_code == 503]
    assert all(int(r.headers["retry-after"]) >= 1 for r in busy)
    assert "queue is full" in busy[0].json()["detail"]
    with server.client() as c:
        assert c.post("/v1/synthesize", json={"text": "Still serving."}).status_code == 200
        assert c.get("/v1/status").json()["queue"]["depth"] == 0
    assert server.process.poll() is None
    assert _rss_kib(server.process.pid) - rss_before < 300_000  # bounded: < 300 MiB growth


def test_disconnected_client_cancels_its_work(server):
    before = server.log().count("client disconnected")
    text = "This sentence waits in the queue while the worker is held."
    with server.held():
        # Nothing is served while held: every client gives up after 0.3 s, on any machine.
        with server.client(timeout=0.3) as c:

            def one(i):
                with pytest.raises(httpx.TimeoutException):
                    c.post("/v1/synthesize", json={"text": text, "seed": i})

            with ThreadPoolExecutor(12) as pool:
                list(pool.map(one, range(12)))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and server.log().count("client disconnected") < before + 12:
            time.sleep(0.2)
        assert server.log().count("client disconnected") == before + 12
        # Their jobs left the queue while the worker was still held: cancelled, not run.
        with server.client() as c:
            assert c.get("/v1/status").json()["queue"]["depth"] == 0
            served = c.get("/v1/status").json()["sentences_served"]
    with server.client() as c:
        assert c.post("/v1/synthesize", json={"text": "Still serving."}).status_code == 200
        assert c.get("/v1/status").json()["sentences_served"] == served + 1


def _access_line(server, request_id, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # the line is written when the response has ended
        for raw in server.log().splitlines():
            if request_id in raw:
                return json.loads(raw)
        time.sleep(0.1)
    raise AssertionError(f"no access log line for {request_id}")


def test_stream_sends_its_first_piece_before_the_first_sentence_is_decoded(server):
    # Every streamed format (at any rate: one resampler and one encoder run for the whole
    # stream) sends the first ~0.5 s on its own (Engine.synthesize_progressive), MP3 too.
    text = "This first sentence is long enough to be split in two pieces. A second one follows."
    with server.client() as c:
        first_sentence_s = len(_pcm(c.post("/v1/synthesize", json={"text": text.split(". ")[0] + ".",
                                                                    "seed": 4}).content)) / 22050
        for rid, extra in (("stream-native", {}), ("stream-16k", {"sample_rate": 16000}),
                           ("stream-mp3", {"format": "mp3"})):
            whole = c.post("/v1/synthesize", json={"text": text, "seed": 4, **extra}).content
            with c.stream("POST", "/v1/synthesize", headers={"x-request-id": rid},
                          json={"text": text, "seed": 4, "stream": True, **extra}) as r:
                assert r.status_code == 200
                data = b"".join(r.iter_bytes())
            if "format" not in extra:
                streamed = np.frombuffer(data[44:], dtype="<i2").astype(np.int32)
                want, rate = sf.read(io.BytesIO(whole), dtype="int16")
                assert rate == extra.get("sample_rate", 22050)
                assert streamed.shape == want.shape and int(np.abs(streamed - want).max()) <= 4, rid
    for rid in ("stream-native", "stream-16k", "stream-mp3"):
        line = _access_line(server, rid)
        assert 0.4 <= line["first_piece_s"] <= 0.6 < first_sentence_s, rid
        assert line["first_audio_ms"] <= line["total_ms"]


def test_access_log_fields_and_no_text(server):
    secret = "Confidential words never logged."
    with server.client() as c:
        r = c.post("/v1/synthesize", json={"text": secret}, headers={"x-request-id": "req-abc-123"})
        assert r.headers["x-request-id"] == "req-abc-123"
    deadline = time.monotonic() + 5
    line = None
    while time.monotonic() < deadline and line is None:
        for raw in server.log().splitlines():
            if "req-abc-123" in raw:
                line = json.loads(raw)
        time.sleep(0.1)
    assert line is not None
    for key in ("id", "voice", "chars", "audio_s", "queue_ms", "synth_ms", "status"):
        assert key in line, key
    assert line["chars"] == len(secret) and line["status"] == 200
    assert "Confidential" not in server.log()
