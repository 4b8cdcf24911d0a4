"""Phrasing families of the offline teacher: the fixed split, training data that never uses a
held-out family, well-formed held-out needs, deterministic aliases and misspellings, and
`instructrec evaluate --phrasing` on a slice of the Games sample."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict

import pytest

from instructrec.modeling import minilm_tokenizer
from instructrec.training.annotate import phrasing
from instructrec.training.annotate.frames import ALL_FRAMES
from instructrec.training.annotate.offline import OfflineTeacher, _genre
from instructrec.training.annotate.pipeline import build_request
from instructrec.training.annotate.teachers import Kind, platform_of
from instructrec.training.data.load import load_dataset
from instructrec.training.evaluate.run import EvalConfig, evaluate
from instructrec.training.instructions import Mixture, build_examples
from instructrec.training.tune import annotate_offline

from .test_annotate import many_requests

# sha256 of the sorted held-out family names of families-v1 (changing the split must be deliberate:
# bump SPLIT_VERSION and the offline teacher's version with it)
HELD_OUT_DIGEST = "a62975716c265b84"
# sha256 of offline-v1's answers to the requests below, taken from the code before the families existed
OFFLINE_V1_DIGEST = "32bc1e5f2eef4bbe7e05e9d0e25d6decb8aebc1ecfb0f8e889884fbed872eb7a"


@pytest.fixture(scope="module")
def sample():
    data = load_dataset("games-sample").sample_users(150, seed=5)
    return data, data.split().train[:300]


def test_split_is_disjoint_stable_and_covers_every_group():
    every = phrasing.families()
    held, train = phrasing.allowed("held-out"), phrasing.allowed("in-family")
    assert held == phrasing.held_out() and not held & train and held | train == set(every)
    assert hashlib.sha256(",".join(sorted(held)).encode()).hexdigest()[:16] == HELD_OUT_DIGEST
    assert len({f.family for f in ALL_FRAMES}) == len(ALL_FRAMES)  # family names are unique
    groups = defaultdict(list)
    for family in every:
        groups[family.split(".")[0]].append(family)
    for group, names in groups.items():
        if len(names) >= 2:  # every situation stays phrasable on both sides
            assert set(names) & held and set(names) - held, group
    # new families on the held-out side, in every kind, and every new generator style on both sides
    for prefix in ("pref-", "vague-", "spec-", "alias.", "typos."):
        assert any(f.startswith(prefix) and every[f] for f in held), prefix
    for group in ("vague-compose", "vague-negation", "pref-negation", "alias", "typos"):
        assert set(groups[group]) & held and set(groups[group]) - held, group
    assert phrasing.allowed("novel") == {f for f in held if every[f]}
    assert phrasing.allowed("v1") == {f for f, new in every.items() if not new}
    with pytest.raises(ValueError, match="unknown phrasing 'odd'"):
        phrasing.allowed("odd")


def test_v1_phrasing_writes_exactly_what_offline_v1_wrote():
    teacher = OfflineTeacher(phrasing="v1")
    assert teacher.name == "offline-v1" and OfflineTeacher().name == "offline-v2"
    assert OfflineTeacher(phrasing="held-out").name == "offline-v2:held-out"
    out = []
    for kind in Kind:
        out += [repr(teacher.annotate_sync(r)) for r in many_requests(kind, 80)]
        out += [repr(teacher.annotate_sync(r)) for r in many_requests(
            kind, 40, target_review="My son loves it, great fun with friends.", target_categories=("Action", "Shooter"))]
    assert hashlib.sha256("\n".join(out).encode()).hexdigest() == OFFLINE_V1_DIGEST


def test_training_data_never_uses_a_held_out_family(sample, tmp_path):
    data, cases = sample
    annotations = annotate_offline(data, cases, tmp_path / "annotations.jsonl", progress=False)
    assert {a.teacher for a in annotations.values()} == {"offline-v2"}
    teacher, held = OfflineTeacher(), phrasing.held_out()
    used = Counter()
    by_case = {(c.user_id, c.target): c for c in cases}
    for (user, target, kind), ann in annotations.items():
        text, fams = teacher.explain(build_request(data, by_case[(user, target)], kind))
        assert text == ann.text and fams and not set(fams) & held, (text, fams)
        used.update(fams)
    assert len(used) >= 20 and any(f.startswith("alias.") for f in used) and any(f.startswith("typos.") for f in used)
    examples = build_examples(data, cases, annotations, minilm_tokenizer(), 256, seed=0, mixture=Mixture(per_case=2))
    texts = {a.text for a in annotations.values()}
    with_teacher = [e for e in examples if e.teacher]
    assert with_teacher and all(e.teacher == "offline-v2" for e in with_teacher)
    # every teacher text an example carries is one of the in-family annotations above
    held_texts = {t for t in (OfflineTeacher(phrasing="held-out").annotate_sync(build_request(data, c, k))
                              for c in cases[:100] for k in Kind) if t} - texts
    assert held_texts and not any(t in e.source for e in with_teacher for t in held_texts)


def test_held_out_needs_are_well_formed(sample):
    data, cases = sample
    teacher, held = OfflineTeacher(phrasing="held-out"), phrasing.held_out()
    aliases = {name for table in phrasing.ALIASES.values() for name in table.values()}
    answered = Counter()
    for case in cases:
        title = data.title(case.target)
        for kind in Kind:
            text, fams = teacher.explain(build_request(data, case, kind))
            if text is None:
                continue
            answered[kind] += 1
            assert set(fams) <= held and fams[0] in {f.family for f in ALL_FRAMES}
            assert text.strip() == text and "{" not in text and "}" not in text and "  " not in text
            if kind is Kind.SPECIFIC:  # the query names the target's platform, or an alias of it
                platform = platform_of(title)
                assert platform in text or any(a in text for a in aliases), (title, text)
            if kind is Kind.VAGUE:
                assert title.lower() not in text.lower()
                m = re.search(r"but no ([a-z -]+) games|fill of ([a-z -]+) games", text)
                if m and "typos" not in " ".join(fams):
                    assert (m.group(1) or m.group(2)) != _genre(title)  # never says no to what it is
    assert min(answered.values()) >= 50, answered


def test_aliases_and_misspellings_are_deterministic():
    assert phrasing.alias("a game for PlayStation 4", "alias.short") == "a game for PS4"
    assert phrasing.alias("NES games", "alias.long") == "Nintendo Entertainment System games"
    assert phrasing.alias("PlayStation 4 and PlayStation", "alias.long") == "Sony PlayStation 4 and PlayStation"
    assert phrasing.alias("Xbox 360 and Xbox One", "alias.short") == "360 and XB1"
    text = "I'm looking for something relaxing to play with friends on PlayStation 4."
    for family in phrasing.TYPOS:
        outs = {phrasing.misspell(text, family, key="k1") for _ in range(3)}
        assert len(outs) == 1
        out = outs.pop()
        changed = [(a, b) for a, b in zip(text.split(), out.split()) if a != b]
        assert len(out.split()) == len(text.split()) and len(changed) == 1, out
        a, b = changed[0]
        assert a[0] == b[0] and a[-1] == b[-1] and a.islower()  # one lower-case word, ends kept
        assert sorted(a) == sorted(b) if family == "typos.swap" else abs(len(a) - len(b)) == 1
    assert phrasing.misspell(text, "typos.swap", "k1", seed=1) == phrasing.misspell(text, "typos.swap", "k1", seed=1)
    assert len({phrasing.misspell(text, "typos.drop", f"k{i}") for i in range(20)}) > 3  # the key varies it
    assert phrasing.misspell("PC Xbox", "typos.swap", "k") == "PC Xbox"  # nothing to misspell
    with pytest.raises(ValueError, match="unknown typo family"):
        phrasing.misspell(text, "typos.other", "k")


def test_evaluate_phrasing_rows_side_by_side(tmp_path):
    data = load_dataset("games-sample").sample_users(40, seed=3)
    cfg = EvalConfig(data=data, out=tmp_path / "report", users=16, select_users=6, settings=("uniform-10",),
                     scenarios=("sequential", "product_search", "vague_intention"), phrasing="both",
                     base="tiny-random", baselines=("popularity",), resamples=50, progress=False, command="test")
    assert cfg.phrasing == ("v1", "held-out")  # the published tables' phrasing keeps the plain names
    results = evaluate(cfg)
    rows = {(r["scenario"], r["method"]): r for r in results["rows"]}
    for method in ("popularity", "tiny-random (untuned)"):
        for name in ("sequential", "product_search", "product_search@held-out", "vague_intention",
                     "vague_intention@held-out"):
            assert (name, method) in rows, (name, method)
        assert ("sequential@held-out", method) not in rows  # nothing phrased there
        # the same cases, phrased apart
        assert rows[("product_search", method)]["cases"] == rows[("product_search@held-out", method)]["cases"] > 0
    teachers = Counter(json.loads(line)["teacher"] for line in (tmp_path / "report" / "annotations.jsonl").open())
    assert set(teachers) == {"offline-v1", "offline-v2:held-out"}
    assert "product search (held-out phrasing)" in (tmp_path / "report" / "results.md").read_text()
    with pytest.raises(ValueError, match="unknown phrasing 'sideways'"):
        EvalConfig(data=data, out=tmp_path, phrasing=("sideways",))
    with pytest.raises(ValueError, match="needs the offline teacher"):
        EvalConfig(data=data, out=tmp_path, phrasing=("held-out",), annotations=str(tmp_path / "a.jsonl"))


def test_evaluate_cli_rejects_a_bad_phrasing(tmp_path, capsys):
    from instructrec.cli import main

    assert main(["evaluate", "--data", "games-sample", "--out", str(tmp_path / "o"), "--phrasing", "sideways",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown phrasing 'sideways'" in err and "Traceback" not in err
