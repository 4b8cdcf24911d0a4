"""Per-candidate score cache in Redis, shared by every replica (and /recommend's whole answers).

One key per (model checkpoint version, precision, template-table version, template id,
reduction, token limits, full rendered instruction, below float32 the request's candidate set
(see ``Engine.shares_scores_across_requests``), candidate text): the rendered instruction
already holds the normalised history, preference and intention, so a different
template, history or wording is a different key, and a partial hit scores only the
misses. Values are ``repr(float)``, which ``float()`` reads back bit-identically, so a
cached answer equals an uncached one.

Redis is optional: when it is down or slow every operation fails fast (short socket
timeouts), the error is counted, logged once per outage, the request is answered
uncached, and Redis is tried again after a back-off.

The Redis I/O runs on a few threads of its own (a blocking client, one connection per
thread), not on the event loop. On the loop, under 200 concurrent clients, replies waited
behind HTTP work until the timeouts fired, and the async client's pool ran out of
connections ("Too many connections"): 151 cache errors on a healthy Redis in one soak run.
On threads, the socket timeout measures Redis alone; a request waiting for a free I/O
thread is queued, not failed.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from .metrics import Metrics

log = logging.getLogger("instructrec.service.cache")

_SEP = "\x1f"  # unit separator: cannot be confused with text inside the parts


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def score_keys(namespace: str, parts: Sequence[str], candidates: Sequence[str]) -> list[str]:
    """One key per candidate: the SHA-256 of the parts and the candidate joined by ``_SEP``.
    The shared prefix (which holds the whole instruction) is hashed once and copied."""
    prefix = hashlib.sha256(_encode(_SEP.join((*parts, ""))))
    keys = []
    for text in candidates:
        h = prefix.copy()
        h.update(_encode(text))
        keys.append(f"{namespace}:{h.hexdigest()}")
    return keys


class ScoreCache:
    """``get_many`` / ``set_many`` never raise: on any Redis problem they degrade to 'no cache'."""

    def __init__(self, url: str, *, namespace: str, ttl_seconds: int, timeout_s: float, retry_s: float,
                 metrics: Metrics, io_threads: int = 8):
        self.url = url
        self.namespace = namespace
        self.ttl = ttl_seconds
        self.timeout = timeout_s
        self.retry = retry_s
        self.metrics = metrics
        self._client = None
        self._io: ThreadPoolExecutor | None = None
        self._down_since: float | None = None  # monotonic time of the first error of the current outage
        self._retry_at = 0.0
        if url:
            import redis
            from redis.backoff import NoBackoff
            from redis.exceptions import ConnectionError as RedisConnectionError
            from redis.retry import Retry

            # One retry, at once, on a broken connection: a pooled connection of before a Redis
            # restart fails once and is replaced. No retry of a timeout: a slow Redis costs one.
            self._client = redis.Redis.from_url(
                url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=0,
                decode_responses=True, max_connections=io_threads, retry=Retry(NoBackoff(), 1),
                retry_on_error=[RedisConnectionError])
            self._io = ThreadPoolExecutor(io_threads, thread_name_prefix="instructrec-redis")
        metrics.cache_up.set(0)

    async def _call(self, fn, *args):
        """``fn(*args)`` on a cache I/O thread."""
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    @property
    def available(self) -> bool:
        """Worth trying now: configured, and not inside an outage's back-off."""
        return self._client is not None and (self._down_since is None or time.monotonic() >= self._retry_at)

    @property
    def up(self) -> bool:
        """Configured and not in an outage (as far as the last operation knows)."""
        return self._client is not None and self._down_since is None

    def keys(self, parts: Sequence[str], candidates: Sequence[str]) -> list[str]:
        return score_keys(self.namespace, parts, candidates)

    async def connect(self) -> bool:
        """Ping once at start-up, only to say in the log whether the cache is in use."""
        if self._client is None:
            log.info("score cache disabled (INSTRUCTREC_REDIS_URL is empty): answering uncached")
            return False
        try:
            await self._call(self._client.ping)
        except Exception as exc:  # noqa: BLE001 - any failure means "no cache for now"
            await self._failed(exc)
            return False
        self._ok()
        log.info("score cache: Redis at %s (namespace %s, ttl %ss)", _safe_url(self.url), self.namespace, self.ttl)
        return True

    async def _guarded(self, fn, *args) -> tuple[bool, Any]:
        """(True, ``fn(*args)`` run on an I/O thread), or (False, None) when the cache cannot be
        used now: inside an outage's back-off, or on any Redis error (counted, logged once)."""
        if not self.available:
            return False, None
        try:
            value = await self._call(fn, *args)
        except Exception as exc:  # noqa: BLE001 - any failure means "no cache for now"
            await self._failed(exc)
            return False, None
        self._ok()
        return True, value

    async def get_many(self, keys: Sequence[str]) -> list[float | None] | None:
        """Cached scores (None where missing), or None when the cache cannot be used now."""
        if not keys:
            return None
        ok, values = await self._guarded(self._client.mget, list(keys))
        return [None if v is None else float(v) for v in values] if ok else None

    async def set_many(self, items: dict[str, float]) -> bool:
        if not items:
            return False
        return (await self._guarded(self._set_many, items))[0]

    def _set_many(self, items: dict[str, float]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for key, score in items.items():
            pipe.set(key, repr(float(score)), ex=self.ttl)
        pipe.execute()

    # -- whole answers (/recommend), JSON -----------------------------------------------
    def answer_key(self, parts: Sequence[str]) -> str:
        """One key for a whole answer decided by ``parts``."""
        return f"{self.namespace}:answer:{hashlib.sha256(_encode(_SEP.join(parts))).hexdigest()}"

    async def get_text(self, key: str) -> tuple[bool, str | None]:
        """(whether the cache could be used, the text kept at ``key`` or None)."""
        return await self._guarded(self._client.get, key)

    async def set_text(self, key: str, value: str | bytes, ttl_seconds: int | None = None) -> bool:
        """Keep ``value`` at ``key`` for ``ttl_seconds`` (default: the cache's TTL)."""
        return (await self._guarded(functools.partial(self._client.set, key, value, ex=ttl_seconds or self.ttl)))[0]

    async def get_json(self, key: str) -> tuple[bool, Any]:
        """(whether the cache could be used, the cached value or None)."""
        ok, value = await self.get_text(key)
        return ok, None if value is None else json.loads(value)

    async def set_json(self, key: str, value: Any) -> bool:
        # repr-exact floats: json writes a float as its shortest repr, read back bit-identically
        return await self.set_text(key, json.dumps(value))

    async def close(self) -> None:
        if self._client is not None:
            try:
                await self._call(self._client.close)
            except Exception:  # noqa: BLE001 - closing a dead connection
                pass
            self._io.shutdown(wait=False, cancel_futures=True)

    # -- outage bookkeeping ---------------------------------------------------------
    async def _failed(self, exc: BaseException) -> None:
        self.metrics.cache_errors.inc()
        self.metrics.cache_up.set(0)
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            log.warning("score cache unavailable (%s: %s): answering uncached, retrying every %.1fs",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "timeout", self.retry)
            # The pooled connections of before the outage are dead if Redis restarted: dropped
            # here, so none of them fails once more on a healthy Redis.
            try:
                await self._call(self._client.connection_pool.disconnect)
            except Exception:  # noqa: BLE001 - closing dead connections
                pass
        self._retry_at = now + self.retry

    def _ok(self) -> None:
        if self._down_since is not None:
            log.warning("score cache back after %.1fs", time.monotonic() - self._down_since)
            self._down_since = None
        self.metrics.cache_up.set(1)


def _safe_url(url: str) -> str:
    """The URL without a password, for logs."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
