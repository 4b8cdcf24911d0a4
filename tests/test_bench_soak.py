"""``instructrec bench soak`` end to end on a tiny model: a private Redis and the service in a
child process, a short load with Redis stopped and restarted and a burst, every answer checked;
and the checker itself catches a reordered or drifted answer."""

from __future__ import annotations

import json

import pytest

from instructrec.bench import report
from instructrec.bench.soak import compare, passed
from instructrec.cli import main
from instructrec.service.loopback import RedisServer
from tests.service_fixtures import tiny_checkpoints


def test_compare_catches_order_and_score_drift():
    ref = [(2, -1.0), (0, -1.5), (1, -3.0)]
    assert compare(ref, [(2, -1.0 + 5e-5), (0, -1.5), (1, -3.0)]) is None
    assert "order" in compare(ref, [(0, -1.5), (2, -1.0), (1, -3.0)])
    assert "differs by" in compare(ref, [(2, -1.0), (0, -1.5), (1, -3.01)])


def test_verdict_needs_every_check():
    good = {"lost": 0, "not_sent": 0, "wrong": 0, "refused_without_retry_after": 0, "unexpected_status": 0,
            "cache_errors_while_redis_up": 0}
    assert passed(good)
    for key in good:
        assert not passed({**good, key: 1}), key


@pytest.mark.skipif(RedisServer.binary is None, reason="redis-server binary not installed")
def test_soak_end_to_end(tmp_path):
    rc = main(["bench", "soak", "--model", "tiny-random-prefixlm", "--clients", "8", "--requests", "80",
               "--distinct", "12", "--candidates", "6", "--burst", "12", "--threads", "1",
               "--set", "max_queue_wait_ms=30000", "--dataset", "games-sample", "--out", str(tmp_path)])
    s = json.loads((tmp_path / report.RESULTS_JSON).read_text())["soak"]
    assert rc == 0 and s["passed"], json.dumps(s)  # the whole summary when it fails (pytest cuts a dict short)
    assert s["planned"] == 80 + 12 and s["sent"] == 92 and s["lost"] == s["not_sent"] == 0 and s["wrong"] == 0
    assert sum(s["outcomes"].values()) == 92 and s["answered"] > 0
    assert [e["event"] for e in s["fault_events"]] == ["before_stop", "redis_stopped", "before_start",
                                                        "redis_started", "burst"]
    assert s["cache_errors_while_redis_up"] == 0
    hits = [w["hit_ratio"] for w in s["hit_ratio_windows"] if w["hit_ratio"] is not None]
    assert hits and max(hits) > 0  # repeated requests were served from the cache
    assert s["config"]["settings"]["redis_url"].startswith("redis://127.0.0.1:")  # its own Redis
    md = (tmp_path / report.RESULTS_MD).read_text()
    assert "## Soak" in md and "| wrong answers | 0 |" in md
    readme = tmp_path / "README.md"
    start, end = report.speed_markers("no-bf16")
    readme.write_text(f"a\n{start}\n{end}\nb\n{report.SOAK_START}\nold\n{report.SOAK_END}\nc\n")
    report.update_readme(readme, {"soak": s})
    text = readme.read_text()
    soak_block = text.split(report.SOAK_START)[1].split(report.SOAK_END)[0]
    assert "old" not in soak_block and "| wrong answers | 0 |" in soak_block and "instructrec bench soak" in soak_block
    assert text.endswith("\nc\n")


def test_soak_refuses_the_redis_fault_on_a_service_it_did_not_start(tmp_path, capsys):
    rc = main(["bench", "soak", "--url", "http://127.0.0.1:9", "--faults", "redis", "--out", str(tmp_path)])
    assert rc == 2
    assert "does not own" in capsys.readouterr().err


@pytest.mark.skipif(RedisServer.binary is None, reason="redis-server binary not installed")
def test_soak_with_a_model_swap_midway(tmp_path):
    """The swap fault: 50 clients, the service swapped to a second checkpoint (another seed,
    another version) at 50%, refused requests sent again after their Retry-After: every request
    answered, nothing lost or wrong, every answer names one of the two versions and equals that
    version's answer alone, and both versions answered."""
    from instructrec.checkpoint import checkpoint_version

    paths = tiny_checkpoints(tmp_path, (21, 22))
    out = tmp_path / "out"
    rc = main(["bench", "soak", "--model", str(paths[0]), "--swap-model", str(paths[1]), "--faults", "swap", "--resend",
               "--clients", "50", "--requests", "400", "--distinct", "12", "--candidates", "6", "--threads", "1",
               "--dataset", "games-sample", "--out", str(out),
               # loading a model holds the GIL in bursts: on a machine running other jobs too, a Redis reply
               # may then wait past the 100 ms default (an uncached answer, counted as a cache error)
               "--set", "cache_timeout_ms=2000"])
    s = json.loads((out / report.RESULTS_JSON).read_text())["soak"]
    assert rc == 0 and s["passed"], json.dumps(s)  # the whole summary when it fails (pytest cuts a dict short)
    assert s["lost"] == s["not_sent"] == s["wrong"] == s["unexpected_status"] == 0
    assert s["refused_without_retry_after"] == 0
    assert s["answered"] == s["planned"] == 400 and s["unanswered_after_resend"] == 0  # refusals sent again, answered
    versions = {checkpoint_version(p) for p in paths}
    assert s["swap"]["status"] == 200 and (s["swap"]["from"], s["swap"]["to"]) == tuple(checkpoint_version(p) for p in paths)
    assert set(s["versions"]) == versions and sum(s["versions"].values()) == s["answered"]
    assert [e["event"] for e in s["fault_events"]] == ["swap_started", "swapped"]
    md = (out / report.RESULTS_MD).read_text()
    assert "answers by checkpoint version" in md and "| wrong answers | 0 |" in md


def test_the_swap_fault_needs_the_second_model(tmp_path, capsys):
    rc = main(["bench", "soak", "--model", "tiny-random-prefixlm", "--faults", "swap", "--out", str(tmp_path)])
    assert rc == 2
    assert "--swap-model" in capsys.readouterr().err
