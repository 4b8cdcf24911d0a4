"""Replay a fixed set of requests against the service and record every answer.

Why: a refactor of the service's layers must not change a single byte of any answer. This
starts the service in-process on loopback (tiny models, no Redis so nothing is cached across
runs), sends a few hundred seeded requests to every endpoint (good ones in many shapes, and bad
ones that get 4xx), and writes status, the headers a client reads and the body, with the random
answer ids masked, one JSON line per request. Run it before and after a change and ``cmp`` the
files.

    python scripts/replay_service.py --out artifacts/replay/before
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's instructrec, not an installed one

from instructrec.service.app import create_app  # noqa: E402
from instructrec.service.loopback import ThreadedServer  # noqa: E402
from instructrec.service.settings import Settings  # noqa: E402
from tests.test_service_hybrid import ITEMS, SEQUENCES, TITLES  # noqa: E402  (the hybrid tests' tiny world)

KEY = "replay-key"
EXTRA = ["Minecraft", "The Sims 4", "Civilization VI", "  Café   Racer  ", "Zelda: Breath of the Wild", "FIFA 23"]
TEMPLATES = [None] * 12 + ["pref-01", "pref-05", "int-02", "int-07", "comb-03", "comb-10", "no-such-template"]
PREFS = [None, "I like co-op shooters", "cosy farming games", "  story   driven  "]
INTENTS = [None, "something scary", "a puzzle game with portals"]
INSTRUCTIONS = [None, "play with friends tonight", "relax after work"]

MASKS = [(re.compile(rb'"(rr|rec)-[0-9a-f]{32}"'), rb'"\1-<id>"'),
         (re.compile(rb'"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"'), rb'"<uuid>"')]
HEADERS = ("content-type", "www-authenticate", "retry-after")


def history(rng: random.Random) -> list:
    shape = rng.choice(["none", "titles", "objects", "mixed", "with-empty"])
    picks = rng.sample(ITEMS, rng.randint(1, 4))
    if shape == "none":
        return []
    if shape == "titles":
        return [t for _, t in picks]
    if shape == "objects":
        return [{"id": i, "title": t} for i, t in picks]
    if shape == "mixed":
        return [t if n % 2 else {"id": int(i[1:]) if n % 3 == 0 else i, "title": t} for n, (i, t) in enumerate(picks)]
    return [{"id": i, "title": t} for i, t in picks] + [{"title": ""}]


def need(rng: random.Random) -> dict:
    body: dict = {}
    h = history(rng)
    if h or rng.random() < 0.3:
        body["history"] = h
    for key, pool in (("preference", PREFS), ("instruction", INSTRUCTIONS)):
        value = rng.choice(pool)
        if value is not None:
            body[key] = value
    text = rng.choice(INTENTS)
    if text is not None:
        kind = rng.choice([None, "vague", "specific"])
        body["intention"] = {"text": text} if kind is None else {"text": text, "kind": kind}
    template = rng.choice(TEMPLATES)
    if template is not None:
        body["template"] = template
    if rng.random() < 0.5:
        body["fusion"] = rng.choice(["auto", "lm-only"])
    return body


def candidates(rng: random.Random) -> list:
    pool = ITEMS + [(f"x{k}", t) for k, t in enumerate(EXTRA)]
    picks = rng.sample(pool, rng.randint(1, 8))
    shape = rng.choice(["titles", "objects", "int-ids", "no-ids"])
    if shape == "titles":
        return [t for _, t in picks]
    if shape == "objects":
        return [{"id": i, "title": t, "extra": 1} for i, t in picks]
    if shape == "int-ids":
        return [{"id": n * 7, "title": t} for n, (_, t) in enumerate(picks)]
    return [{"title": t} for _, t in picks]


def rerank_body(rng: random.Random) -> dict:
    body = need(rng)
    body["candidates"] = candidates(rng)
    if rng.random() < 0.4:
        body["top_n"] = rng.randint(1, len(body["candidates"]) + 2)
    if rng.random() < 0.3:
        body["return_scores"] = rng.choice([True, False])
    return body


def compat_body(rng: random.Random) -> dict:
    body: dict = {"query": rng.choice(["a scary shooter", "farming", "portal puzzles", "  spaced   out  "])}
    docs = []
    for _, t in rng.sample(ITEMS + [(f"x{k}", t) for k, t in enumerate(EXTRA)], rng.randint(1, 7)):
        shape = rng.random()
        if shape < 0.4:
            docs.append(t)
        elif shape < 0.7:
            docs.append({"text": t, "id": rng.choice([f"g{TITLES.index(t)}" if t in TITLES else "zz", 5, None])})
        else:
            docs.append({"text": t, "title": t.upper(), "year": 2000 + len(t)})
    body["documents"] = docs
    if rng.random() < 0.3:
        body["rank_fields"] = rng.choice([["text"], ["title"], ["title", "text"]])
    if rng.random() < 0.4:
        body["top_n"] = rng.randint(1, len(docs) + 1)
    if rng.random() < 0.4:
        body["return_documents"] = rng.choice([True, False])
    if rng.random() < 0.2:
        body["max_tokens_per_doc"] = rng.randint(1, 6)
    if rng.random() < 0.2:
        body["model"] = "rerank-english-v3.0"
    if rng.random() < 0.4:
        body["fusion"] = rng.choice(["auto", "lm-only"])
    return body


def recommend_body(rng: random.Random) -> dict:
    body = need(rng)
    r = rng.random()
    if r < 0.3:
        body["top_n"] = rng.randint(1, 6)
    elif r < 0.4:
        body["k"] = rng.randint(1, 6)
    if rng.random() < 0.3:
        body["exclude_history"] = rng.choice([True, False])
    f = rng.random()
    if f < 0.15:
        body["filter"] = {"ids": rng.sample([i for i, _ in ITEMS], 4)}
    elif f < 0.3:
        body["filter"] = {"exclude_ids": rng.sample([i for i, _ in ITEMS], 3)}
    return body


BAD = [
    ("POST", "/rerank", b""),
    ("POST", "/rerank", b"{not json"),
    ("POST", "/rerank", b"\xff\xfe{}"),
    ("POST", "/rerank", b"[1, 2]"),
    ("POST", "/rerank", json.dumps({"candidates": []}).encode()),
    ("POST", "/rerank", json.dumps({"candidates": ["a"], "top_n": 0}).encode()),
    ("POST", "/rerank", json.dumps({"candidates": ["a"], "top_n": "3"}).encode()),
    ("POST", "/rerank", json.dumps({"candidates": [""]}).encode()),
    ("POST", "/rerank", json.dumps({"candidates": ["a"], "fusion": "fused"}).encode()),
    ("POST", "/rerank", json.dumps({"candidates": ["a"], "colour": "red"}).encode()),
    ("POST", "/rerank", json.dumps({"candidates": ["a"], "template": "nope"}).encode()),
    ("POST", "/rerank", json.dumps({"candidates": ["x" * 600]}).encode()),
    ("POST", "/rerank", json.dumps({"candidates": ["a"] * 300}).encode()),
    ("POST", "/rerank", json.dumps({"candidates": ["a"], "intention": {"text": ""}}).encode()),
    ("POST", "/rerank", json.dumps({"candidates": ["a"], "intention": {"text": "b", "kind": "odd"}}).encode()),
    ("POST", "/rerank", b'{"candidates": ["a"], "n": 1' + b"0" * 5000 + b"}"),
    ("POST", "/rerank", b'{"candidates": ["\\ud800"]}'),
    ("POST", "/rerank", b"x" * 2_000_001),
    ("POST", "/v1/rerank", b""),
    ("POST", "/v1/rerank", json.dumps({"documents": ["a"]}).encode()),
    ("POST", "/v1/rerank", json.dumps({"query": "q", "documents": []}).encode()),
    ("POST", "/v2/rerank", json.dumps({"query": "q", "documents": [{"title": "a"}]}).encode()),
    ("POST", "/v2/rerank", json.dumps({"query": "q", "documents": [{"text": 3}]}).encode()),
    ("POST", "/v2/rerank", json.dumps({"query": "q", "documents": ["a"], "rank_fields": []}).encode()),
    ("POST", "/v2/rerank", json.dumps({"query": "q", "documents": ["a"], "top_n": -1}).encode()),
    ("POST", "/v2/rerank", json.dumps({"query": "", "documents": ["a"]}).encode()),
    ("POST", "/recommend", b""),
    ("POST", "/recommend", json.dumps({"top_n": 0}).encode()),
    ("POST", "/recommend", json.dumps({"top_n": 2, "k": 3}).encode()),
    ("POST", "/recommend", json.dumps({"filter": {"ids": []}}).encode()),
    ("POST", "/recommend", json.dumps({"filter": {"meta": {}}}).encode()),
    ("POST", "/recommend", json.dumps({"template": "nope"}).encode()),
    ("POST", "/recommend", json.dumps({"history": "Halo 3"}).encode()),
    ("GET", "/rerank", b""),
    ("POST", "/nowhere", b"{}"),
]


def requests(seed: int, count: int) -> list[tuple[str, str, bytes, dict]]:
    """The replayed requests: (method, path, body, headers), the same for the same seed."""
    rng = random.Random(seed)
    auth = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    out = [("GET", "/health", b"", {}), ("GET", "/ready", b"", {})]
    for n in range(count):
        kind = rng.choices(["rerank", "v1", "v2", "recommend"], [5, 2, 2, 3])[0]
        if kind == "rerank":
            body, path = rerank_body(rng), "/rerank"
        elif kind == "recommend":
            body, path = recommend_body(rng), "/recommend"
        else:
            body, path = compat_body(rng), f"/{kind}/rerank"
        out.append(("POST", path, json.dumps(body).encode(), auth))
    for method, path, body in BAD:
        out.append((method, path, body, auth))
    for path in ("/rerank", "/v1/rerank", "/recommend"):  # no key, a wrong key, another scheme
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {KEY}"}):
            out.append(("POST", path, b'{"candidates": ["a"], "query": "q", "documents": ["a"]}', headers))
    return out


def mask(body: bytes) -> bytes:
    for pattern, repl in MASKS:
        body = pattern.sub(repl, body)
    return body


def replay(settings: Settings, seed: int, count: int, out: Path) -> int:
    server = ThreadedServer(create_app(settings), name="replay").start()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            deadline = time.monotonic() + 300
            while client.get("/ready").status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("the service did not become ready")
                time.sleep(0.1)
            lines = []
            for method, path, body, headers in requests(seed, count):
                r = client.request(method, path, content=body, headers=headers)
                kept = {h: r.headers[h] for h in HEADERS if h in r.headers}
                lines.append(json.dumps({"request": f"{method} {path} {body[:2000].decode('utf-8', 'replace')}",
                                         "status": r.status_code, "headers": kept,
                                         "body": mask(r.content).decode("utf-8", "replace")}, ensure_ascii=False))
    finally:
        server.stop()
    out.write_text("\n".join(lines) + "\n")
    return len(lines)


def hybrid_files(root: Path) -> dict:
    """A gate with known weights, a behaviour index and a catalogue, built as the hybrid tests build them."""
    import numpy as np

    from instructrec.catalogue import CatalogueItem, build_catalogue
    from instructrec.hybrid.behaviour import build_behaviour_index
    from instructrec.hybrid.gate import FEATURES, SIGNALS, Gate
    from instructrec.modeling import load_model
    from instructrec.ranker import Ranker

    w = np.zeros((len(SIGNALS), len(FEATURES)))
    w[SIGNALS.index("behaviour"), FEATURES.index("bias")] = 0.8
    w[SIGNALS.index("behaviour"), FEATURES.index("known")] = 0.4
    w[SIGNALS.index("semantic"), FEATURES.index("bias")] = 0.5
    w[SIGNALS.index("semantic"), FEATURES.index("vague")] = 1.5
    gate = Gate(w, temperature=1.3, info={"replay": True}).save(root / "gate.json")
    index = build_behaviour_index(SEQUENCES, ITEMS, top_n=50).save(root / "behaviour.npz")
    loaded = load_model("tiny-random-prefixlm", device="cpu", dtype="float32")
    ranker = Ranker(loaded)
    meta = [{"genre": "shooter" if n % 3 == 0 else "other", "year": 2000 + n} for n in range(len(ITEMS))]
    cat = build_catalogue([CatalogueItem(i, t, m) for (i, t), m in zip(ITEMS, meta)], loaded.tokenizer,
                          eos=ranker.eos, max_target_tokens=ranker.max_target_tokens)
    return {"gate": str(gate), "behaviour": str(index), "catalogue": str(cat.save(root / "cat.npz"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for plain.jsonl and hybrid.jsonl")
    parser.add_argument("--count", type=int, default=300, help="generated requests per run (bad ones are added)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--skip-hybrid", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = dict(device="cpu", dtype="float32", redis_url="", batch_tokens=1024, max_wait_ms=1, torch_threads=1,
                api_key=KEY, max_text_chars=500, max_candidates=256, max_body_bytes=1_000_000)
    n = replay(Settings(model="tiny-random", **base), args.seed, args.count, args.out / "plain.jsonl")
    print(f"plain: {n} requests -> {args.out / 'plain.jsonl'}")
    if not args.skip_hybrid:
        with tempfile.TemporaryDirectory() as tmp:
            files = hybrid_files(Path(tmp))
            n = replay(Settings(model="tiny-random-prefixlm", **base, **files), args.seed + 1, args.count,
                       args.out / "hybrid.jsonl")
        print(f"hybrid: {n} requests -> {args.out / 'hybrid.jsonl'}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
