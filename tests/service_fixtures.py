"""Helpers for the service tests: a real uvicorn server in a thread, a private redis-server.

Everything is real: uvicorn listens on a loopback port and tests talk HTTP to it with
httpx; Redis is the machine's (127.0.0.1:6379, with a namespace unique to the run) or a
second redis-server started here, which a test may kill and restart.
"""

from __future__ import annotations

import os
import re
import time
import uuid

import httpx

from instructrec.service.loopback import RedisServer, ThreadedServer, free_port  # noqa: F401  (re-exported for the tests)

SHARED_REDIS = "redis://127.0.0.1:6379/0"


def redis_up(url: str = SHARED_REDIS) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except redis.RedisError:
        return False


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


class RedisProcess(RedisServer):
    """A private redis-server the tests may stop and start (see ``service.loopback.RedisServer``)."""


def delete_namespace(url: str, namespace: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def tiny_checkpoints(root, seeds) -> list:
    """Tiny prefix-LM checkpoints under ``root``, one per seed: different weights, so different
    checkpoint versions (what a model swap switches between)."""
    from instructrec.checkpoint import write_meta
    from instructrec.modeling import build_tiny_prefix_lm
    from instructrec.templates import TEMPLATE_VERSION

    paths = []
    for seed in seeds:
        model, tok = build_tiny_prefix_lm(seed=seed)
        path = root / f"v{seed}"
        model.save_pretrained(path)
        tok.save_pretrained(path)
        write_meta(path, {"template_version": TEMPLATE_VERSION})
        paths.append(path)
    return paths


WORDS = "legend zelda mario kart halo doom quest star wars edition remastered deluxe racing puzzle farm".split()


def varied_request(k: int, n: int = 12) -> dict:
    """The k-th of a family of /rerank bodies of different instruction and candidate lengths
    (so passes batched together would pad): answers under load are compared on them."""
    history = [f"{WORDS[(k + i) % 15]} {WORDS[(k * 3 + i) % 15]} {i}" for i in range(2 + k % 5)]
    candidates = [" ".join(WORDS[(k + j + m) % 15] for m in range(1 + (j * k) % 6)) + f" {j}" for j in range(n)]
    return {"history": history, "instruction": f"something like {WORDS[k % 15]} " * (1 + k % 4),
            "candidates": candidates}
