"""Overtaking benchmark (issue 29): a long request under a flood of short ones, against a real server.

    .venv/bin/python bench/overtake.py [--quick] [--rounds N] [--peer-ref REF]

Starts `tts-runtime serve` with the default limits and measures, in alternating rounds so
drift on a shared machine hits each alike:
* the long request alone (its solo time), then while 2 and while 8 clients loop a short
  request back to back: the long request's slowdown (target: at most 2x, docs/runtime.md
  "Share of short requests"), and what the short requests got (answers, p95 latency);
* a short request sent right after a long one of 80 sentences was admitted: it must be
  admitted (a request with more utterances than queue_size no longer fills the queue) and
  answered before the long one.
--peer-ref runs the same against a server of the code at a git ref (a temporary worktree on
PYTHONPATH), e.g. the commit before issue 29's scheduler. Writes bench/results/overtake.json
and overtake.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from runtime.config import RuntimeConfig  # noqa: E402
from tts_testkit import benchresult as br  # noqa: E402
from tts_testkit.paths import REPO  # noqa: E402
from tts_testkit.runtime_server import publish_to_cache, start_server, voice_bundle_dir  # noqa: E402

SHORT = "Hello there."
SENTENCES = ("The committee met on Tuesday to review the plan. Several members raised questions about the "
             "budget. A revised schedule was proposed and accepted. Work will begin next month. ")
TARGET = 2.0


def long_text(chars: int) -> str:
    return (SENTENCES * (chars // len(SENTENCES) + 1))[:chars].rsplit(".", 1)[0] + "."


def timed_long(srv, text: str) -> float:
    with srv.client(600.0) as c:
        t0 = time.perf_counter()
        r = c.post("/v1/synthesize", json={"text": text, "seed": 1})
        elapsed = time.perf_counter() - t0
    r.raise_for_status()
    return elapsed


def flood(srv, text: str, clients: int) -> dict:
    """The long request while `clients` threads loop SHORT back to back (a 503 is counted and
    retried at once: the flood never lets up)."""
    stop = threading.Event()
    started = threading.Barrier(clients + 1)
    latencies: list[float] = []
    codes: list[int] = []

    def client() -> None:
        with srv.client(600.0) as c:
            started.wait()
            while not stop.is_set():
                t0 = time.perf_counter()
                r = c.post("/v1/synthesize", json={"text": SHORT})
                codes.append(r.status_code)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    started.wait()
    while len(codes) < 2 * clients:  # the flood is under way
        time.sleep(0.01)
    counted = len(codes)
    try:
        seconds = timed_long(srv, text)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    during = codes[counted:]
    lat = sorted(latencies)
    return {"long_s": round(seconds, 2), "short_200": during.count(200), "short_503": during.count(503),
            "short_other": len(during) - during.count(200) - during.count(503),
            "short_p50_s": round(statistics.median(lat), 3) if lat else None,
            "short_p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3) if lat else None}


MANY_SENTENCES = "It rained again today. " * 80  # more utterances than the default queue_size (64)


def short_behind_long(srv, text: str = MANY_SENTENCES) -> dict:
    """The issue's case: a long request of more utterances than queue_size admitted, then a
    short one (503 queue_full before issue 29)."""
    out: dict = {}

    def long_request() -> None:
        with srv.client(600.0) as c:
            r = c.post("/v1/synthesize", json={"text": text, "seed": 2})
            out["long_status"], out["long_done"] = r.status_code, time.perf_counter()

    with srv.client(60.0) as c:
        t = threading.Thread(target=long_request)
        t.start()
        while c.get("/v1/status").json()["queue"]["depth"] < 1 and "long_status" not in out:
            time.sleep(0.01)
        t0 = time.perf_counter()
        r = c.post("/v1/synthesize", json={"text": SHORT})
        out["short_status"], out["short_s"] = r.status_code, round(time.perf_counter() - t0, 3)
        out["short_before_long"] = "long_done" not in out
    t.join(timeout=600)
    out.pop("long_done", None)
    return out


def measure(tmp: Path, cache: Path, text: str, rounds: int, name: str, env: dict | None = None) -> dict:
    """One server: the short request behind a long one, then rounds of solo / 2 / 8 clients."""
    srv = start_server(tmp / name, cache, log_level="warning", extra_env=env)
    runs: list[dict] = []
    try:
        srv.wait_ready(180)
        with srv.client(600.0) as c:
            c.post("/v1/synthesize", json={"text": SHORT}).raise_for_status()
        behind = short_behind_long(srv)
        print(name, "short behind long", behind, flush=True)
        for r in range(rounds):
            for clients in (0, 2, 8):
                row = {"round": r, "clients": clients}
                row.update({"long_s": round(timed_long(srv, text), 2)} if clients == 0 else flood(srv, text, clients))
                runs.append(row)
                print(name, row, flush=True)
    finally:
        srv.stop()
    return {"runs": runs, "short_behind_long": behind}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one round")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--peer-ref", default=None, help="also measure the code at this git ref")
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 2)
    text = long_text(1200)
    tmp = Path(tempfile.mkdtemp(prefix="bench-overtake-"))
    cache = tmp / "cache"
    publish_to_cache(cache, "joe", "1.0.0", voice_bundle_dir(tmp))
    load_start = os.getloadavg()
    results = {"this": measure(tmp, cache, text, rounds, "this")}
    if args.peer_ref:
        tree = tmp / "peer-tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.peer_ref], check=True,
                       capture_output=True)
        try:
            results["peer"] = measure(tmp, cache, text, rounds, "peer", env={"PYTHONPATH": str(tree)})
            results["peer"]["ref"] = args.peer_ref
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)
    defaults = RuntimeConfig()
    details = {"long_text_chars": len(text), "short_text": SHORT,
               "limits": {k: getattr(defaults, k) for k in ("queue_size", "queue_ids", "max_request_ids",
                                                           "express_max_ids", "max_batch_size", "max_batch_ids",
                                                           "deadline_s")},
               **results}
    doc = br.document("overtake", figures_of(results), details=details,
                      machine=br.machine(load_avg_start=list(load_start), load_avg_end=list(os.getloadavg())))
    write(REPO / "bench" / "results", doc)


def measured(result: dict) -> dict[str, tuple]:
    """One server's figures, by name: (value, unit, target, met, note)."""
    runs = result["runs"]
    best_solo = min(r["long_s"] for r in runs if r["clients"] == 0)
    out = {}
    for clients in (2, 8):
        loaded = [r for r in runs if r["clients"] == clients]
        slowdown = max(r["long_s"] for r in loaded) / best_solo
        out[f"long_slowdown_{clients}_clients"] = (round(slowdown, 2), "x", f"<= {TARGET}", slowdown <= TARGET,
                                                   f"worst of {len(loaded)} over the best solo run")
        out[f"short_503_{clients}_clients"] = (sum(r["short_503"] for r in loaded), "responses", "0",
                                               all(r["short_503"] == 0 for r in loaded), None)
    status = result["short_behind_long"]["short_status"]
    out["short_admitted_behind_long"] = (status, "HTTP status", "200", status == 200, None)
    return out


def figures_of(results: dict) -> list[dict]:
    """Our server's figures; with a peer run, each carries the peer's value (the slowdowns their
    ratio, ours / the peer's; a ratio of counts or status codes would mean nothing)."""
    ours = measured(results["this"])
    theirs = measured(results["peer"]) if "peer" in results else {}
    figures = []
    for name, (value, unit, target, met, note) in ours.items():
        extra = {}
        if name in theirs:
            peer_value = theirs[name][0]
            extra["peer"] = br.peer(f"the same server at {results['peer']['ref']}", peer_value, unit)
            extra["ratio"] = round(value / peer_value, 2) if name.startswith("long_slowdown") else None
        figures.append(br.figure(name, value, unit, target, met, note=note, **extra))
    return figures


def _table(result: dict) -> list[str]:
    lines = ["| round | short clients | long s | short 200 | short 503 | short p50 s | short p95 s |",
             "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['round']} | {r['clients']} | {r['long_s']} | {r.get('short_200', '-')} | "
                     f"{r.get('short_503', '-')} | {r.get('short_p50_s', '-')} | {r.get('short_p95_s', '-')} |")
    return lines


def markdown(doc: dict) -> str:
    """The report of a results document (written from the document alone)."""
    m, d = doc["machine"], doc["details"]
    lines = [
        "# Overtaking benchmark (issue 29)", "",
        f"{doc['date']}, {m['cpus']} CPUs, load average {m['load_avg_start'][0]:.1f} -> "
        f"{m['load_avg_end'][0]:.1f} (a shared machine: other jobs ran beside it; seconds are noisy).",
        f"Command: `{doc['command']}`; defaults {d['limits']}.",
        f"Long request: {d['long_text_chars']} characters of English; short request {d['short_text']!r}, looped "
        "back to back by 2 or 8 clients while the long one runs (a 503 is retried at once).",
    ]
    if "peer" in d:
        lines.append(f"Peer: the same benchmark against the server at `{d['peer']['ref']}` (a worktree of that "
                     "commit), run after ours in the same invocation; ratio = our slowdown / the peer's.")
    lines += ["", *br.markdown_table(doc["figures"]), "",
              f"Short request right after the long one was admitted: {d['this']['short_behind_long']}.", "",
              *_table(d["this"])]
    if "peer" in d:
        lines += ["", f"Peer: the same server at `{d['peer']['ref']}`; short request behind the long one: "
                      f"{d['peer']['short_behind_long']}.", "", *_table(d["peer"])]
    return "\n".join(lines) + "\n"


def write(out: Path, doc: dict) -> None:
    br.write(out / "overtake.json", doc)
    (out / "overtake.md").write_text(markdown(doc))
    print(json.dumps(doc["figures"], indent=2))


if __name__ == "__main__":
    main()
