"""Helpers for the service tests: a real uvicorn server in a thread, a private redis-server.

Everything is real: uvicorn listens on a loopback port and tests talk HTTP to it with
httpx; Redis is the machine's (127.0.0.1:6379, with a namespace unique to the run) or a
second redis-server started here, which a test may kill and restart.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import uuid

import httpx

from instructrec.service.loopback import ThreadedServer, free_port  # noqa: F401  (re-exported for the tests)

SHARED_REDIS = "redis://127.0.0.1:6379/0"


def unique_namespace() -> str:
    return f"instructrec-test:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class ServerThread(ThreadedServer):
    """``with ServerThread(app) as srv:`` runs uvicorn on 127.0.0.1:<free port> until the block ends."""

    def __init__(self, app, ready_timeout: float = 90.0):
        super().__init__(app, start_timeout=30.0)
        self.app = app
        self.ready_timeout = ready_timeout

    def __enter__(self) -> "ServerThread":
        return self.start()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while time.monotonic() < deadline:
                r = client.get("/ready")
                if r.status_code == 200:
                    return
                if r.json().get("status") == "failed":
                    raise RuntimeError(r.text)
                time.sleep(0.05)
        raise RuntimeError("service did not become ready")

    def __exit__(self, *exc) -> None:
        self.stop(timeout=15)


def metric(client: httpx.Client, name: str, labels: dict[str, str] | None = None) -> float:
    """Value of one sample from /metrics (0 if absent)."""
    text = client.get("/metrics").text
    want = labels or {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(found.get(k) == v for k, v in want.items()):
            return float(m.group(4))
    return 0.0


class RedisProcess:
    """A private redis-server (no persistence) on a fixed port, which tests can stop and start."""

    binary = shutil.which("redis-server")

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--enable-debug-command", "yes", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def command(self, *args: str) -> bytes:
        """Send one inline command; returns the raw reply (does not wait for slow commands' replies)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall((" ".join(args) + "\r\n").encode())
            return s.recv(256)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def __enter__(self) -> "RedisProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def delete_namespace(url: str, namespace: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
