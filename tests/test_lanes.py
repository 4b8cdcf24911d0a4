"""Idle lanes lending a hand (instructrec.lanes): a request's passes and head blocks computed
partly by idle lanes give bit for bit the scores computed alone; only idle lanes are lent, a lent
lane stops when a batch waits, a failing part fails the call with every lent lane back, and
the caller's inference mode holds in the lent lanes."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from instructrec.lanes import LanePool
from instructrec.modeling import TINY_PREFIX, load_model
from instructrec.ranker import Ranker
from tests.service_fixtures import varied_request

torch.set_num_threads(1)


def _requests(n: int, candidates: int) -> list[tuple[str, list[str]]]:
    return [(" ".join(r["history"]) + " " + r["instruction"], r["candidates"])
            for r in (varied_request(k, candidates) for k in range(n))]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lent_lanes_give_the_scores_computed_alone(dtype, monkeypatch):
    """Small passes and vocabulary blocks (so a request has many parts): scored with a pool of
    two and of three lanes, every score equals the one computed without help, bit for bit, and
    the lent lanes did compute parts."""
    import instructrec.ranker as ranker_module

    monkeypatch.setattr(ranker_module, "VOCAB_BLOCK_COLUMNS", 64)
    ranker = Ranker(load_model(TINY_PREFIX, device="cpu", dtype=dtype), batch_tokens=64)
    requests = _requests(6, 40)
    alone = [ranker.score(s, c).scores for s, c in requests]
    for lanes in (2, 3):
        ranker.pool = pool = LanePool(lanes)
        try:
            for _ in range(2):
                assert [ranker.score(s, c).scores for s, c in requests] == alone
            assert pool.parts_lent > 0 and pool.lent == 0
        finally:
            pool.close()


def _slow(seconds: float, seen: list, lock: threading.Lock, running: list):
    def part(x):
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
            seen.append((x, threading.current_thread().name))
        time.sleep(seconds)
        with lock:
            running[0] -= 1
        return x * x

    return part


def test_only_idle_lanes_are_lent():
    """Three lanes: with every lane scoring a batch (the caller's among them) nothing is lent;
    with one idle, one is, so never more than two parts at once; results in order either way."""
    pool = LanePool(3)
    lock, seen, running = threading.Lock(), [], [0, 0]
    try:
        for _ in range(3):
            pool.take()
        assert pool.map(_slow(0.02, seen, lock, running), range(6)) == [x * x for x in range(6)]
        assert running[1] == 1 and pool.parts_lent == 0
        pool.give()
        assert pool.map(_slow(0.05, seen, lock, running), range(8)) == [x * x for x in range(8)]
        assert running[1] == 2 and pool.parts_lent > 0 and pool.lent == 0
    finally:
        pool.close()


def test_a_lent_lane_comes_back_when_a_batch_waits():
    """The batcher signals demand while a lent lane computes: it finishes its part and takes no
    more; the caller does the rest, and the lane is returned (on_return called) at once."""
    pool = LanePool(2)
    waiting = threading.Event()
    returned = []
    pool.demand = waiting.is_set
    pool.on_return = lambda: returned.append(time.monotonic())
    lock, seen, running = threading.Lock(), [], [0, 0]
    part = _slow(0.05, seen, lock, running)

    def signalling(x):
        if x == 2:
            waiting.set()
        return part(x)

    try:
        start = time.monotonic()
        assert pool.map(signalling, range(12)) == [x * x for x in range(12)]
        lent_parts = [x for x, name in seen if name.startswith("instructrec-lend")]
        assert 1 <= len(lent_parts) <= 3  # it stopped after the part it held when demand came
        assert returned and returned[0] - start < 0.3  # back long before the call's end (12 x 0.05 / 1)
        assert pool.lent == 0
        assert pool.map(part, range(4)) == [0, 1, 4, 9]  # demand still set: nothing lent
        assert all(not name.startswith("instructrec-lend") for _, name in seen[-4:])
    finally:
        pool.close()


def test_a_failing_part_fails_the_call_with_every_lane_back():
    pool = LanePool(2)

    def part(x):
        time.sleep(0.01)
        if x == 5:
            raise ValueError("part 5 failed")
        return x

    try:
        with pytest.raises(ValueError, match="part 5 failed"):
            pool.map(part, range(10))
        assert pool.lent == 0
        assert pool.map(lambda x: x + 1, range(3)) == [1, 2, 3]
    finally:
        pool.close()


def test_a_closed_pool_lends_nothing_and_a_closed_loop_fails_no_request():
    """After close (the service stopping) a call runs every part itself; a lane returned after
    the batcher's loop has closed (on_return raising RuntimeError) does not fail the request."""
    pool = LanePool(2)

    def closed_loop():
        raise RuntimeError("Event loop is closed")

    pool.on_return = closed_loop
    slow = lambda x: time.sleep(0.01) or x  # noqa: E731
    assert pool.map(slow, range(6)) == list(range(6)) and pool.parts_lent > 0 and pool.lent == 0
    pool.close()
    lent = pool.parts_lent
    assert pool.map(slow, range(6)) == list(range(6)) and pool.parts_lent == lent


def test_lent_lanes_run_in_the_callers_modes():
    """torch's grad and inference modes are per thread: a lent lane takes the caller's."""
    pool = LanePool(2)

    def modes(_):
        time.sleep(0.01)
        return torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    try:
        with torch.inference_mode():
            assert set(pool.map(modes, range(8))) == {(True, False)}
        with torch.no_grad():
            assert set(pool.map(modes, range(8))) == {(False, False)}
        assert set(pool.map(modes, range(8))) == {(False, True)}
        assert pool.parts_lent > 0
    finally:
        pool.close()


def test_position_parts_cover_the_instruction_in_order():
    from instructrec.prefixlm import PART_POSITIONS, position_parts

    for width in range(16, 513, 16):
        parts = position_parts(width)
        assert parts[0].start == 0 and parts[-1].stop == width
        assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
        assert all(p.stop - p.start <= PART_POSITIONS and p.start % 16 == 0 for p in parts)
        assert len(parts) == -(-width // PART_POSITIONS)  # the fewest parts


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_instruction_read_in_parts_by_lent_lanes_is_read_as_alone(dtype):
    """The instruction's pass in position parts: on two lanes bit for bit what one thread computes,
    and the states of reading it whole (up to rounding)."""
    from instructrec import prefixlm
    from instructrec.lanes import alone

    loaded = load_model(TINY_PREFIX, device="cpu", dtype=dtype)
    bert = loaded.model.bert
    ids = torch.randint(5, loaded.tokenizer.vocab_size, (1, 160), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 150:] = 0  # padding, as the ranker pads to 16
    assert len(prefixlm.position_parts(ids.shape[1])) == 2
    with torch.inference_mode():
        whole_x, whole = prefixlm.read_instruction(bert, ids, mask)
        one_x, one = prefixlm.read_instruction(bert, ids, mask, map_parts=alone)
        pool = LanePool(2)
        try:
            for _ in range(10):
                lent_x, lent = prefixlm.read_instruction(bert, ids, mask, map_parts=pool.map)
                assert torch.equal(lent_x, one_x)
                assert all(torch.equal(a, b) for (ka, va), (kb, vb) in zip(lent, one) for a, b in ((ka, kb), (va, vb)))
            assert pool.parts_lent > 0 and pool.lent == 0
        finally:
            pool.close()
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert torch.allclose(one_x[0, :150].float(), whole_x[0, :150].float(), atol=tol)
    assert all(torch.allclose(a.float(), b.float(), atol=tol) for (ka, va), (kb, vb) in zip(one, whole)
               for a, b in ((ka, kb), (va, vb)))
