"""Idle lanes lending a hand: one request's independent parts spread over threads that would
otherwise wait, without changing a bit of its answer.

The service runs ``lanes`` single-thread workers so that concurrent requests use every core and
an answer never depends on the load. Alone, though, a request used one core of the machine.
Its instruction's pass (in position parts, each layer's two steps), its candidate passes and
its vocabulary head's column blocks are independent computations whose shapes the request
alone decides; a :class:`LanePool` lets the lane scoring it borrow the
lanes that are idle *now* for some of those parts. Which thread computes a part does not change
the part (every lane runs the same single-thread kernels on the same shapes), so the answer is
bit for bit the one computed without help; only its latency moves.

The pool never oversubscribes the cores: a lane is either scoring a batch (``take``/``give``,
called by the batcher), lent to one, or idle; only idle lanes are lent, and a lent lane goes
back after the part it is computing as soon as the batcher has a job waiting (``demand``), so a
queued request waits at most one part for a lane.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def alone(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """The parts on the calling thread, in order: what a ranker without a pool does."""
    return [fn(x) for x in items]


class LanePool:
    """``lanes`` lanes: the batcher takes one per batch, a batch borrows the idle ones."""

    def __init__(self, lanes: int, *, name: str = "instructrec-lend"):
        self.lanes = max(1, int(lanes))
        self._lock = threading.Lock()
        self._busy = 0  # lanes scoring a batch
        self._lent = 0  # lanes computing parts of another lane's batch
        self._threads = ThreadPoolExecutor(self.lanes - 1, thread_name_prefix=name) if self.lanes > 1 else None
        self.demand: Callable[[], bool] = lambda: False  # a batch is waiting for a lane (the batcher sets it)
        self.on_return: Callable[[], None] = lambda: None  # a lent lane is idle again (the batcher's wake-up)
        self.parts_lent = 0  # parts computed by lent lanes (what tests and metrics read)
        self._closed = False
        self._local = threading.local()  # per scoring lane: seconds lent lanes computed for it

    # -- the batcher's side -------------------------------------------------------------------
    def take(self) -> None:
        with self._lock:
            self._busy += 1

    def give(self) -> None:
        with self._lock:
            self._busy -= 1

    @property
    def lent(self) -> int:
        return self._lent

    def lent_seconds(self) -> float:
        """Seconds lent lanes spent computing parts of the calling thread's :meth:`map` calls
        since it last asked (then 0 again). A batch's wall time and these together are the lane
        seconds it cost, what it would have taken on its own lane alone: the batcher's drain
        rate, which must hold when the load leaves no lane idle to lend."""
        seconds = getattr(self._local, "seconds", 0.0)
        self._local.seconds = 0.0
        return seconds

    def _borrow(self, wanted: int) -> int:
        with self._lock:
            if self._threads is None or self._closed or wanted <= 0 or self.demand():
                return 0
            # the caller is a lane: counted in _busy when the batcher gave it a batch, else here
            n = max(0, min(wanted, self.lanes - max(self._busy, 1) - self._lent))
            self._lent += n
            return n

    def _return(self) -> None:
        with self._lock:
            self._lent -= 1
        try:
            self.on_return()
        except RuntimeError:  # the batcher's event loop has closed (shutting down): nobody waits
            pass

    # -- the scoring lane's side --------------------------------------------------------------
    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``[fn(x) for x in items]``, some of them computed by idle lanes meanwhile. Each thread
        takes the next part not taken yet; a lent lane stops taking parts once a batch waits. The
        caller's grad and inference modes (thread-local in torch) hold in the lent lanes too."""
        items = list(items)
        helpers = self._borrow(len(items) - 1)
        if not helpers:
            return alone(fn, items)
        results: list = [None] * len(items)
        taken = iter(range(len(items)))
        take_lock = threading.Lock()
        modes = (torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        spent = [0.0]  # seconds the lent lanes computed parts

        def next_part() -> int | None:
            with take_lock:
                return next(taken, None)

        def lend() -> None:
            try:
                with torch.inference_mode(modes[0]), torch.set_grad_enabled(modes[1]):
                    while not self.demand() and (i := next_part()) is not None:
                        start = time.perf_counter()
                        results[i] = fn(items[i])
                        with self._lock:
                            self.parts_lent += 1
                            spent[0] += time.perf_counter() - start
            finally:
                self._return()

        futures = [self._threads.submit(lend) for _ in range(helpers)]
        failure = None
        try:
            while (i := next_part()) is not None:
                results[i] = fn(items[i])
        except BaseException as exc:  # noqa: BLE001 - re-raised once the lent lanes are back
            failure = exc
            with take_lock:
                taken = iter(())  # the lent lanes stop after their part
        for f in futures:
            try:
                f.result()
            except BaseException as exc:  # noqa: BLE001
                failure = failure or exc
        self._local.seconds = getattr(self._local, "seconds", 0.0) + spent[0]
        if failure is not None:
            raise failure
        return results

    def close(self) -> None:
        """Nothing lent from now on; a part being computed finishes on its own."""
        with self._lock:
            self._closed = True
        if self._threads is not None:
            self._threads.shutdown(wait=False)
