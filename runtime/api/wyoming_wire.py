"""Reading Wyoming events with bounds: what a client sends can never make the server hold more
than a few of its limits in memory.

The `wyoming` library's own reader trusts its peer (a header line up to the stream's limit, any
`data_length` or `payload_length`, and a non-number length is a TypeError), which is right for a
satellite on a trusted bus but not for a server on the network. This reader keeps the protocol
(a JSON header line; `data_length` bytes of JSON merged into its `data`; `payload_length` bytes
of payload) and refuses, with a `WireError` naming what was wrong:

* a header line longer than `max_line` (the StreamReader's own limit: it never buffers more);
* a header that is not a JSON object with a string `type`, or whose `data` is not an object;
* a `data_length` or `payload_length` that is not a whole number from 0 to its limit;
* extra data that is not a JSON object.

The limits are those of the HTTP API: room for `max_chars` characters of text as escaped JSON.
After a WireError the stream's framing is lost, so the connection is closed (after an `error`
event).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from wyoming.event import Event

from tts_common.errors import TtsError


class WireError(TtsError):
    """A client sent bytes that are not a Wyoming event within the limits; `code` is the stable
    name sent in the `error` event."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class WireLimits:
    max_line: int  # bytes of one header line (newline included)
    max_data: int  # data_length
    max_payload: int  # payload_length (a TTS server is sent none; anything more is refused)

    @classmethod
    def for_text(cls, max_chars: int) -> "WireLimits":
        # As the HTTP body limit (access.py): a character outside the BMP escapes to 12 bytes.
        room = max_chars * 12 + 16384
        return cls(max_line=room, max_data=room, max_payload=65536)


def _length(header: dict, key: str, limit: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise WireError(f"{key} must be a whole number of bytes, not {json.dumps(value)[:40]}", "bad_event")
    if value > limit:
        raise WireError(f"{key} {value} is over the limit of {limit} bytes", "event_too_large")
    return value


def _object(raw: bytes, what: str) -> dict:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise WireError(f"{what} is not JSON (is this a Wyoming client?)", "bad_event") from None
    if not isinstance(value, dict):
        raise WireError(f"{what} must be a JSON object", "bad_event")
    return value


async def read_event(reader: asyncio.StreamReader, limits: WireLimits) -> Event | None:
    """The next event, or None when the client has closed the connection (also mid-event)."""
    try:
        line = await reader.readline()
    except ValueError:  # asyncio's LimitOverrunError: the line outgrew the reader's limit
        raise WireError(f"event header line is over the limit of {limits.max_line} bytes", "line_too_long") from None
    if not line.endswith(b"\n"):
        return None
    header = _object(line, "event header")
    kind, data = header.get("type"), header.get("data")
    if not isinstance(kind, str) or not kind:
        raise WireError("event header has no 'type'", "bad_event")
    if data is None:
        data = {}
    elif not isinstance(data, dict):
        raise WireError("event 'data' must be a JSON object", "bad_event")
    data_length = _length(header, "data_length", limits.max_data)
    payload_length = _length(header, "payload_length", limits.max_payload)
    try:
        if data_length:
            data.update(_object(await reader.readexactly(data_length), "event data"))
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError:
        return None
    return Event(type=kind, data=data, payload=payload)
