"""systemd notifications (READY, WATCHDOG, STOPPING, STATUS) over ``$NOTIFY_SOCKET``.

A no-op when the variable is unset, so the same code runs under systemd, in a terminal and
in tests (which listen on a socket of their own and point ``NOTIFY_SOCKET`` at it).
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends sd_notify datagrams; silent when not running under a notify-type unit."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET")

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify."""
        return bool(self.address)

    def send(self, message: str) -> bool:
        """Send one datagram; False (never an exception) if it could not be sent."""
        if not self.address:
            return False
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace socket
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.connect(addr)
                s.sendall(message.encode())
            return True
        except OSError:
            return False

    def ready(self, status: str = "capturing") -> bool:
        """Tell systemd start-up is complete."""
        return self.send(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def watchdog(self) -> bool:
        """Keep-alive ping; systemd restarts the unit if these stop for ``WatchdogSec``."""
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        """Tell systemd a clean stop has begun."""
        return self.send("STOPPING=1\nSTATUS=stopping")

    def status(self, text: str) -> bool:
        """Free-form status line shown by ``systemctl status``."""
        return self.send(f"STATUS={text}")


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd gave us (``$WATCHDOG_USEC``), in seconds."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.5, int(usec) / 2_000_000)
    except ValueError:
        return None
