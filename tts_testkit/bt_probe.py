"""What a host beside the fleet would try against its swarm (issue 27's "peer exfiltration"),
as a tiny client with no credentials: announce to and scrape the tracker, and fetch one
piece of a model file straight from a node's BitTorrent port (BitTorrent v1 peer wire:
handshake, interested, wait for unchoke, request the piece in 16 KiB blocks; the piece is
checked against its SHA-1 from the torrent).

    python -m tts_testkit.bt_probe tracker http://10.0.0.11:6969/announce INFOHASH
    python -m tts_testkit.bt_probe piece 10.0.0.13 6881 INFOHASH INDEX LENGTH SHA1

Each prints one JSON line: {"ok": true, ...} when the swarm answered, {"ok": false,
"refused": true, ...} when the connection was refused. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import struct
import time
import urllib.error
import urllib.parse
import urllib.request

BLOCK = 16 * 1024
PSTR = b"BitTorrent protocol"


def tracker(announce: str, info_hash: str, timeout: float = 30.0) -> dict:
    """Announce as a would-be peer, then scrape (the hash, and the full scrape)."""
    raw = bytes.fromhex(info_hash)
    params = urllib.parse.urlencode({"info_hash": raw, "peer_id": b"-XX0001-" + os.urandom(6).hex().encode()[:12],
                                     "port": 6881, "uploaded": 0, "downloaded": 0, "left": 1, "compact": 1})
    scrape = announce.replace("/announce", "/scrape")
    answers = {}
    for name, url in (("announce", f"{announce}?{params}"),
                      ("scrape", f"{scrape}?{urllib.parse.urlencode({'info_hash': raw})}"), ("full_scrape", scrape)):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                answers[name] = resp.read(65536).decode("latin-1")
        except urllib.error.HTTPError as exc:  # it answered (with an error status): reachable all the same
            answers[name] = f"HTTP {exc.code}"
        except urllib.error.URLError as exc:
            refused = isinstance(exc.reason, ConnectionError)
            return {"ok": False, "refused": refused, "step": name, "error": str(exc.reason)}
        except ConnectionError as exc:
            return {"ok": False, "refused": True, "step": name, "error": str(exc)}
    return {"ok": True, **answers}


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        data += chunk
    return data


def _message(sock: socket.socket) -> tuple[int | None, bytes]:
    length = struct.unpack(">I", _read(sock, 4))[0]
    if length == 0:
        return None, b""  # keep-alive
    body = _read(sock, length)
    return body[0], body[1:]


def piece(host: str, port: int, info_hash: str, index: int, length: int, sha1: str, timeout: float = 60.0) -> dict:
    """Fetch one whole piece from the peer at host:port and check its SHA-1."""
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except ConnectionError as exc:
        return {"ok": False, "refused": True, "step": "connect", "error": str(exc)}
    deadline = time.monotonic() + timeout
    with sock:
        sock.settimeout(timeout)
        try:
            sock.sendall(bytes([len(PSTR)]) + PSTR + bytes(8) + bytes.fromhex(info_hash) + b"-XX0001-" + os.urandom(12))
            reply = _read(sock, 68)
            if reply[28:48] != bytes.fromhex(info_hash):
                return {"ok": False, "refused": False, "step": "handshake", "error": "another info-hash"}
            sock.sendall(struct.pack(">IB", 1, 2))  # interested
            while time.monotonic() < deadline:
                kind, _ = _message(sock)
                if kind == 1:  # unchoke
                    break
            else:
                return {"ok": False, "refused": False, "step": "unchoke", "error": "never unchoked"}
            for begin in range(0, length, BLOCK):
                sock.sendall(struct.pack(">IBIII", 13, 6, index, begin, min(BLOCK, length - begin)))
            data = bytearray(length)
            got = 0
            while got < length and time.monotonic() < deadline:
                kind, payload = _message(sock)
                if kind == 7:  # piece: index, begin, block
                    begin = struct.unpack(">I", payload[4:8])[0]
                    block = payload[8:]
                    data[begin:begin + len(block)] = block
                    got += len(block)
        except (ConnectionError, socket.timeout, OSError) as exc:
            return {"ok": False, "refused": isinstance(exc, ConnectionRefusedError), "step": "exchange",
                    "error": str(exc)}
    digest = hashlib.sha1(bytes(data)).hexdigest()
    return {"ok": got >= length and digest == sha1, "refused": False, "bytes": got, "sha1": digest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("tracker")
    t.add_argument("announce")
    t.add_argument("info_hash")
    p = sub.add_parser("piece")
    for name in ("host", "port", "info_hash", "index", "length", "sha1"):
        p.add_argument(name)
    args = ap.parse_args()
    if args.what == "tracker":
        result = tracker(args.announce, args.info_hash)
    else:
        result = piece(args.host, int(args.port), args.info_hash, int(args.index), int(args.length), args.sha1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
