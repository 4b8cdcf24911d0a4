"""Serving memory: decoder passes mixing several requests copy keys/values per row only within
``mixed_kv_bytes``; beyond it each request's rows share their keys/values as views. The warm-up
runs the largest such mixed batch the settings allow."""

from __future__ import annotations

import pytest
import torch

from instructrec.modeling import TINY, TINY_FLAN_T5, load_model
from instructrec.ranker import GATHER_PROFILE_LABEL, Ranker

torch.set_num_threads(1)

WORDS = "legend zelda mario kart halo doom quest star wars edition remastered deluxe racing puzzle".split()
SOURCES = [f"A user played {' '.join(WORDS[i:i + 5])} and asks for something like it. Pick one." for i in range(5)]


def _requests(n_cands: int = 12):
    return [(src, [" ".join(WORDS[(r + j) % 14:(r + j) % 14 + 1 + j % 3]) or "x" for j in range(n_cands)])
            for r, src in enumerate(SOURCES)]


@pytest.fixture(scope="module", params=[TINY, TINY_FLAN_T5])
def loaded(request):
    return load_model(request.param, device="cpu", dtype="float32")


def _gathers(ranker: Ranker, requests) -> tuple[list[list[float]], list[int]]:
    """Scores, and the bytes each decoder pass copied per row (the profiler's record of the
    ranker's gathers: per pass, the encoder states, mask and every layer's keys/values)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        scores = [s.scores for s in ranker.score_many(requests)]
    events = sorted((e for e in prof.events() if e.name == GATHER_PROFILE_LABEL), key=lambda e: e.time_range.start)
    cfg = ranker.model.config
    layers = getattr(cfg, "num_decoder_layers", None) or cfg.decoder.num_hidden_layers
    per_pass = 2 + 4 * layers  # encoder states, mask, self- and cross-attention keys and values
    assert len(events) % per_pass == 0
    return scores, [sum(e.cpu_memory_usage for e in events[a:a + per_pass]) for a in range(0, len(events), per_pass)]


def test_mixed_passes_copy_within_the_allowance_and_score_the_same(loaded):
    requests = _requests()
    reference = [Ranker(loaded).score(src, cands, naive=True).scores for src, cands in requests]
    row_bytes = Ranker(loaded).kv_row_bytes(max(len(Ranker(loaded).source_ids(s)[0]) for s, _ in requests))
    assert row_bytes > 0
    for allowance_rows in (None, 0, 7):
        allowance = 2**40 if allowance_rows is None else allowance_rows * row_bytes
        ranker = Ranker(loaded, batch_tokens=256, mixed_kv_bytes=allowance, batch_invariant=False)
        scores, gathers = _gathers(ranker, requests)
        for got, want in zip(scores, reference):
            assert got == pytest.approx(want, abs=1e-4)
        if allowance_rows == 0:
            assert gathers == []  # every pass holds one request's rows: views, no copies
        else:
            assert gathers  # rows of several requests shared passes
            assert max(gathers) <= min(allowance, 60 * row_bytes)  # 60 rows in all
            if allowance_rows == 7:
                assert max(gathers) > 2 * row_bytes  # still mixing small requests


def test_split_keeps_requests_together_and_bounds_mixed_rows(loaded):
    ranker = Ranker(loaded, mixed_kv_bytes=10 * 100)  # 10 rows of 100 bytes
    owners = [0] * 4 + [1] * 4 + [2] * 30 + [3] * 3
    parts = ranker.split_mixed(list(range(len(owners))), owners, row_bytes=100)
    assert sorted(i for p in parts for i in p) == list(range(len(owners)))
    for part in parts:
        mixed = len({owners[i] for i in part}) > 1
        assert not mixed or len(part) * 100 <= 10 * 100
        assert all(set(i for i in range(len(owners)) if owners[i] == owners[j]) <= set(part) for j in part)
    assert any(len({owners[i] for i in p}) > 1 for p in parts)  # small requests still share passes
    assert ranker.split_mixed([0, 1], [0, 1], row_bytes=0) == [[0, 1]]
    with pytest.raises(ValueError, match="mixed_kv_bytes"):
        Ranker(loaded, mixed_kv_bytes=-1)


def test_warm_up_runs_the_largest_mixed_batch(loaded):
    from instructrec.service.engine import Engine, ranker_settings
    from instructrec.service.settings import Settings

    for mb in (0.25, 1.0, 0.0):
        settings = Settings(model="x", device="cpu", dtype="float32", redis_url="", batch_tokens=512, max_batch_requests=8,
                            mixed_kv_mb=mb, max_source_tokens=64, max_target_tokens=16,
                            batch_invariant=False)
        engine = Engine(Ranker(loaded, **ranker_settings(settings)), settings)
        src, _ = engine.warm_up()
        mixed = engine.warmup_report["mixed"]
        allowance, row = int(mb * 2**20), mixed["row_bytes"]
        assert row == engine.ranker.kv_row_bytes(src) > 0
        counts = mixed["candidates"]
        assert len(counts) == mixed["requests"] >= 2 and max(counts) >= 2  # several requests, the shared path
        assert sum(counts) * (mixed["row_tokens"] - 1) <= 512  # one pass within the token budget
        assert mixed["mixed_copy_bytes"] <= allowance
        if allowance // row >= 3:  # the copies reach the allowance unless the token budget stops them first
            assert mixed["mixed_copy_bytes"] > allowance - row or sum(counts) * mixed["row_tokens"] > 512
        # the same batch, profiled: the passes copy what the report says
        source = " ".join(["word"] * 200)
        text = " ".join(["item"] * (mixed["row_tokens"] - 1))
        _, gathers = _gathers(engine.ranker, [(source, [text] * n) for n in counts])
        assert max(gathers, default=0) == pytest.approx(mixed["mixed_copy_bytes"], rel=0.02)


def test_warm_up_runs_the_mixed_batch_for_the_prefix_lm():
    """The default's shape warms up its worst mixed batch too, within the copy allowance."""
    from instructrec.modeling import TINY_PREFIX
    from instructrec.service.engine import Engine, ranker_settings
    from instructrec.service.settings import Settings

    loaded = load_model(TINY_PREFIX, device="cpu", dtype="float32")
    settings = Settings(model="x", device="cpu", dtype="float32", redis_url="", batch_tokens=512, max_batch_requests=8,
                        mixed_kv_mb=0.25, max_source_tokens=64, max_target_tokens=16, batch_invariant=False)
    engine = Engine(Ranker(loaded, **ranker_settings(settings)), settings)
    src, _ = engine.warm_up()
    mixed = engine.warmup_report["mixed"]
    assert mixed["row_bytes"] == engine.ranker.kv_row_bytes(src) > 0
    assert len(mixed["candidates"]) == mixed["requests"] >= 2
    assert 0 < mixed["mixed_copy_bytes"] <= int(0.25 * 2**20)
