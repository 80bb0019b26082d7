"""Runtime server benchmark: load, overhead vs the engine in-process, batching gain,
streaming time to first byte, and tts-ctl batch vs a sequential script.

    .venv/bin/python bench/server.py [--quick]

Builds a cache with the real voice in a temp dir, starts `tts-runtime serve` on a Unix
socket, and measures everything in the same run (ratios, not absolutes: the CI machine
has 2 shared cores). Writes bench/results/server.json and server.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Two processes with OpenMP threads (this one and the server): spinning idle threads of
# one steal the cores from the other unless they sleep (see bench/results/engine.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

from tts_testkit import benchresult as br  # noqa: E402
from tts_testkit.load import request_text, run_clients  # noqa: E402
from tts_testkit.paths import REPO  # noqa: E402
from tts_testkit.runtime_server import publish_to_cache, start_server, voice_bundle_dir  # noqa: E402

PARAGRAPH = ("The first sentence starts the stream. The second follows it closely. A third one is here. "
             "The fourth sentence is nearly the last. The fifth ends the paragraph.")


def pcm(data: bytes) -> np.ndarray:
    return sf.read(io.BytesIO(data), dtype="int16")[0].astype(np.int32)


def audio_seconds(data: bytes) -> float:
    info = sf.info(io.BytesIO(data))
    return info.frames / info.samplerate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller runs")
    args = ap.parse_args()
    n_seq = 8 if args.quick else 16
    figures = []

    def fig(name, value, unit, target=None, met=None, **extra):
        figures.append(br.figure(name, value, unit, target, met, **extra))
        print(f"{name}: {value} {unit}" + (f" (target {target}, met {met})" if target is not None else ""), flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="bench-server-"))
    bundle = voice_bundle_dir(tmp)
    cache = tmp / "cache"
    publish_to_cache(cache, "joe", "1.0.0", bundle)
    srv = start_server(tmp / "srv", cache, max_batch_size=8, max_wait_ms=15, queue_size=48,
                       deadline_s=300, log_level="warning")
    load_start = os.getloadavg()
    try:
        srv.wait_ready(120)
        from runtime import audio
        from runtime.engine import Engine

        engine = Engine.load(bundle, device="cpu")

        # -- engine in-process vs server, concurrency 1 (interleaved, same texts) -----------
        texts = [request_text(i) for i in range(n_seq)]
        engine.synthesize_text(texts[0])  # warm-up
        with srv.client(600) as c:
            c.post("/v1/synthesize", json={"text": texts[0]})
            eng_t = srv_t = eng_a = srv_a = 0.0
            for i, text in enumerate(texts):
                t0 = time.perf_counter()
                wave = engine.synthesize_text(text, seed=i)
                data = audio.encode(wave, engine.sample_rate, "wav")
                eng_t += time.perf_counter() - t0
                eng_a += len(wave) / engine.sample_rate
                t0 = time.perf_counter()
                r = c.post("/v1/synthesize", json={"text": text, "seed": i})
                srv_t += time.perf_counter() - t0
                srv_a += audio_seconds(r.content)
        eng_tp, c1_tp = eng_a / eng_t, srv_a / srv_t
        overhead = 1 - c1_tp / eng_tp
        fig("engine_inprocess_throughput", round(eng_tp, 2), "audio-s/s")
        fig("server_c1_throughput", round(c1_tp, 2), "audio-s/s")
        fig("server_overhead_c1", round(overhead * 100, 1), "%", 10, overhead <= 0.10)

        # -- concurrency 16 -----------------------------------------------------------------
        res16, wall16 = asyncio.run(run_clients(srv.socket, 16, 2 if args.quick else 3, seed_base=1000))
        c16_tp = sum(audio_seconds(d) for _, s, d, _ in res16 if s == 200) / wall16
        fig("server_c16_throughput", round(c16_tp, 2), "audio-s/s")
        fig("batching_gain_c16_over_c1", round(c16_tp / c1_tp, 3), "x", 1.3, c16_tp / c1_tp >= 1.3)

        # -- load: 64 clients x 4 requests of 1-3 sentences -----------------------------------
        per = 2 if args.quick else 4
        load, wall = asyncio.run(run_clients(srv.socket, 64, per, seed_base=5000))
        codes = [s for _, s, _, _ in load]
        ok = [(i, d) for i, s, d, _ in load if s == 200]
        lat = sorted(t for _, s, _, t in load if s == 200)
        fig("load_requests", len(load), "requests", 64 * per, len(load) == 64 * per)
        fig("load_answered_200_or_503", sum(c in (200, 503) for c in codes), "requests", len(load),
            all(c in (200, 503) for c in codes), count_503=codes.count(503),
            other_codes=sorted({c for c in codes if c not in (200, 503)}))
        mismatched = 0
        for i, data in ok:  # each against the same seed synthesized alone, in-process
            ref = pcm(audio.encode(engine.synthesize_text(request_text(i), seed=5000 + i), engine.sample_rate, "wav"))
            got = pcm(data)
            if ref.shape != got.shape or int(np.abs(ref - got).max()) > 4:
                mismatched += 1
        fig("load_wrong_audio", mismatched, "requests", 0, mismatched == 0, compared=len(ok))
        fig("load_p50_latency", round(statistics.median(lat), 3), "s")
        fig("load_p95_latency", round(lat[int(0.95 * (len(lat) - 1))], 3), "s")
        fig("load_throughput", round(sum(audio_seconds(d) for _, d in ok) / wall, 2), "audio-s/s")

        # -- streaming: time to first byte vs the full response ---------------------------------
        ttfb, full = [], []
        with srv.client(600) as c:
            for k in range(3):
                t0 = time.perf_counter()
                c.post("/v1/synthesize", json={"text": PARAGRAPH, "seed": k})
                full.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                with c.stream("POST", "/v1/synthesize", json={"text": PARAGRAPH, "seed": k, "stream": True}) as r:
                    first = None
                    for chunk in r.iter_raw():
                        if first is None and len(chunk) > 44:  # audio, not just the WAV header
                            first = time.perf_counter() - t0
                        elif first is None and chunk:
                            continue
                ttfb.append(first)
        ratio = statistics.median(ttfb) / statistics.median(full)
        fig("stream_ttfb", round(statistics.median(ttfb), 3), "s")
        fig("stream_full_response", round(statistics.median(full), 3), "s")
        fig("stream_ttfb_over_full", round(ratio, 3), "x", 0.3, ratio <= 0.3)

        # -- tts-ctl batch vs sequential one-request-per-line with sleep ----------------------------
        lines = 60 if args.quick else 200
        src = tmp / "lines.txt"
        src.write_text("".join(f"Batch line {i}.\n" for i in range(lines)))
        t0 = time.perf_counter()
        r = subprocess.run([str(Path(sys.executable).parent / "tts-ctl"), "--socket", str(srv.socket), "batch",
                            str(src), "--out-dir", str(tmp / "batch-out"), "--concurrency", "16"],
                           capture_output=True, text=True)
        batch_s = time.perf_counter() - t0
        assert r.returncode == 0, r.stderr
        t0 = time.perf_counter()
        with srv.client(600) as c:  # what people script today: one request, sleep, next
            for i, line in enumerate(src.read_text().splitlines()):
                resp = c.post("/v1/synthesize", json={"text": line})
                (tmp / f"seq-{i}.wav").write_bytes(resp.content)
                time.sleep(0.1)
        seq_s = time.perf_counter() - t0
        fig("batch_ctl_seconds", round(batch_s, 2), "s", lines=lines)
        fig("batch_sequential_script_seconds", round(seq_s, 2), "s", lines=lines, sleep_s=0.1)
        fig("batch_speedup_ctl_over_script", round(seq_s / batch_s, 2), "x")
        engine.close()
    finally:
        srv.stop()
    machine = br.machine(loadavg_start=load_start, loadavg_end=os.getloadavg(),
                         server={"max_batch_size": 8, "max_wait_ms": 15, "queue_size": 48, "deadline_s": 300,
                                 "device": "cpu"})
    out = REPO / "bench" / "results"
    result = br.write(out / "server.json", br.document("server", figures, machine=machine))
    rows = "\n".join(br.markdown_table(figures))
    (out / "server.md").write_text(
        f"# Runtime server benchmark\n\n{result['date']}, {os.cpu_count()} cores, load average "
        f"{load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}; server on CPU, max_batch_size 8, max_wait_ms 15.\n\n"
        "Requests are 1-3 short sentences; the load run is 64 clients x "
        f"{per} requests; batch is {lines} one-sentence lines, tts-ctl at --concurrency 16 vs a "
        "sequential loop with a 0.1 s sleep per line.\n\n"
        f"{rows}\n\n"
        "Reproduce: `.venv/bin/python bench/server.py` (see docs/runtime.md).\n")


if __name__ == "__main__":
    main()
