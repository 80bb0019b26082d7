"""Load client for the fleet harness: runs inside one node (Node.popen) and sends synthesis
requests over the node's runtime socket back to back, without pause, until SIGTERM or the
stop file appears. One JSON line per request on stdout:

    {"t0": wall start, "t1": wall end, "status": 200, "version": "1.1.0", "tries": 1, "error": null}

A request that gets 503 (or 429) with Retry-After is retried after that delay and counts as
answered if a retry succeeds (what a well-behaved client does); anything else - another
status, a broken connection, a timeout, retries exhausted - is a failed request. Wall-clock
times (time.time) so the controller can line them up with the playbook's start.

    python tts_testkit/fleet/client.py --socket /run/tts/runtime.sock [--text T] [--stop-file F]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import httpx


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", default="/run/tts/runtime.sock")
    parser.add_argument("--voice", default="joe")
    parser.add_argument("--text", default="Fleet check.")
    parser.add_argument("--stop-file", default="")
    parser.add_argument("--max-retry-s", type=float, default=300.0, help="give up retrying a request after this")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()

    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    http = httpx.Client(transport=httpx.HTTPTransport(uds=args.socket), base_url="http://tts-runtime",
                        timeout=httpx.Timeout(args.timeout, connect=10.0))
    body = {"text": args.text, "voice": args.voice}
    while not stopping and not (args.stop_file and Path(args.stop_file).exists()):
        t0 = time.time()
        record = {"t0": t0, "status": None, "version": None, "tries": 0, "error": None, "retried": []}
        while True:
            record["tries"] += 1
            try:
                response = http.post("/v1/synthesize", json=body)
            except httpx.HTTPError as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"
                break
            record["status"] = response.status_code
            retry_after = response.headers.get("retry-after")
            if response.status_code in (429, 503) and retry_after is not None \
                    and time.time() - t0 + float(retry_after) < args.max_retry_s:
                record["retried"].append(response.status_code)
                time.sleep(float(retry_after))
                continue
            if response.status_code == 200:
                record["version"] = response.headers.get("x-voice-version")
                record["bytes"] = len(response.content)
            else:
                record["error"] = response.text[:200]
            break
        record["t1"] = time.time()
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()
    http.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
