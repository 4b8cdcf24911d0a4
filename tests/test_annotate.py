"""The annotation step: teachers, the resumable pipeline, stats and the CLI.

The OpenAI-compatible teacher is tested against a real HTTP server on 127.0.0.1
(a ThreadingHTTPServer in a background thread), not a mocked client.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from instructrec.service.loopback import free_port
from instructrec.training.annotate.offline import OfflineTeacher
from instructrec.training.annotate.openai_teacher import OpenAITeacher
from instructrec.training.annotate.pipeline import (
    Annotation,
    annotate_cases,
    annotation_stats,
    format_stats_table,
    load_annotations,
)
from instructrec.training.annotate.teachers import (
    AnnotationRequest,
    Kind,
    Teacher,
    TeacherError,
    platform_of,
    specific_facets,
)
from instructrec.training.data.types import DataError, Interaction, InteractionData, Item

# ---------------------------------------------------------------------------- fake LLM server


def answer_for(prompt: str) -> str:
    return "I want " + hashlib.sha1(prompt.encode()).hexdigest()[:10] + "."


class FakeLLM:
    """State shared with the handler threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        with self.lock:
            self.calls = 0  # every POST
            self.answered: list[str] = []  # user prompts answered with 200
            self.fail_first = 0  # answer the first N POSTs with fail_status
            self.fail_status = 500
            self.retry_after: str | None = None
            self.fail_after: int | None = None  # after this many 200s, answer 400 forever
            self.delay = 0.0
            self.in_flight = 0
            self.max_in_flight = 0
            self.auth: list[str | None] = []

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        if handler.path != "/v1/chat/completions":
            self._send(handler, 404, {"error": "not found"})
            return
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        with self.lock:
            self.calls += 1
            self.auth.append(handler.headers.get("Authorization"))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if self.fail_first > 0:
                self.fail_first -= 1
                status = self.fail_status
            elif self.fail_after is not None and len(self.answered) >= self.fail_after:
                status = 400
            else:
                status = 200
                self.answered.append(prompt)
        try:
            if self.delay:
                time.sleep(self.delay)
            if status == 200:
                content = "  " + answer_for(prompt) + "\n"
                self._send(handler, 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})
            else:
                headers = {"Retry-After": self.retry_after} if status == 429 and self.retry_after else {}
                self._send(handler, status, {"error": {"message": f"synthetic {status}", "model": body.get("model")}}, headers)
        finally:
            with self.lock:
                self.in_flight -= 1

    @staticmethod
    def _send(handler, status, obj, headers=None):
        data = json.dumps(obj).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(data)


@pytest.fixture
def llm():
    state = FakeLLM()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            state.handle(self)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def req(kind=Kind.VAGUE, title="Halo 3 - Xbox 360", history=("Gears of War - Xbox 360",), user="u", target="t", **kw):
    return AnnotationRequest(kind, user, target, tuple(history), title, **kw)


async def run_teacher(teacher: OpenAITeacher, requests):
    async with teacher:
        return await asyncio.gather(*(teacher.annotate(r) for r in requests))


# ---------------------------------------------------------------------------- OpenAI teacher


def test_openai_teacher_gets_answers(llm):
    teacher = OpenAITeacher(llm.url, "tiny-model", api_key="sekrit")
    assert teacher.name == "openai:tiny-model"
    requests = [req(Kind.PREFERENCE), req(Kind.VAGUE, target_review="My son loves it."), req(Kind.SPECIFIC)]
    answers = asyncio.run(run_teacher(teacher, requests))
    assert llm.calls == 3
    # stripped content, derived from the prompt the server saw
    assert sorted(answers) == sorted(answer_for(p) for p in llm.answered)
    assert all(a == a.strip() for a in answers)
    assert llm.auth == ["Bearer sekrit"] * 3
    # prompts: preference lists the history; intentions must not ask to name the item
    prefs = [p for p in llm.answered if "Gears of War - Xbox 360" in p]
    assert prefs and "oldest first" in prefs[0]
    assert any("Xbox 360" in p and "search" in p for p in llm.answered)


def test_openai_teacher_specific_without_facets_asks_nothing(llm):
    teacher = OpenAITeacher(llm.url, "m")
    assert asyncio.run(run_teacher(teacher, [req(Kind.SPECIFIC, title="Tetris")])) == [None]
    assert llm.calls == 0


def test_openai_teacher_retries_429_honouring_retry_after(llm):
    llm.fail_first, llm.fail_status, llm.retry_after = 2, 429, "0.2"
    # a backoff of 30 s would make the test hang if Retry-After were ignored
    teacher = OpenAITeacher(llm.url, "m", retries=4, backoff=30.0)
    start = time.monotonic()
    [answer] = asyncio.run(run_teacher(teacher, [req()]))
    elapsed = time.monotonic() - start
    assert answer == answer_for(llm.answered[0])
    assert llm.calls == 3
    assert 0.35 <= elapsed < 5


def test_openai_teacher_retries_500_then_succeeds(llm):
    llm.fail_first, llm.fail_status = 2, 500
    teacher = OpenAITeacher(llm.url, "m", retries=3, backoff=0.01)
    [answer] = asyncio.run(run_teacher(teacher, [req()]))
    assert answer is not None and llm.calls == 3 and teacher.attempts == 3


def test_openai_teacher_gives_up_after_retries(llm):
    llm.fail_first, llm.fail_status = 100, 503
    teacher = OpenAITeacher(llm.url, "m", retries=2, backoff=0.01)
    with pytest.raises(TeacherError) as e:
        asyncio.run(run_teacher(teacher, [req()]))
    assert llm.calls == 3
    assert e.value.status == 503 and "3 attempts" in str(e.value)


def test_openai_teacher_400_is_not_retried(llm):
    llm.fail_first, llm.fail_status = 1, 400
    teacher = OpenAITeacher(llm.url, "no-such-model", retries=4, backoff=0.01)
    with pytest.raises(TeacherError) as e:
        asyncio.run(run_teacher(teacher, [req()]))
    assert llm.calls == 1
    assert e.value.status == 400
    assert "400" in str(e.value) and "synthetic 400" in str(e.value) and "no-such-model" in e.value.body


def test_openai_teacher_connection_refused_is_retried_then_fails():
    teacher = OpenAITeacher(f"http://127.0.0.1:{free_port()}/v1", "m", retries=1, backoff=0.01)
    with pytest.raises(TeacherError, match="ConnectError"):
        asyncio.run(run_teacher(teacher, [req()]))
    assert teacher.attempts == 2


def test_openai_teacher_timeout(llm):
    llm.delay = 0.6
    teacher = OpenAITeacher(llm.url, "m", timeout=0.1, retries=0)
    with pytest.raises(TeacherError, match="Timeout"):
        asyncio.run(run_teacher(teacher, [req()]))


def test_openai_teacher_concurrency_bound(llm):
    llm.delay = 0.08
    teacher = OpenAITeacher(llm.url, "m", max_concurrency=3)
    requests = [req(Kind.VAGUE, title=f"Game {i} - PC") for i in range(12)]
    answers = asyncio.run(run_teacher(teacher, requests))
    assert all(answers) and llm.calls == 12
    assert 2 <= llm.max_in_flight <= 3


# ---------------------------------------------------------------------------- pipeline


def make_data(n_users=4, seq_len=5, review=True) -> InteractionData:
    items, seqs = {}, {}
    platforms = ["PC", "Xbox 360", "Nintendo DS", "PlayStation 2"]
    for u in range(n_users):
        seq = []
        for j in range(seq_len):
            iid = f"i{u}_{j}"
            items[iid] = Item(iid, f"Quest Saga {u}{j} Chronicles - {platforms[(u + j) % 4]}")
            seq.append(Interaction(iid, review=f"My son loves chapter {u}{j}. Great fun." if review else ""))
        seqs[f"u{u}"] = seq
    return InteractionData("Tiny", items, seqs, source="memory")


def test_pipeline_resume_asks_nothing_twice(llm, tmp_path):
    data = make_data()
    cases = data.split().train  # 4 users x 2 training cases
    kinds = [Kind.PREFERENCE, Kind.VAGUE]
    n = len(cases) * len(kinds)
    cache = tmp_path / "ann.jsonl"

    llm.fail_after = 5  # the server breaks for good after 5 answers
    teacher = OpenAITeacher(llm.url, "m", max_concurrency=3, retries=0)

    async def go(t):
        async with t:
            return await annotate_cases(data, cases, t, kinds, cache, progress=False)

    with pytest.raises(TeacherError):
        asyncio.run(go(teacher))
    first = list(llm.answered)
    assert len(first) == 5
    lines = [json.loads(x) for x in cache.read_text().splitlines()]
    assert len(lines) == 5  # every answer the server gave was recorded before the error surfaced

    llm.reset()
    annotations = asyncio.run(go(OpenAITeacher(llm.url, "m", max_concurrency=3)))
    second = list(llm.answered)
    assert llm.calls == n - 5
    assert not set(first) & set(second)  # nothing asked twice
    assert len(set(first) | set(second)) == n
    lines = [json.loads(x) for x in cache.read_text().splitlines()]
    assert len(lines) == n and len({x["key"] for x in lines}) == n
    assert {x["teacher"] for x in lines} == {"openai:m"}
    assert len(annotations) == n and all(a.text for a in annotations)

    # a third run is fully cached
    llm.reset()
    again = asyncio.run(go(OpenAITeacher(llm.url, "m")))
    assert llm.calls == 0
    assert [a.text for a in again] == [a.text for a in annotations]
    loaded = load_annotations(cache)
    assert len(loaded) == n
    case = cases[0]
    assert loaded[(case.user_id, case.target, Kind.VAGUE)].text == annotations[1].text


class CountingTeacher:
    """An in-process teacher that records what it was asked (for the pipeline's bookkeeping)."""

    name = "counting"
    max_concurrency = 2

    def __init__(self):
        self.asked: list[str] = []

    async def annotate(self, request):
        self.asked.append(request.key())
        await asyncio.sleep(0)
        return None if request.kind is Kind.SPECIFIC else f"{request.kind.value} for {request.target_title}"


def test_pipeline_shares_answers_between_identical_requests(tmp_path):
    # two users with the same target item and no review: one vague-intention question
    items = {i: Item(i, f"Title {i} - PC") for i in "abcd"}
    seqs = {"u1": [Interaction(i) for i in "abc"], "u2": [Interaction(i) for i in "dbc"]}
    data = InteractionData("T", items, seqs)
    cases = data.split().test  # both target "c"
    teacher = CountingTeacher()
    assert isinstance(teacher, Teacher)
    anns = asyncio.run(annotate_cases(data, cases, teacher, [Kind.VAGUE, Kind.SPECIFIC], tmp_path / "c.jsonl", progress=False))
    assert len(teacher.asked) == 2  # one vague + one specific, shared by both users
    assert [a.text is None for a in anns] == [False, True, False, True]
    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    assert len(lines) == 4 and sum(json.loads(x)["text"] is None for x in lines) == 2
    loaded = load_annotations(tmp_path / "c.jsonl")
    assert set(loaded) == {("u1", "c", Kind.VAGUE), ("u2", "c", Kind.VAGUE)}
    assert len(load_annotations(tmp_path / "c.jsonl", include_none=True)) == 4


def test_pipeline_other_teacher_is_not_reused(tmp_path):
    data = make_data(n_users=1)
    cases = data.split().train
    cache = tmp_path / "c.jsonl"
    asyncio.run(annotate_cases(data, cases, OfflineTeacher(), [Kind.PREFERENCE], cache, progress=False))
    t = CountingTeacher()
    asyncio.run(annotate_cases(data, cases, t, [Kind.PREFERENCE], cache, progress=False))
    assert len(t.asked) == len(cases)
    assert len(load_annotations(cache, teacher="counting")) == len(cases)


def test_truncated_last_cache_line_is_tolerated(tmp_path, caplog):
    data = make_data(n_users=2)
    cases = data.split().train
    cache = tmp_path / "ann.jsonl"
    teacher = OfflineTeacher()
    first = asyncio.run(annotate_cases(data, cases[:1], teacher, [Kind.PREFERENCE, Kind.VAGUE], cache, progress=False))
    good = cache.read_text()
    cache.write_text(good + '{"key": "abc", "kind": "preference", "user_id": "u', encoding="utf-8")  # killed mid-write

    with caplog.at_level(logging.WARNING):
        assert len(load_annotations(cache)) == 2
    assert "truncated" in caplog.text

    counting = CountingTeacher()
    counting.name = teacher.name  # same teacher identity: the 2 cached answers must be reused
    anns = asyncio.run(annotate_cases(data, cases, counting, [Kind.PREFERENCE, Kind.VAGUE], cache, progress=False))
    assert len(counting.asked) == 2 * len(cases) - 2
    assert [a.text for a in anns[:2]] == [a.text for a in first]
    lines = cache.read_text().splitlines()
    assert all(json.loads(x) for x in lines)  # every line parses; the partial one is gone
    assert len(lines) == 2 * len(cases)


def test_corrupt_middle_line_is_a_data_error(tmp_path):
    cache = tmp_path / "ann.jsonl"
    cache.write_text('not json\n{"key": "k", "kind": "preference", "user_id": "u", "target": "t", "teacher": "x", "text": "hi"}\n')
    with pytest.raises(DataError, match=r"ann.jsonl:1"):
        load_annotations(cache)


def test_unknown_item_is_a_data_error(tmp_path):
    data = make_data(n_users=1)
    case = data.split().train[0]
    del data.items[case.target]
    with pytest.raises(DataError, match="unknown item"):
        asyncio.run(annotate_cases(data, [case], OfflineTeacher(), [Kind.VAGUE], tmp_path / "c.jsonl", progress=False))


# ---------------------------------------------------------------------------- offline teacher


def offline(request, seed=0, phrasing="in-family"):
    return asyncio.run(OfflineTeacher(seed, phrasing).annotate(request))


GAMES = [
    "Gran Turismo 4 - PlayStation 2", "Need for Speed Underground - PlayStation 2", "Tekken 5 - PlayStation 2",
    "Halo 3 - Xbox 360", "Gears of War 2 - Xbox 360", "Resident Evil 4 - GameCube", "Resident Evil 5 - Playstation 3",
    "Mario Kart DS - Nintendo DS", "New Super Mario Bros. - Nintendo DS", "Civilization IV - PC", "The Sims 3 - PC",
    "Madden NFL 17 - Standard Edition - Xbox One", "Xbox 360 Wireless Controller - Black", "Tetris",
    "Final Fantasy X - PlayStation 2", "Kingdom Hearts II - PlayStation 2", "Fire Emblem: The Sacred Stones",
    "Guitar Hero III: Legends of Rock - Nintendo Wii", "Super Smash Bros. Brawl", "Watch Dogs 2 - PlayStation 4",
]


def many_requests(kind, n=60, **kw):
    out = []
    for i in range(n):
        hist = tuple(GAMES[(i + j * 7) % len(GAMES)] for j in range(2 + i % 5))
        target = GAMES[(i * 3 + 1) % len(GAMES)]
        out.append(AnnotationRequest(kind, f"u{i}", f"t{i}", hist, target, **kw))
    return out


def test_offline_teacher_is_deterministic():
    t = OfflineTeacher()
    assert t.name == "offline-v2"  # writes with the training families (test_phrasing.py checks the split)
    for kind in Kind:
        for r in many_requests(kind, 20):
            a = offline(r)
            assert a == offline(r) == asyncio.run(OfflineTeacher(0).annotate(r))
    # another seed varies the phrasing of at least some answers
    reqs = many_requests(Kind.PREFERENCE, 30)
    assert any(offline(r, 0) != offline(r, 7) for r in reqs)
    assert OfflineTeacher(7).name != OfflineTeacher(0).name


@pytest.mark.parametrize("kind", list(Kind))
def test_offline_teacher_is_varied(kind):
    for phrasing, distinct in (("all", 15), ("in-family", 12), ("held-out", 10)):
        answers = [a for a in (offline(r, phrasing=phrasing) for r in many_requests(kind, 80)) if a]
        assert len(answers) >= 30
        openings = {" ".join(a.split()[:2]) for a in answers}
        assert len(openings) >= 4, (phrasing, openings)
        assert len(set(answers)) >= distinct, phrasing


def test_offline_preference_uses_history():
    r = req(Kind.PREFERENCE, history=("Gran Turismo 4 - PlayStation 2", "Need for Speed Underground - PlayStation 2",
                                      "Burnout 3: Takedown - PlayStation 2"))
    texts = [offline(r, seed) for seed in range(6)]
    assert all(texts)
    assert any("PlayStation 2" in t for t in texts)
    assert any("racing" in t for t in texts)
    assert offline(req(Kind.PREFERENCE, history=())) is None
    # genres from categories when the data has them (ml-100k)
    movies = req(Kind.PREFERENCE, history=("Toy Story (1995)", "Babe (1995)", "Heat (1995)"),
                 history_categories=(("Animation", "Comedy"), ("Comedy", "Drama"), ("Action", "Thriller")))
    assert "comedy" in offline(movies).lower()


def test_offline_vague_intention_never_leaks_the_title():
    reqs = many_requests(Kind.VAGUE, 60)
    for i, r in enumerate(list(reqs)):
        core = r.target_title.rsplit(" - ", 1)[0]
        reqs.append(AnnotationRequest(Kind.VAGUE, r.user_id, r.target, r.history_titles, r.target_title,
                                      target_review=f"I bought {r.target_title} for my daughter. {core} is fun and she plays daily."))
        reqs.append(AnnotationRequest(Kind.VAGUE, r.user_id, r.target, r.history_titles, r.target_title,
                                      target_description=f"{core} takes the series to new heights with {i} new modes."))
    answered = 0
    for r in reqs:
        text = offline(r)
        if text is None:
            continue
        answered += 1
        core = r.target_title.rsplit(" - ", 1)[0]
        assert r.target_title.lower() not in text.lower()
        assert core.lower() not in text.lower(), (core, text)
    assert answered >= 150
    from_review = offline(AnnotationRequest(Kind.VAGUE, "u", "t", (), "Mario Kart DS - Nintendo DS",
                                            target_review="My son loves Mario Kart DS. He plays it every day."))
    assert "son" in from_review and "Mario Kart" not in from_review
    # nothing to go on: a one-word title, no review, description or categories
    assert offline(AnnotationRequest(Kind.VAGUE, "u", "t", (), "Zork")) is None


def test_offline_specific_intention():
    for seed in range(5):
        text = offline(req(Kind.SPECIFIC, title="Foo - Nintendo DS"), seed)
        assert ("Nintendo DS" in text or " DS" in text) and "Foo" not in text  # or its short alias
    assert offline(req(Kind.SPECIFIC, title="Foo")) is None
    assert offline(req(Kind.SPECIFIC, title="Spider-Man")) is None
    movie = offline(req(Kind.SPECIFIC, title="Toy Story (1995)", target_categories=("Animation", "Comedy")))
    assert "Comedy" in movie or "Animation" in movie


# ---------------------------------------------------------------------------- platforms


@pytest.mark.parametrize(
    "title, platform",
    [
        ("Halo 3 - Xbox 360", "Xbox 360"),
        ("Halo 3 -Xbox 360", "Xbox 360"),
        ("Mario Kart DS- Nintendo DS", "Nintendo DS"),
        ("Civilization IV - PC", "PC"),
        ("Resident Evil 4 - PlayStation 4 Standard Edition", "PlayStation 4"),
        ("Uncharted 3 - Playstation 3", "PlayStation 3"),
        ("Prey - Pre-load - PS4 Digital Code", "PlayStation 4"),
        ("Madden NFL 17 - Standard Edition - Xbox One", "Xbox One"),
        ("Gears of War 4 - Ultimate Edition - Xbox One/Windows 10 [Digital Code]", "Xbox One"),
        ("Guitar Hero - Aerosmith - PlayStation 2 (Game only)", "PlayStation 2"),
        ("Spider-Man 3 - Nintendo Wii", "Nintendo Wii"),
        ("Spider-Man", None),
        ("X-Men Legends", None),
        ("Xbox 360 Wireless Controller - Black", None),
        ("Star Wars - Episode IV", None),
        ("Tetris", None),
        ("Toy Story (1995)", None),
        ("", None),
    ],
)
def test_platform_of(title, platform):
    assert platform_of(title) == platform


def test_specific_facets():
    assert specific_facets(Item("1", "Halo 3 - Xbox 360")) == ("Xbox 360",)
    assert specific_facets(Item("1", "Toy Story (1995)", ("Animation", "Comedy"))) == ("Animation", "Comedy")
    assert specific_facets(Item("1", "Mouse - PC", ("Video Games", "PC", "Accessories"))) == ("PC", "Video Games", "Accessories")
    assert specific_facets(Item("1", "Tetris")) == ()


def test_request_key():
    a = req(Kind.VAGUE, user="u1", target="t1")
    b = req(Kind.VAGUE, user="u2", target="t9")
    assert a.key() == b.key() and len(a.key()) == 64  # ids do not change the answer
    assert a.key() != req(Kind.VAGUE, target_review="great").key()
    assert a.key() != req(Kind.SPECIFIC).key()
    # a preference depends on the history only
    assert req(Kind.PREFERENCE, title="A").key() == req(Kind.PREFERENCE, title="B").key()
    assert req(Kind.PREFERENCE).key() != req(Kind.PREFERENCE, history=("Other",)).key()


# ---------------------------------------------------------------------------- stats


def test_stats_table():
    anns = [
        Annotation("u1", "a", Kind.PREFERENCE, "I like racing games", "offline-v1", "k1"),
        Annotation("u1", "a", Kind.VAGUE, "something fun", "offline-v1", "k2"),
        Annotation("u1", "a", Kind.SPECIFIC, None, "offline-v1", "k3"),
        Annotation("u2", "b", Kind.PREFERENCE, "I play on PC", "offline-v1", "k4"),
        Annotation("u2", "b", Kind.SPECIFIC, "a game for PC", "offline-v1", "k5"),
    ]
    stats = annotation_stats(anns, n_users=3)
    assert stats["users"] == 3 and stats["annotated_users"] == 2
    assert stats["fine_grained"] == 4 and stats["unanswered"] == 1
    assert (stats["preferences"], stats["vague_intentions"], stats["specific_intentions"], stats["intentions"]) == (2, 1, 1, 2)
    assert stats["avg_words_preferences"] == 4.0 and stats["avg_words"] == 3.5
    assert stats["teacher"] == "offline-v1"
    table = format_stats_table(stats)
    rows = {line.rsplit("  ", 1)[0].strip(): line.split()[-1] for line in table.splitlines()[2:]}
    assert rows["# of users"] == "3"
    assert rows["# of fine-grained instructions"] == "4"
    assert rows["- # of user-described preferences"] == "2"
    assert rows["- # of user intentions in decision making"] == "2"
    assert rows["ave. instruction length (in words)"] == "3.5"
    assert "offline-v1" in table


# ---------------------------------------------------------------------------- CLI


def write_recbole(directory):
    directory.mkdir()
    titles = ["Halo 3 - Xbox 360", "Gears of War - Xbox 360", "Mario Kart DS - Nintendo DS", "Tetris",
              "Civilization IV - PC", "Burnout Paradise - PlayStation 3"]
    (directory / "Tiny.item").write_text(
        "item_id:token\ttitle:token_seq\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(titles, 1)), encoding="utf-8")
    (directory / "Tiny.test.inter").write_text(
        "user_id:token\titem_id_list:token_seq\titem_id:token\n"
        "u1\t1 2 3\t4\nu2\t5 4 1\t2\nu3\t6 3 5 1\t2\n", encoding="utf-8")


def test_cli_end_to_end(tmp_path, capsys):
    pytest.importorskip("instructrec.training.data.load")
    from instructrec.cli import main

    write_recbole(tmp_path / "tiny")
    out = tmp_path / "out"
    argv = ["annotate", "--data", str(tmp_path / "tiny"), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "# of fine-grained instructions" in printed and "offline-v2" in printed
    lines = [json.loads(x) for x in (out / "annotations.jsonl").read_text().splitlines()]
    stats = json.loads((out / "stats.json").read_text())
    n_cases = 3 + 3 + 4  # sequences of 4, 4 and 5 items: every position after the first
    assert stats["users"] == 3 and stats["cases"] == n_cases and stats["requests"] == 3 * n_cases
    assert len(lines) == 3 * n_cases
    assert stats["fine_grained"] == sum(x["text"] is not None for x in lines)
    assert any(x["text"] is None for x in lines)  # Tetris has no platform: no specific intention
    assert stats["specific_intentions"] < n_cases

    # rerun: everything is cached
    assert main(argv) == 0
    assert len((out / "annotations.jsonl").read_text().splitlines()) == 3 * n_cases

    # one split, one kind, a user sample
    out2 = tmp_path / "out2"
    assert main(["annotate", "--data", str(tmp_path / "tiny"), "--out", str(out2), "--split", "test",
                 "--kinds", "specific_intention", "--users", "2", "--no-progress"]) == 0
    lines = [json.loads(x) for x in (out2 / "annotations.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and {x["kind"] for x in lines} == {"specific_intention"}


def test_cli_errors_exit_2(tmp_path, capsys):
    from instructrec.cli import main

    assert main(["annotate", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err
    assert main(["annotate", "--teacher", "openai", "--out", str(tmp_path / "o")]) == 2
    assert "--teacher-url" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["annotate", "--kinds", "preference,bogus"])


def test_cli_openai_teacher_error_exit_2(tmp_path, capsys, llm):
    pytest.importorskip("instructrec.training.data.load")
    from instructrec.cli import main

    write_recbole(tmp_path / "tiny")
    llm.fail_first, llm.fail_status = 100, 401
    code = main(["annotate", "--data", str(tmp_path / "tiny"), "--out", str(tmp_path / "o"), "--no-progress",
                 "--teacher", "openai", "--teacher-url", llm.url, "--teacher-model", "m", "--concurrency", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "401" in err and "Traceback" not in err
