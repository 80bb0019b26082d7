"""Load on a running runtime over its Unix socket: the request texts and the concurrent
client loop that bench/server.py and bench/metrics.py share (the same texts and client, so
their latencies compare)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Callable

import httpx

SENTENCES = [
    "The service answers quickly.", "Every request has its own seed.", "Short sentences keep this fast.",
    "Batching groups similar lengths.", "The queue is bounded.", "Nothing is shared between requests.",
    "Clients wait on the socket.", "Audio comes back as a file.",
]


def request_text(i: int) -> str:
    """Request i's text: 1-3 of SENTENCES, deterministic in i."""
    n = 1 + i % 3
    return " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(n))


async def run_clients(sock: Path, clients: int, per_client: int, seed_base: int = 0,
                      text_fn: Callable[[int], str] = request_text):
    """`clients` keep-alive clients, each sending `per_client` POST /v1/synthesize one after
    another (request i: text_fn(i), seed seed_base + i). Returns ([(i, status, body if 200
    else b"", seconds)], wall seconds)."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    results = []
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(sock), limits=limits),
                                 base_url="http://tts", timeout=600) as c:

        async def client(k: int):
            for j in range(per_client):
                i = k * per_client + j
                t0 = time.perf_counter()
                r = await c.post("/v1/synthesize", json={"text": text_fn(i), "seed": seed_base + i})
                results.append((i, r.status_code, r.content if r.status_code == 200 else b"", time.perf_counter() - t0))

        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        wall = time.perf_counter() - t0
    return results, wall
