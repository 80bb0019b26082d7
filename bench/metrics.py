"""What the metrics cost (issue 28): scrape time and size, series per node, and the runtime's
request latency with metrics scraped vs not, in one run.

    .venv/bin/python bench/metrics.py [--rounds 4] [--requests 24]

1. Latency on vs off: `tts-runtime serve` (real voice, CPU) with no metrics socket and no
   scraper ("off"), then with its metrics socket scraped every second ("on": 15x
   Prometheus's default rate), alternating off/on rounds so drift of the shared machine
   falls on both; each round sends the same sequential requests (bench/server.py's texts
   and client, from tts_testkit/load.py). The per-request instrumentation (three histogram
   observations in the access layer) cannot be switched off: its cost is timed in-process
   as well.
2. Scrape cost: time and bytes of one GET /metrics over each daemon's metrics socket (the
   runtime after the requests above; the provisioner daemon with 5 models synced from
   nanio), plain and gzip (Prometheus asks for gzip).
3. Cardinality: series per node for 10 voices (the runtime's registry with every voice
   served, every synthesis endpoint answered 200, 404, 413, 422, 503, 504) and 5 models
   (the provisioner's collector), counted from the exposition text.

Writes bench/results/metrics.json and metrics.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import httpx  # noqa: E402
import tomli_w  # noqa: E402

from tts_testkit import benchresult as br  # noqa: E402
from tts_testkit.load import request_text, run_clients  # noqa: E402
from tts_testkit.paths import REPO  # noqa: E402
from tts_testkit.runtime_server import publish_to_cache, start_server, voice_bundle_dir  # noqa: E402


def scrape(sock: Path, gzip: bool = False) -> tuple[float, int, str]:
    """(seconds, bytes on the wire, text) of one GET /metrics."""
    headers = {"Accept-Encoding": "gzip" if gzip else "identity"}
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://m", timeout=30) as c:
        t0 = time.perf_counter()
        r = c.get("/metrics", headers=headers)
        took = time.perf_counter() - t0
    return took, int(r.headers["content-length"]), r.text


def scrape_cost(sock: Path, n: int = 20) -> dict:
    times = [scrape(sock)[0] for _ in range(n)]
    _, size, text = scrape(sock)
    gz_times = [scrape(sock, gzip=True)[0] for _ in range(n)]
    _, gz_size, _ = scrape(sock, gzip=True)
    series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    return {"ms_median": round(statistics.median(times) * 1000, 2), "bytes": size,
            "gzip_ms_median": round(statistics.median(gz_times) * 1000, 2), "gzip_bytes": gz_size, "series": series}


class Scraper(threading.Thread):
    """GET /metrics every `every` seconds until stopped."""

    def __init__(self, sock: Path, every: float = 1.0):
        super().__init__(daemon=True)
        self.sock, self.every, self.stop_event, self.count = sock, every, threading.Event(), 0

    def run(self) -> None:
        while not self.stop_event.wait(self.every):
            scrape(self.sock, gzip=True)
            self.count += 1


def latency_rounds(tmp: Path, cache: Path, rounds: int, requests: int) -> dict:
    lat = {"off": [], "on": []}
    rounds_ms: dict[str, list[float]] = {"off": [], "on": []}
    scrapes = 0
    for r in range(rounds):
        for mode in ("off", "on"):
            sock = tmp / f"metrics-{r}-{mode}.sock"
            extra = {"metrics_socket": str(sock)} if mode == "on" else {}
            srv = start_server(tmp / f"srv-{r}-{mode}", cache, max_batch_size=8, max_wait_ms=15, log_level="warning",
                               **extra)
            try:
                srv.wait_ready(180)
                asyncio.run(run_clients(srv.socket, 1, 2, seed_base=99))  # warm-up
                scraper = Scraper(sock) if mode == "on" else None
                if scraper:
                    scraper.start()
                res, _ = asyncio.run(run_clients(srv.socket, 1, requests, seed_base=1000))
                if scraper:
                    scraper.stop_event.set()
                    scraper.join()
                    scrapes += scraper.count
                ok = [t for _, s, _, t in res if s == 200]
                lat[mode] += ok
                rounds_ms[mode].append(round(statistics.median(ok) * 1000, 1))
            finally:
                srv.stop()
            print(f"round {r} {mode}: median {rounds_ms[mode][-1]:.0f} ms", flush=True)
    med = {m: statistics.median(v) for m, v in lat.items()}
    p95 = {m: sorted(v)[int(0.95 * (len(v) - 1))] for m, v in lat.items()}
    # The machine's own noise: how far apart the "off" rounds' medians are from each other.
    off = rounds_ms["off"]
    return {"requests_per_mode": len(lat["on"]), "scrapes_during_on": scrapes, "round_medians_ms": rounds_ms,
            "off_rounds_spread_ratio": round(max(off) / min(off), 3),
            "median_ms": {m: round(v * 1000, 1) for m, v in med.items()},
            "p95_ms": {m: round(v * 1000, 1) for m, v in p95.items()},
            "median_ratio_on_over_off": round(med["on"] / med["off"], 3)}


def instrumentation_cost() -> float:
    """Microseconds of the access layer's per-request metric calls (request counter,
    latency, audio seconds, and the new first audio, queue wait, real-time factor)."""
    from runtime.api.metrics import Metrics
    from runtime.api.record import AccessRecord

    m = Metrics()
    rec = AccessRecord(id="x", voice="joe", audio_s=2.0, queue_ms=5.0, synth_ms=300.0)
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        m.requests.labels("/v1/synthesize", "200").inc()
        m.latency.labels("/v1/synthesize").observe(0.3)
        m.audio_seconds.labels("joe").inc(2.0)
        m.observe_synthesis(rec, 0.3)
    return round((time.perf_counter() - t0) / n * 1e6, 2)


def runtime_cardinality(voices: int = 10) -> int:
    """Series of a runtime serving `voices` voices, each answered on both synthesis endpoints,
    with the error statuses a busy node sees (counted from the exposition text)."""
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from runtime.api.metrics import Metrics
    from runtime.api.record import AccessRecord

    m = Metrics()
    names = [f"voice{i}" for i in range(voices)]
    loaded = {n: SimpleNamespace(snapshot=SimpleNamespace(version="1.0.0", path=f"/c/{n}"), loaded_at=1.0,
                                 engine=SimpleNamespace(device="cpu", stats={"oom_splits": 0, "cpu_fallbacks": 0}))
              for n in names}
    manager = SimpleNamespace(names=names, ready=True, holder=SimpleNamespace(get=loaded.get),
                              failed_version=lambda n: None, load_failures={n: 0 for n in names})
    scheduler = SimpleNamespace(depth=0, queue_size=64, overtakes=0, batches_served=0)
    m.watch(scheduler, manager)
    for endpoint in ("/v1/synthesize", "/v1/audio/speech"):
        for status in ("200", "404", "413", "422", "499", "503", "504"):
            m.requests.labels(endpoint, status).inc()
            m.latency.labels(endpoint).observe(0.2)
    for path in ("/healthz", "/readyz", "/metrics", "/v1/status", "/v1/voices", "/v1/reload", "other"):
        m.requests.labels(path, "200").inc()
        m.latency.labels(path).observe(0.01)
    for kind in ("queue_full", "text_too_long", "unknown_voice", "deadline", "client_gone", "invalid_request"):
        m.errors.labels(kind).inc()
    for n in names:
        m.audio_seconds.labels(n).inc(1.0)
        m.observe_synthesis(AccessRecord(id="x", voice=n, audio_s=1.0, queue_ms=1.0, synth_ms=100.0), 0.2)
    m.observe_batch(2, 0.3)
    text = generate_latest(m.registry).decode()
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def provisioner_cardinality_and_daemon(tmp: Path, models: int = 5) -> tuple[int, dict]:
    """The provisioner daemon with `models` small models synced from nanio; its scrape cost
    and its series (p2p off: 2 series fewer than with p2p on)."""
    from tts_testkit.provisioner_setup import make_keys, model_files, publish_raw, wait_status, write_config
    from tts_testkit.s3servers import STARTERS

    server = STARTERS["nanio"](tmp / "s3")
    try:
        bucket = server.new_bucket()
        keys = make_keys(tmp)
        names = [f"model{i}" for i in range(models)]
        for i, name in enumerate(names):
            publish_raw(server.client(), bucket, name, "1.0.0", model_files(i, {"model.bin": 200_000, "voice.json": 500}),
                        keys)
        creds = server.write_credentials(tmp / "creds.toml")
        sock = tmp / "run" / "metrics.sock"
        config = write_config(tmp, [dict(name="primary", endpoint=server.endpoint, bucket=bucket,
                                         credentials_file=creds)], keys,
                              models="\n[[models]]\n".join(f'name = "{n}"\nchannel = "stable"' for n in names),
                              extra=tomli_w.dumps({"metrics_socket": str(sock), "poll_interval": 3600}))
        proc = subprocess.Popen([str(Path(sys.executable).parent / "tts-provisioner"), "--config", str(config), "run"],
                                stderr=subprocess.DEVNULL, env=dict(os.environ, TTS_LOG_FORMAT="json"))
        try:
            wait_status(tmp / "run/status.json", lambda s: s.get("pid") == proc.pid and s.get("ready"), timeout=120)
            cost = scrape_cost(sock)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        return cost["series"], cost
    finally:
        server.stop()


SCRAPES = (("runtime_1_voice", "runtime, 1 voice, after traffic"), ("provisioner_5_models", "provisioner, 5 models"))


def figures_from(latency: dict, instrumentation_us: float, scrape: dict, series: dict) -> list[dict]:
    """The run's figures: latency with metrics on against off (the peer, same run), the
    instrumentation's cost, one scrape of each daemon, series per node."""
    off = "metrics off (no metrics socket, no scraper)"
    med, p95 = latency["median_ms"], latency["p95_ms"]
    figures = [
        br.figure("latency_median_metrics_on", med["on"], "ms", peer=br.peer(f"{off}, median", med["off"], "ms"),
                  ratio=latency["median_ratio_on_over_off"], note="metrics socket scraped every second"),
        br.figure("latency_p95_metrics_on", p95["on"], "ms", peer=br.peer(f"{off}, p95", p95["off"], "ms"),
                  ratio=round(p95["on"] / p95["off"], 3), note="metrics socket scraped every second"),
        br.figure("latency_off_rounds_spread", latency["off_rounds_spread_ratio"], "x",
                  note="slowest over fastest median of the 'off' rounds: the machine's own noise"),
        br.figure("instrumentation_per_request", instrumentation_us, "us",
                  note="the access layer's metric calls for one request, in-process (always on)"),
    ]
    for key, label in SCRAPES:
        cost = scrape[key]
        figures += [
            br.figure(f"scrape_{key}_ms", cost["ms_median"], "ms", note=f"{label}: median of 20 plain GETs"),
            br.figure(f"scrape_{key}_bytes", cost["bytes"], "B", note=f"{label}: plain"),
            br.figure(f"scrape_{key}_gzip_ms", cost["gzip_ms_median"], "ms", note=f"{label}: median of 20 gzip GETs"),
            br.figure(f"scrape_{key}_gzip_bytes", cost["gzip_bytes"], "B", note=f"{label}: gzip"),
        ]
    figures += [
        br.figure("series_runtime_1_voice", scrape["runtime_1_voice"]["series"], "series",
                  note="the runtime scraped above, 1 voice after traffic"),
        br.figure("series_runtime_10_voices", series["runtime_10_voices"], "series"),
        br.figure("series_provisioner_5_models", series["provisioner_5_models"], "series"),
        br.figure("series_per_node", series["total"], "series", note="10 voices and 5 models"),
    ]
    return figures


def markdown(doc: dict) -> str:
    """metrics.md: the figures and what they were measured on (from the results document alone)."""
    d, m = doc["details"], doc["machine"]
    s, lat = d["settings"], d["latency"]
    fig = {f["name"]: f for f in doc["figures"]}
    series = {k: fig[f"series_{k}"]["value"] for k in ("runtime_10_voices", "provisioner_5_models", "per_node")}
    return f"""# What the metrics cost (bench/metrics.py)

{doc['date']}, {m['cpus']} cores, load average {m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f} (shared machine).

Latency: {s['rounds']} alternating rounds per mode, {s['requests_per_round']} sequential requests of 1-3 short
sentences each (bench/server.py's texts and client), real voice on CPU; "on" = the metrics socket
scraped every second ({lat['scrapes_during_on']} scrapes), "off" = no metrics socket, no scraper (the
peer in the table). Per-round medians (ms): off {lat['round_medians_ms']['off']}, on
{lat['round_medians_ms']['on']}; the "off" rounds alone differ by up to
{fig['latency_off_rounds_spread']['value']}x from one another, so a difference smaller than that is not
measurable on this machine. The per-request instrumentation (always on: counter, latency, audio
seconds, time to first audio, queue wait, real-time factor) costs
**{fig['instrumentation_per_request']['value']} µs** per request in-process.

Scrapes: the median of 20 GETs over each daemon's metrics socket (the TCP relay adds one local
connection); the runtime with 1 voice after traffic, the provisioner with 5 models synced from nanio.

Series per node (10 voices, 5 models): runtime {series['runtime_10_voices']} + provisioner
{series['provisioner_5_models']} = **{series['per_node']}** (runtime: every voice served, both synthesis
endpoints answering 200/404/413/422/499/503/504, every probe path; the per-voice histograms -
time to first audio, real-time factor - are most of it).

{chr(10).join(br.markdown_table(doc['figures']))}

Reproduce: `{doc['command'] or '.venv/bin/python bench/metrics.py'}`.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=24, help="sequential requests per round and mode")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    load_start = os.getloadavg()
    bundle = voice_bundle_dir(tmp)
    cache = tmp / "cache"
    publish_to_cache(cache, "joe", "1.0.0", bundle)

    latency = latency_rounds(tmp, cache, args.rounds, args.requests)
    # The runtime's scrape cost, after traffic (every request histogram has series).
    sock = tmp / "metrics-scrape.sock"
    srv = start_server(tmp / "srv-scrape", cache, log_level="warning", metrics_socket=str(sock))
    try:
        srv.wait_ready(180)
        asyncio.run(run_clients(srv.socket, 2, 4, text_fn=request_text))
        runtime_scrape = scrape_cost(sock)
    finally:
        srv.stop()
    prov_series, prov_scrape = provisioner_cardinality_and_daemon(tmp / "prov")
    series = {"runtime_10_voices": runtime_cardinality(10), "provisioner_5_models": prov_series}
    series["total"] = sum(series.values())
    scrape = {"runtime_1_voice": runtime_scrape, "provisioner_5_models": prov_scrape}
    figures = figures_from(latency, instrumentation_cost(), scrape, series)
    details = {"settings": {"rounds": args.rounds, "requests_per_round": args.requests, "scrape_every_s": 1.0,
                            "latency_server": {"max_batch_size": 8, "max_wait_ms": 15, "device": "cpu"}},
               "latency": {k: latency[k] for k in ("requests_per_mode", "scrapes_during_on", "round_medians_ms")}}
    machine = br.machine(loadavg_start=list(load_start), loadavg_end=list(os.getloadavg()))
    out = REPO / "bench" / "results"
    doc = br.write(out / "metrics.json", br.document("metrics", figures, machine=machine, details=details))
    (out / "metrics.md").write_text(markdown(doc))
    for f in figures:
        print(f"{f['name']}: {f['value']} {f['unit']}", flush=True)


if __name__ == "__main__":
    main()
