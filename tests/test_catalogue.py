"""The catalogue: the sorted token table as a prefix tree, its file, and `instructrec catalogue`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from instructrec.catalogue import (CatalogueError, CatalogueItem, Node, build_catalogue, load_catalogue,
                                   read_items_jsonl)
from instructrec.modeling import load_model
from instructrec.ranker import Ranker, targets_ids


@pytest.fixture(scope="module")
def tiny():
    loaded = load_model("tiny-random", device="cpu", dtype="float32")
    return loaded, Ranker(loaded, max_target_tokens=10)


def _catalogue(tiny, titles):
    loaded, ranker = tiny
    items = [CatalogueItem(str(i), t) for i, t in enumerate(titles)]
    return build_catalogue(items, loaded.tokenizer, eos=ranker.eos, max_target_tokens=ranker.max_target_tokens)


def _walk(cat, node, prefix, out, counts=None):
    tokens, los, his = cat.children(node, counts)
    for t, lo, hi in zip(tokens.tolist(), los.tolist(), his.tolist()):
        if t == cat.eos:
            out[tuple(prefix + [t])] = cat.leaf_items(Node(lo, hi, node.depth + 1))
        else:
            _walk(cat, Node(lo, hi, node.depth + 1), prefix + [t], out, counts)


def test_the_tree_holds_exactly_the_titles_as_the_ranker_tokenises_them(tiny):
    loaded, ranker = tiny
    titles = ["Halo", "Halo 3", "Halo 3 ODST", "Halo Reach", "Zelda", "Halo 3", "a very long title that goes on "
              "and on well beyond the cut", "a very long title that goes on and on and on beyond the cut"]
    cat = _catalogue(tiny, titles)
    leaves: dict = {}
    _walk(cat, cat.root(), [], leaves)
    want: dict = {}
    for i, (ids, _) in enumerate(targets_ids(loaded.tokenizer, titles, ranker.max_target_tokens, ranker.eos)):
        want.setdefault(tuple(ids), []).append(i)
    assert leaves == want
    assert cat.header["leaves"] == len(want) == 6  # "Halo 3" twice; the long two equal up to the cut
    # "Halo" is a prefix of three titles: its node has an end-of-sequence child and others
    halo = targets_ids(loaded.tokenizer, ["Halo"], 10, ranker.eos)[0][0][:-1]
    node = cat.root()
    for t in halo:
        tokens, los, his = cat.children(node)
        j = tokens.tolist().index(t)
        node = Node(int(los[j]), int(his[j]), node.depth + 1)
    assert ranker.eos in cat.children(node)[0].tolist() and len(cat.children(node)[0]) == 3


def test_allowed_counts_prune_branches_without_an_allowed_item(tiny):
    titles = ["Halo", "Halo 3", "Halo Reach", "Zelda"]
    cat = _catalogue(tiny, titles)
    allowed = np.array([False, True, False, False])
    leaves: dict = {}
    _walk(cat, cat.root(), [], leaves, cat.allowed_counts(allowed))
    assert [v for v in leaves.values()] == [[1]]


def test_save_and_load_round_trip(tiny, tmp_path):
    cat = _catalogue(tiny, ["Halo", "Zelda", "Mario Kart 8"])
    path = cat.save(tmp_path / "cat")
    assert path.name == "cat" and path.is_file()  # the path given, as `serve --catalogue` will name it
    back = load_catalogue(path)
    assert back.header == cat.header and back.items == cat.items
    assert np.array_equal(back.tokens, cat.tokens) and np.array_equal(back.item_of_row, cat.item_of_row)
    assert back.version == cat.version and len(back.version) == 16


def test_bad_catalogue_files_are_named(tmp_path):
    with pytest.raises(CatalogueError, match="no such catalogue file"):
        load_catalogue(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(CatalogueError, match=f"{junk}: cannot be read as a catalogue"):
        load_catalogue(junk)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, header=np.frombuffer(json.dumps({"format": "instructrec-catalogue", "version": 99}).encode(),
                                         dtype=np.uint8))
    with pytest.raises(CatalogueError, match="format version 99"):
        load_catalogue(wrong)


@pytest.mark.parametrize("line, message", [
    ('{"id": 1, "title": "x"', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"title": "x"}', 'no "id" field'),
    ('{"id": true, "title": "x"}', "must be a non-empty string or an integer"),
    ('{"id": 2, "title": "   "}', '"title" must be a non-empty string'),
    ('{"id": 2, "title": 5}', '"title" must be a non-empty string'),
    ('{"id": 1, "title": "again"}', "item id '1' was already given on line 1"),
])
def test_bad_item_lines_stop_with_file_and_line(tmp_path, line, message):
    path = tmp_path / "items.jsonl"
    path.write_text('{"id": 1, "title": "Halo"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(CatalogueError, match=f"{path}:3: .*{message}"):
        list(read_items_jsonl(path))


def test_items_keep_metadata_and_normalised_titles(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text('{"item_id": "B1", "title": "  Halo   3 ", "platform": "Xbox"}\n', encoding="utf-8")
    (item,) = read_items_jsonl(path)
    assert item == CatalogueItem("B1", "Halo 3", {"platform": "Xbox"})


def _build_command(tmp_path, titles: list[str]):
    """(items file, catalogue path, the `catalogue build` command from the one to the other)."""
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"id": i, "title": t}) + "\n" for i, t in enumerate(titles)), encoding="utf-8")
    out = tmp_path / "cat.npz"
    return items, out, [sys.executable, "-m", "instructrec.cli", "catalogue", "build", "--items", str(items), "--model",
                        "tiny-random", "--out", str(out)]


def test_the_cli_builds_shows_and_reports_bad_input(tmp_path):
    items, out, cmd = _build_command(tmp_path, ["Halo", "Halo 3", "Zelda", "Halo 3"])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "4 items, 3 distinct titles" in done.stdout
    shown = subprocess.run([sys.executable, "-m", "instructrec.cli", "catalogue", "show", str(out)],
                           capture_output=True, text=True, timeout=120)
    header = json.loads(shown.stdout)
    assert header["items"] == 4 and header["model"] == "tiny-random" and header["max_target_tokens"] == 48
    items.write_text('{"id": 1, "title": "Halo"}\n{"id": 2}\n', encoding="utf-8")
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert f'{items}:2: "title" must be a non-empty string' in bad.stderr


def test_the_built_catalogue_keeps_the_title_vectors_the_service_reads(tmp_path, monkeypatch):
    """`catalogue build` keeps the semantic signal's title vectors where a service serving the
    catalogue looks for them, so the service reads them instead of encoding every title."""
    from instructrec.hybrid.semantic import SemanticEncoder, catalogue_keep

    titles = ["Halo 3 - Xbox 360", "Zelda: Breath of the Wild", "Halo 3 - Xbox 360", "Portal 2 - PC"]
    _, out, cmd = _build_command(tmp_path, titles)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "kept 4 title vectors of the semantic signal" in done.stdout
    encoder = SemanticEncoder()
    kept = encoder.kept_vectors_path([it.title for it in load_catalogue(out).items], catalogue_keep(out))
    assert kept.is_file()

    def encode_all(*args, **kwargs):
        raise AssertionError("the kept vectors were not found: every title encoded again")

    monkeypatch.setattr(encoder, "encode_all", encode_all)
    vectors = encoder.catalogue_vectors(titles, catalogue_keep(out))
    assert vectors.shape == (4, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vectors[0], encoder.embed(["Halo 3 - Xbox 360"])[0], atol=1e-5)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # a rebuild reuses them
    assert again.returncode == 0 and "(already there)" in again.stdout
    off = subprocess.run([*cmd[:-2], "--out", str(tmp_path / "bare.npz"), "--no-title-vectors"],
                         capture_output=True, text=True, timeout=300)
    assert off.returncode == 0 and "title vectors" not in off.stdout
    assert not list(tmp_path.glob("bare.npz.vectors-*"))


def test_metadata_lookups_match_values_and_list_members(tiny, tmp_path):
    loaded, ranker = tiny
    items = [CatalogueItem("a", "Halo", {"platform": "PC", "tags": ["co-op", "shooter"], "year": 2001}),
             CatalogueItem("b", "Zelda", {"platform": "Switch", "tags": ["adventure"], "year": "2001"}),
             CatalogueItem("c", "Doom", None)]
    cat = build_catalogue(items, loaded.tokenizer, eos=ranker.eos, max_target_tokens=ranker.max_target_tokens)
    cat = load_catalogue(cat.save(tmp_path / "m.npz"))  # metadata survives the file
    assert cat.indices_where("platform", ["PC", "Switch"]) == [0, 1]
    assert cat.indices_where("tags", ["shooter"]) == [0]
    assert cat.indices_where("year", [2001]) == [0] and cat.indices_where("year", ["2001"]) == [1]
    assert cat.indices_where("colour", ["red"]) == []


def test_the_recommend_cli_writes_catalogue_items_and_leaves_the_history_out(tmp_path, capsys):
    from instructrec.cli import main

    loaded = load_model("tiny-random", device="cpu", dtype="float32")
    ranker = Ranker(loaded)
    titles = ["Halo", "Halo 3", "Zelda", "Mario Kart 8", "Portal", "Portal 2", "Doom"]
    cat = build_catalogue([CatalogueItem(f"i{n}", t) for n, t in enumerate(titles)], loaded.tokenizer, eos=ranker.eos,
                          max_target_tokens=ranker.max_target_tokens).save(tmp_path / "c.npz")
    args = ["recommend", "--model", "tiny-random", "--device", "cpu", "--dtype", "float32", "--catalogue", str(cat),
            "--history", "Halo", "--history", "Portal", "--intention", "a shooter", "--json"]
    assert main([*args, "--k", "5", "--beams", "7"]) == 0
    out = json.loads(capsys.readouterr().out)
    got = [r["title"] for r in out["recommended"]]
    assert len(got) == 5 and not {"Halo", "Portal"} & set(got) and set(got) <= set(titles)
    assert out["instantiation"].endswith("T2>") and out["steps"] > 1
    # the beam held every title: the order is the ranker's, under the same instruction
    scores = ranker.score(out["instruction"], got).scores
    assert [r["score"] for r in out["recommended"]] == pytest.approx(scores, abs=1e-4)
    assert scores == sorted(scores, reverse=True)
    assert main([*args, "--top-n", "3", "--keep-history"]) == 0  # the name /rerank and /recommend use
    assert len(json.loads(capsys.readouterr().out)["recommended"]) == 3
    assert main([*args, "--top-n", "0"]) == 2
    assert "--top-n must be 1 to 100" in capsys.readouterr().err
    assert main([*args[:-1], "--template", "comb-09"]) == 2  # a rerank (T3) template cannot generate
    assert "T3" in capsys.readouterr().err
