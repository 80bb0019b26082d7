"""Bounds benchmark (issue 13): the worst texts the API admits, against a real server.

    .venv/bin/python bench/bounds.py [--quick] [--peer]

Starts `tts-runtime serve` with the default limits on a Unix socket and records, per
worst-case text: status, seconds, and the server's peak RSS above idle (VmHWM, reset with
/proc/PID/clear_refs before each request); time per character and per phoneme id across
text sizes (linearity); and a short request's p95 latency idle and while long requests
run, with overtaking (the default) and without it (express_max_ids = 0) in the same run.
--short-only measures only that. --peer also runs one long unpunctuated text on a server without the
utterance bound (the behaviour before issue 13), for the memory ratio in the same run.
Writes bench/results/bounds.json and bounds.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import httpx  # noqa: E402

from runtime.config import RuntimeConfig  # noqa: E402
from tts_testkit import benchresult as br  # noqa: E402
from tts_testkit.paths import REPO  # noqa: E402
from tts_testkit.runtime_server import mixed_scripts as mixed  # noqa: E402
from tts_testkit.runtime_server import publish_to_cache, start_server, voice_bundle_dir  # noqa: E402

SHORT = "Hello there, how are you today?"
RSS_TARGET = 1.5 * 2**30
DEFAULTS = RuntimeConfig()
# The peer for the short-request figure: the same server with overtaking off (before it existed).
NO_OVERTAKING = {"express_max_ids": 0}




def vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := current RSS


def admitted_prefix(frontend, text: str, limit_ids: int) -> str:
    """The longest prefix of `text` (whole words) whose ids fit max_request_ids."""
    lo, hi = 1, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        total = sum(len(u.ids) for u in frontend.text_to_utterances(text[:mid]))
        lo, hi = (mid, hi) if total <= limit_ids else (lo, mid - 1)
    return text[:lo].strip()


def one(c: httpx.Client, pid: int, text: str, idle_rss: int, **extra) -> dict:
    reset_peak(pid)
    t0 = time.perf_counter()
    r = c.post("/v1/synthesize", json={"text": text, **extra})
    secs = time.perf_counter() - t0
    peak = vm(pid, "VmHWM")
    out = {"chars": len(text), "status": r.status_code, "seconds": round(secs, 2),
           "peak_rss_above_idle_mib": round((peak - idle_rss) / 2**20, 1)}
    if r.status_code == 200:
        out["audio_s"] = float(r.headers["X-Audio-Seconds"])
    else:
        out["error"] = r.json().get("detail", "")[:160]
    return out


def short_p95(srv, c: httpx.Client, quick: bool) -> dict:
    """A short request's latency idle, then while two clients loop long requests."""
    shots = 10 if quick else 40
    idle_lat = []
    for _ in range(shots):
        t0 = time.perf_counter()
        c.post("/v1/synthesize", json={"text": SHORT}).raise_for_status()
        idle_lat.append(time.perf_counter() - t0)
    stop = threading.Event()
    # Within max_request_ids and, for both clients together, the queue (a longer text is a quick
    # 413 or 503: no load at all). The clients behave like tts-ctl: a 503 waits its Retry-After.
    long_text = mixed(300 if quick else 500, seed=9)
    long_status: list[int] = []

    def long_client(seed: int) -> None:
        with srv.client(600.0) as lc:
            while not stop.is_set():
                r = lc.post("/v1/synthesize", json={"text": long_text, "seed": seed})
                long_status.append(r.status_code)
                if r.status_code == 503:
                    stop.wait(float(r.headers.get("retry-after", "1")))

    threads = [threading.Thread(target=long_client, args=(k,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    time.sleep(3.0)  # both long requests are queued and running
    rng = random.Random(11)
    load_lat = []
    for _ in range(shots):
        t0 = time.perf_counter()
        c.post("/v1/synthesize", json={"text": SHORT}).raise_for_status()
        load_lat.append(time.perf_counter() - t0)
        time.sleep(rng.uniform(0.05, 0.4))  # land at varied points of a batch
    stop.set()
    for t in threads:
        t.join(timeout=300)
    out = {"text": SHORT, "requests": shots, "idle_p95_s": round(p95(idle_lat), 3),
           "idle_median_s": round(statistics.median(idle_lat), 3),
           "loaded_p95_s": round(p95(load_lat), 3), "loaded_median_s": round(statistics.median(load_lat), 3),
           "long_load": f"2 clients looping {len(long_text)} chars of unpunctuated mixed scripts",
           "long_answers": {str(code): long_status.count(code) for code in sorted(set(long_status))}}
    out["p95_ratio"] = round(out["loaded_p95_s"] / out["idle_p95_s"], 2)
    return out


def p95(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--peer", action="store_true")
    ap.add_argument("--short-only", action="store_true", help="only the short-request latency figures (not written)")
    args = ap.parse_args()
    from runtime.engine import Engine

    tmp = Path(tempfile.mkdtemp(prefix="bench-bounds-"))
    bundle = voice_bundle_dir(tmp)
    cache = tmp / "cache"
    publish_to_cache(cache, "joe", "1.0.0", bundle)
    frontend = Engine.load(bundle, device="cpu").frontend  # same front end as the server's defaults
    frontend.max_utterance_ids = DEFAULTS.max_utterance_ids
    limit = DEFAULTS.max_request_ids
    mixed_max = admitted_prefix(frontend, mixed(DEFAULTS.max_chars), limit)
    cjk_max = admitted_prefix(frontend, "世" * DEFAULTS.max_chars, limit)
    worst = {
        "max_chars unpunctuated mixed scripts": mixed(DEFAULTS.max_chars),
        "largest admitted unpunctuated mixed scripts": mixed_max,
        "one 2000-char word": "a" * 2000,
        "5000 chars of punctuation": ",.!?;" * 1000,
        "5000 chars of words, no punctuation": ("the quick brown fox jumps over the lazy dog " * 120)[:5000],
        "5000 chars of single letters and spaces": ("a b c d e f g " * 400)[:5000],
        '"世" x max_chars': "世" * DEFAULTS.max_chars,
        'largest admitted "世" run': cjk_max,
    }
    if args.quick:
        worst = {k: v for k, v in worst.items() if "largest" not in k}
    results: dict = {"worst": {}, "linearity": [], "short": {}}
    if args.short_only:
        for name, overrides in (("short", {}), ("short_no_overtaking", NO_OVERTAKING)):
            srv = start_server(tmp / name, cache, log_level="warning", **overrides)
            try:
                srv.wait_ready()
                with srv.client(600.0) as c:
                    print(name, short_p95(srv, c, args.quick), flush=True)
            finally:
                srv.stop()
        return
    srv = start_server(tmp / "srv", cache, log_level="warning")
    try:
        srv.wait_ready()
        pid = srv.process.pid
        with srv.client(600.0) as c:
            for _ in range(3):
                c.post("/v1/synthesize", json={"text": SHORT}).raise_for_status()
            idle = vm(pid, "VmRSS")
            results["idle_rss_mib"] = round(idle / 2**20, 1)
            for name, text in worst.items():
                results["worst"][name] = one(c, pid, text, idle)
                print(name, results["worst"][name], flush=True)
            # time per character / id across sizes: unpunctuated mixed scripts
            sizes = [125, 250, 500, 1000] if args.quick else [125, 250, 500, 1000, len(mixed_max)]
            for n in sizes:
                text = mixed_max[:n].strip()
                ids = sum(len(u.ids) for u in frontend.text_to_utterances(text))
                row = one(c, pid, text, idle)
                row.update(ids=ids, ms_per_char=round(1000 * row["seconds"] / n, 2),
                           ms_per_id=round(1000 * row["seconds"] / ids, 3))
                results["linearity"].append(row)
                print("size", row, flush=True)
            results["short"] = short_p95(srv, c, args.quick)
            print("short", results["short"], flush=True)
            results["status"] = c.get("/v1/status").json()["queue"]
    finally:
        srv.stop()
    # the peer: the same short-request figure without overtaking
    peer = start_server(tmp / "no-overtaking", cache, log_level="warning", **NO_OVERTAKING)
    try:
        peer.wait_ready()
        with peer.client(600.0) as c:
            results["short_no_overtaking"] = {"config": NO_OVERTAKING, **short_p95(peer, c, args.quick)}
            print("short (no overtaking)", results["short_no_overtaking"], flush=True)
    finally:
        peer.stop()
    if args.peer:  # the same text, one utterance however long (before issue 13)
        peer = start_server(tmp / "peer", cache, log_level="warning", max_utterance_ids=100000,
                            max_batch_ids=100000, max_request_ids=100000, deadline_s=600)
        try:
            peer.wait_ready()
            with peer.client(600.0) as c:
                c.post("/v1/synthesize", json={"text": SHORT}).raise_for_status()
                pidle = vm(peer.process.pid, "VmRSS")
                text = mixed(700, seed=3)
                results["peer"] = {"unbounded": one(c, peer.process.pid, text, pidle)}
        finally:
            peer.stop()
        srv2 = start_server(tmp / "srv2", cache, log_level="warning")
        try:
            srv2.wait_ready()
            with srv2.client(600.0) as c:
                c.post("/v1/synthesize", json={"text": SHORT}).raise_for_status()
                idle2 = vm(srv2.process.pid, "VmRSS")
                results["peer"]["bounded"] = one(c, srv2.process.pid, mixed(700, seed=3), idle2)
        finally:
            srv2.stop()
        print("peer", results["peer"], flush=True)
    write(results, args)


def write(results: dict, args) -> None:
    worst_rss = max(r["peak_rss_above_idle_mib"] for r in results["worst"].values())
    rows = results["linearity"]
    every = [*results["worst"].values(), *rows]
    admitted = [r for r in every if r["status"] == 200]
    per_id = [r["ms_per_id"] for r in rows if r["status"] == 200]
    # linear: time per id within 1.5x across sizes (the smallest size carries fixed overheads)
    spread = round(max(per_id[1:]) / min(per_id[1:]), 2) if len(per_id) > 2 else None
    bad = [r for r in every if r["status"] >= 500]
    lc = results["short_no_overtaking"]
    figures = [
        br.figure("peak_rss_above_idle_mib", worst_rss, "MiB", "<= 1536", worst_rss <= 1536),
        br.figure("time_per_id_spread", spread, "x", "<= 1.5 (sizes >= 250 chars)",
                  None if spread is None else spread <= 1.5,
                  **({} if spread is not None else {"note": "not measured: fewer than 3 admitted sizes"})),
        br.figure("short_p95_ratio", results["short"]["p95_ratio"], "x", "<= 2.0", results["short"]["p95_ratio"] <= 2.0),
        br.figure("server_errors", len(bad), "responses", "0 (no 5xx for any admitted-size text)", not bad),
        br.figure("longest_admitted_seconds", max((r["seconds"] for r in admitted), default=0), "s",
                  f"< deadline {DEFAULTS.deadline_s:.0f} s", all(r["seconds"] < DEFAULTS.deadline_s for r in every)),
        br.figure("short_p95_ratio_no_overtaking", lc["p95_ratio"], "x",
                  note=f"peer: the same server with {lc['config']} (informational)"),
    ]
    if "peer" in results:
        p = results["peer"]
        figures.append(br.figure(
            "peer_rss_ratio",
            round(p["unbounded"]["peak_rss_above_idle_mib"] / max(1.0, p["bounded"]["peak_rss_above_idle_mib"]), 2),
            "x", note="informational: unbounded / bounded peak RSS above idle, same 700-char text"))
    command = f".venv/bin/python bench/bounds.py{' --quick' if args.quick else ''}{' --peer' if args.peer else ''}"
    limits = {k: getattr(DEFAULTS, k) for k in ("max_chars", "max_utterance_ids", "max_batch_ids", "max_request_ids",
                                                "max_batch_size", "deadline_s", "express_max_ids")}
    out = br.write(REPO / "bench" / "results" / "bounds.json", br.document(
        "bounds", figures, command=command, machine=br.machine(load_avg_at_end=os.getloadavg()),
        details={"quick": args.quick, "limits": limits, **results}))
    m = out["machine"]
    lines = [
        "# Bounds benchmark (issue 13)", "",
        f"{out['date']}, {m['cpus']} CPUs, load average at the end {m['load_avg_at_end']} "
        "(a shared machine: other jobs ran beside it; seconds are noisy, RSS is not).",
        f"Command: `{command}`; defaults {limits}.", "",
        *br.markdown_table(figures),
    ]
    lines += ["", f"Idle server RSS {results['idle_rss_mib']} MiB.", "",
              "| text | chars | status | seconds | audio s | peak RSS above idle MiB |", "|---|---|---|---|---|---|"]
    for name, r in results["worst"].items():
        lines.append(f"| {name} | {r['chars']} | {r['status']} | {r['seconds']} | {r.get('audio_s', '-')} | "
                     f"{r['peak_rss_above_idle_mib']} |")
    lines += ["", "Time against size (unpunctuated mixed scripts):", "",
              "| chars | ids | status | seconds | ms/char | ms/id | peak RSS above idle MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['chars']} | {r['ids']} | {r['status']} | {r['seconds']} | {r['ms_per_char']} | "
                     f"{r['ms_per_id']} | {r['peak_rss_above_idle_mib']} |")
    s = results["short"]
    lines += ["", f"Short request ({s['text']!r}, {s['requests']} each): idle p95 {s['idle_p95_s']} s "
              f"(median {s['idle_median_s']}), under load p95 {s['loaded_p95_s']} s (median {s['loaded_median_s']}); "
              f"load: {s['long_load']}."]
    s = results["short_no_overtaking"]
    lines += ["", f"Peer, the same server with {s['config']} (no overtaking): idle p95 {s['idle_p95_s']} s, "
              f"under load p95 {s['loaded_p95_s']} s (median {s['loaded_median_s']}), ratio {s['p95_ratio']}."]
    if "peer" in results:
        p = results["peer"]
        lines += ["", f"Peer (same run, 700 chars unpunctuated mixed, one utterance however long = before issue 13): "
                  f"{p['unbounded']}; bounded: {p['bounded']}."]
    (REPO / "bench" / "results" / "bounds.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(figures, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
