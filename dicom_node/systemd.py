"""sd_notify without a dependency: READY, STOPPING and watchdog pings when run under systemd."""
from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)
    return True


def watchdog_interval() -> float | None:
    """Seconds systemd allows between pings (WatchdogSec), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    return int(usec) / 1e6 if usec and usec.isdigit() else None
