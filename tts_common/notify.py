"""sd_notify: tell systemd about readiness, status, watchdog and timeouts.

The protocol is one datagram of `KEY=VALUE` lines to the AF_UNIX socket named in
$NOTIFY_SOCKET (a leading '@' means the abstract namespace). Without that variable
every call is a no-op, so daemons run the same by hand and under systemd. It is a
dozen lines, so no dependency (python-systemd needs libsystemd headers to build).
"""

from __future__ import annotations

import os
import socket


def notify(**fields: object) -> bool:
    """notify(READY=1, STATUS="...") -> True if a message was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not fields:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            # Never block a daemon on its supervisor: if the receiver's queue is full
            # the message is dropped (the next STATUS/WATCHDOG supersedes it).
            sock.send(message, socket.MSG_DONTWAIT)
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None if not asked for."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2_000_000, 0.05)
    except ValueError:
        return None
