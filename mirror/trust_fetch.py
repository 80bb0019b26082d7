"""python-tuf's fetcher for a mirror bucket: bounded in size and in time.

python-tuf asks for `<base>/<file>` with a maximum length (UpdaterConfig's lengths, or
the length the signed metadata gives) and counts the bytes of the chunks it is handed.
This fetcher adds what the ngclient leaves to the network layer:

- **size before the body**: a `Content-Length` over the maximum is refused before one
  byte of the body is read (python-tuf itself stops as soon as the count passes it,
  which covers a server that sends no length or lies about it);
- **one deadline per request**, not a per-read timeout: every socket wait is bounded by
  what is left of it, and each read returns as soon as any bytes arrive (`read1`), so a
  server trickling one byte a second is cut off at the deadline;
- presigned GETs (the mirror is private S3): presigning is local, one request per file.

A 403/404 is `DownloadHTTPError` with that status: python-tuf reads it as "no newer
root" when it walks the root chain.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from typing import Callable
from urllib.parse import urlsplit

from tuf.api import exceptions
from tuf.ngclient import FetcherInterface

from . import layout

CHUNK = 16 * 1024
DEFAULT_DEADLINE = 20.0
CONNECT_TIMEOUT = 5.0
PRESIGN_SECONDS = 300


class MetadataDeadline(exceptions.DownloadError):
    """A metadata request did not complete within its deadline."""


class BucketFetcher(FetcherInterface):
    """Fetches `tuf/<file>` from one bucket; base URL `tuf://<label>/`.

    `client` returns a boto3 S3 client (created lazily by the caller); `clock` is
    injectable so that tests can expire a deadline without waiting for it.
    """

    def __init__(self, label: str, client: Callable[[], object], bucket: str,
                 deadline: float = DEFAULT_DEADLINE, clock: Callable[[], float] = time.monotonic):
        self.label = label
        self.base_url = f"tuf://{label}/"
        self._client = client
        self._bucket = bucket
        self.deadline = deadline
        self._clock = clock
        self._max_length: int | None = None
        self.requests = 0
        self.bytes = 0

    def download_bytes(self, url: str, max_length: int) -> bytes:
        self._max_length = max_length
        try:
            return super().download_bytes(url, max_length)
        finally:
            self._max_length = None

    def _key(self, url: str) -> str:
        if not url.startswith(self.base_url):
            raise exceptions.DownloadError(f"mirror {self.label}: unexpected metadata URL {url!r}")
        return layout.tuf_key(url[len(self.base_url):])

    def _fetch(self, url: str) -> Iterator[bytes]:
        key = self._key(url)
        self.requests += 1
        try:
            client = self._client()
            for chunk in bounded_get(client, self._bucket, key, self._max_length, self.deadline,
                                     self.label, self._clock):
                self.bytes += len(chunk)
                yield chunk
        except exceptions.DownloadError:
            raise
        except Exception as exc:  # credentials, presigning: still "this mirror failed"
            raise exceptions.DownloadError(f"mirror {self.label}: {key}: {type(exc).__name__}: {exc}") from None


def bounded_get(client, bucket: str, key: str, max_length: int | None, deadline: float, label: str,
                clock: Callable[[], float] = time.monotonic) -> Iterator[bytes]:
    """GET one object through a presigned URL: refused before the body when its length
    is over `max_length`, and cut off at `deadline` seconds however slowly bytes come
    (headers included: a timer shuts the socket down at the deadline, which wakes any
    blocked read). Raises python-tuf's DownloadError family (DownloadHTTPError carries
    the status)."""
    ends = clock() + deadline
    presigned = client.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=PRESIGN_SECONDS)
    parts = urlsplit(presigned)
    conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(parts.netloc, timeout=min(CONNECT_TIMEOUT, deadline))
    expired = threading.Event()
    timer = None
    late = MetadataDeadline(f"mirror {label}: {key} took longer than the {deadline:g} s deadline for one "
                            "metadata request")
    try:
        try:
            conn.connect()
        except OSError as exc:
            raise exceptions.DownloadError(f"mirror {label} is unreachable: {type(exc).__name__}: {exc}") from None
        try:
            timer = threading.Timer(max(ends - clock(), 0), _cut, (conn.sock, expired))
            timer.daemon = True
            timer.start()
            conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            if expired.is_set():
                raise late from None
            raise exceptions.DownloadError(f"mirror {label}: {key}: {type(exc).__name__}: {exc}") from None
        if resp.status != 200:
            raise exceptions.DownloadHTTPError(f"mirror {label}: {key}: HTTP {resp.status}", resp.status)
        length = resp.getheader("Content-Length")
        if max_length is not None and length and length.isdigit() and int(length) > max_length:
            raise exceptions.DownloadLengthMismatchError(
                f"mirror {label}: {key} is {length} bytes, over its {max_length} byte limit")
        while True:
            try:
                chunk = resp.read1(CHUNK)  # returns as soon as any bytes are there
            except (OSError, http.client.HTTPException) as exc:
                if expired.is_set():
                    raise late from None
                raise exceptions.DownloadError(f"mirror {label}: {key}: {type(exc).__name__}: {exc}") from None
            if expired.is_set():
                raise late
            if not chunk:
                return
            yield chunk
    finally:
        if timer is not None:
            timer.cancel()
        conn.close()


def _cut(sock, expired: threading.Event) -> None:
    """The deadline passed: wake whatever read is blocked on this socket."""
    expired.set()
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


def read_bounded(client, bucket: str, key: str, max_length: int, deadline: float, label: str) -> bytes:
    """The whole object, within `max_length` bytes and `deadline` seconds."""
    data = bytearray()
    for chunk in bounded_get(client, bucket, key, max_length, deadline, label):
        data += chunk
        if len(data) > max_length:
            raise exceptions.DownloadLengthMismatchError(
                f"mirror {label}: {key} sent more than its {max_length} byte limit")
    return bytes(data)
