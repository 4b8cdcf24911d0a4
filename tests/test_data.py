"""Data loaders: the shipped Games sample, RecBole atomic/sequence files, raw Amazon 2018
JSON lines, k-core filtering and the errors on bad input (file + line in the message)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from instructrec.training.data.amazon import load_amazon
from instructrec.training.data.filters import k_core
from instructrec.training.data.load import load_dataset, sample_path
from instructrec.training.data.make_sample import make_sample
from instructrec.training.data.recbole import load_recbole_atomic, load_recbole_sequences
from instructrec.training.data.types import MAX_HISTORY, DataError, Interaction

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write(path: Path, text: str | bytes, gz: bool = False) -> Path:
    data = text.encode("utf-8") if isinstance(text, str) else text
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def jsonl(records: list[dict | str]) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def raises_at(fn, name: str, line: int | None, *words: str) -> DataError:
    with pytest.raises(DataError) as info:
        fn()
    err = info.value
    msg = str(err)
    assert name in msg, msg
    assert Path(err.path).name == name or name in err.path, msg
    assert err.line == line, msg
    if line is not None:
        assert f"{name}:{line}:" in msg, msg
    for w in words:
        assert w in msg, msg
    return err


# ---------------------------------------------------------------------------- shipped sample


@pytest.fixture(scope="module")
def games():
    return load_dataset("games-sample")


def test_sample_is_shipped_with_licence_and_source():
    d = sample_path("games")
    names = {p.name for p in d.iterdir()}
    assert {"Games.item", "Games.test.inter", "Games.valid.inter", "LICENSE", "SOURCE.md"} <= names
    assert "MIT License" in (d / "LICENSE").read_text()
    assert "make_sample" in (d / "SOURCE.md").read_text()
    assert sum((d / n).stat().st_size for n in names) < 1_000_000


def test_sample_counts_and_split(games):
    assert games.name == "Games"
    assert len(games.sequences) == 3000
    assert len(games.items) == 9511
    used = {x.item_id for s in games.sequences.values() for x in s}
    assert used == set(games.items)
    assert all(len(s) >= 5 for s in games.sequences.values())  # the source is 5-core
    split = games.split()
    assert len(split.test) == len(split.valid) == 3000
    assert len({c.user_id for c in split.test}) == len({c.user_id for c in split.valid}) == 3000
    assert all(len(c.history) <= MAX_HISTORY for c in split.train + split.valid + split.test)
    assert len(split.train) == sum(len(s) - 3 for s in games.sequences.values())
    assert any(len(s) > MAX_HISTORY + 1 for s in games.sequences.values())  # truncation is exercised
    assert all(games.title(i) for i in games.items)


def test_sample_chronology_matches_the_files(games):
    rows = sample_path("games").joinpath("Games.test.inter").read_text().splitlines()[1:]
    vrows = sample_path("games").joinpath("Games.valid.inter").read_text().splitlines()[1:]
    test_target = {r.split("\t")[0]: r.split("\t")[2] for r in rows}
    valid_target = {r.split("\t")[0]: r.split("\t")[2] for r in vrows}
    split = games.split()
    for case in split.test:
        seq = [x.item_id for x in games.sequences[case.user_id]]
        assert case.target == seq[-1] == test_target[case.user_id]
        assert list(case.history) == seq[:-1][-MAX_HISTORY:]
    for case in split.valid:
        assert case.target == valid_target[case.user_id] == games.sequences[case.user_id][-2].item_id


def test_make_sample_is_deterministic(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write(src / "Toy.item", "item_id:token\ttitle:token_seq\n" + "".join(f"{i}\tItem {i}\n" for i in range(12)))
    test_rows = "".join(f"{u}\t{u} {u + 1} {u + 2}\t{u + 3}\n" for u in range(8))
    valid_rows = "".join(f"{u}\t{u} {u + 1}\t{u + 2}\n" for u in range(8))
    write(src / "Toy-all.test.inter", "user_id:token\titem_id_list:token_seq\titem_id:token\n" + test_rows)
    write(src / "Toy-all.valid.inter", "user_id:token\titem_id_list:token_seq\titem_id:token\n" + valid_rows)
    write(src / "LICENSE", "MIT License\n")
    a = make_sample(src, tmp_path / "a", users=3, seed=0)
    make_sample(src, tmp_path / "b", users=3, seed=0, out_arg=str(tmp_path / "a"))
    for name in ("Toy.item", "Toy.test.inter", "Toy.valid.inter", "LICENSE"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    data = load_dataset(tmp_path / "a")
    assert a["users"] == len(data.sequences) == 3
    assert set(data.items) == {x.item_id for s in data.sequences.values() for x in s}


# ---------------------------------------------------------------------------- RecBole atomic


ML_ITEM = (
    "movie_title:token_seq\titem_id:token\tclass:token_seq\trelease_year:token\n"
    "Toy Story\t1\tAnimation Children's Comedy\t1995\n"
    "GoldenEye\t2\tAction Adventure Thriller\t1995\n"
    "Four Rooms\t3\tThriller\t1995\n"
    "Get Shorty\t4\tAction Comedy Drama\t1995\n"
)
ML_INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "7\t3\t4\t300\n"
    "7\t1\t5\t100\n"
    "8\t2\t3\t50\n"
    "7\t4\t2\t300\n"  # same timestamp as item 3: stable order keeps 3 first
    "7\t2\t1\t200\n"
    "8\t1\t4\t10\n"
)


@pytest.fixture
def ml_dir(tmp_path):
    d = tmp_path / "ml-mini"
    d.mkdir()
    write(d / "ml-mini.item", ML_ITEM)
    write(d / "ml-mini.inter", ML_INTER)
    write(d / "ml-mini.user", "user_id:token\tage:token\n7\t20\n8\t30\n")
    return d


def test_atomic_orders_by_timestamp_and_reads_genres(ml_dir):
    data = load_dataset(ml_dir)
    assert data.name == "ml-mini"
    assert [x.item_id for x in data.sequences["7"]] == ["1", "2", "3", "4"]
    assert [x.item_id for x in data.sequences["8"]] == ["1", "2"]
    first = data.sequences["7"][0]
    assert (first.timestamp, first.rating) == (100.0, 5.0)
    toy = data.items["1"]
    assert toy.title == "Toy Story"
    assert toy.categories == ("Animation", "Children's", "Comedy")
    assert "1995" in toy.description and "1995" not in toy.title
    split = data.split()
    assert [(c.history, c.target) for c in split.test] == [(("1", "2", "3"), "4")]


def test_atomic_min_core(ml_dir):
    data = load_recbole_atomic(ml_dir, min_core=2)
    # items 3 and 4 have one interaction -> dropped; user 7 keeps 1, 2; user 8 keeps 1, 2
    assert {u: [x.item_id for x in s] for u, s in data.sequences.items()} == {"7": ["1", "2"], "8": ["1", "2"]}
    assert set(data.items) == {"1", "2"}
    assert any("2-core" in n for n in data.notes)


@pytest.mark.skipif(not (SHARED / "ml-100k").is_dir(), reason="shared ml-100k data not available")
def test_real_ml_100k():
    data = load_dataset(SHARED / "ml-100k")
    assert len(data.sequences) == 943
    assert len(data.items) == 1682
    assert sum(len(s) for s in data.sequences.values()) == 100_000
    assert data.items["1"].categories == ("Animation", "Children's", "Comedy")
    for s in data.sequences.values():
        ts = [x.timestamp for x in s]
        assert ts == sorted(ts)


# ---------------------------------------------------------------------------- RecBole sequences


SEQ_HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"


@pytest.fixture
def seq_dir(tmp_path):
    d = tmp_path / "seq"
    d.mkdir()
    write(d / "Toy.item", "item_id:token\ttitle:token_seq\n" + "".join(f"{i}\tGame {i} - PC\n" for i in range(6)))
    write(d / "Toy-1k.test.inter", SEQ_HEADER + "a\t0 1 2\t3\nb\t2 3 4\t5\n")
    write(d / "Toy-1k.valid.inter", SEQ_HEADER + "a\t0 1\t2\nb\t2 3\t4\n")
    return d


def test_sequences_reconstruct_and_check_valid(seq_dir):
    data = load_dataset(seq_dir)
    assert data.name == "Toy"
    assert [x.item_id for x in data.sequences["a"]] == ["0", "1", "2", "3"]
    assert load_recbole_sequences(seq_dir, name="custom").name == "custom"
    write(seq_dir / "Toy-1k.valid.inter", SEQ_HEADER + "a\t0 1\t2\nb\t2 3\t9\n")
    raises_at(lambda: load_dataset(seq_dir), "Toy-1k.valid.inter", 3, "Toy-1k.test.inter line 3")


def test_sequences_without_valid_file(seq_dir):
    (seq_dir / "Toy-1k.valid.inter").unlink()
    data = load_recbole_sequences(seq_dir)
    assert len(data.split().valid) == 2


def test_sequences_unknown_item(seq_dir):
    write(seq_dir / "Toy-1k.test.inter", SEQ_HEADER + "a\t0 1 2\t3\nb\t2 3 42\t5\n")
    raises_at(lambda: load_dataset(seq_dir), "Toy-1k.test.inter", 3, "'42'", "Toy.item")


# ---------------------------------------------------------------------------- Amazon


USERS = ["U1", "U2", "U3", "U4", "U5"]
ITEMS = ["A1", "A2", "A3", "A4", "A5"]


def amazon_records() -> tuple[list, list]:
    meta = [
        {
            "asin": "A1",
            "title": "Space Blaster",
            "category": ["Video Games", "PC", "Video Games", "Games"],
            "description": ["<p>A <b>fast</b> shooter</p>", "with friends &amp; foes.<br/>"],
            "brand": "Acme",
        },
        {"asin": "A2", "title": "Kart Racer - Nintendo Switch", "category": ["Video Games"], "description": "x" * 3000},
        {"asin": "A3", "title": "Puzzle Box", "category": []},
        {"asin": "A4", "title": "Farm Life"},
        {"asin": "A5", "title": "Dungeon Crawl", "category": ["Video Games", "Role-Playing"]},
        {"asin": "Z9", "title": "Rare Thing"},  # one review only: dropped by the 5-core filter
        {"asin": "NT", "category": ["Video Games"]},  # no title: dropped
        {"asin": "A1", "title": "Duplicate metadata"},  # repeated: first kept
    ]
    reviews = []
    # every user reviews every item, in scrambled file order; time gives A1..A5
    for n, u in enumerate(USERS):
        for k in (2, 0, 4, 1, 3):
            item = ITEMS[k]
            r = {"reviewerID": u, "asin": item, "overall": float(1 + (k + n) % 5), "unixReviewTime": 1000 + 10 * k}
            if item == "A5":
                r["summary"], r["reviewText"] = "Fun", f"{u} loved the dungeon"
            elif item == "A4":
                r["reviewText"] = "only text"
            reviews.append(r)
    reviews.append({"reviewerID": "U1", "asin": "A1", "overall": 1.0, "unixReviewTime": 5, "summary": "dup"})
    reviews.append({"reviewerID": "U1", "asin": "Z9", "overall": 3.0, "unixReviewTime": 2000})
    reviews.append({"reviewerID": "U2", "asin": "NT", "overall": 3.0, "unixReviewTime": 2000})
    reviews += [{"reviewerID": "SHORT", "asin": i, "overall": 5.0, "unixReviewTime": 1} for i in ITEMS[:3]]
    return reviews, meta


@pytest.mark.parametrize("gz", [True, False])
def test_amazon_loader(tmp_path, gz):
    reviews, meta = amazon_records()
    ext = ".json.gz" if gz else ".json"
    d = tmp_path / "amazon"
    d.mkdir()
    write(d / f"Video_Games_5{ext}", jsonl(reviews), gz=gz)
    write(d / f"meta_Video_Games{ext}", jsonl(meta), gz=gz)
    data = load_dataset(d)  # min_core defaults to 5 for Amazon data
    assert data.name == "Video_Games"
    assert set(data.sequences) == set(USERS)  # SHORT (3 reviews) dropped
    assert set(data.items) == set(ITEMS)  # Z9 dropped by the 5-core filter, NT for no title
    for u in USERS:
        assert [x.item_id for x in data.sequences[u]] == ITEMS
    u1 = data.sequences["U1"]
    assert u1[0].review == ""  # the first (U1, A1) review is kept, not the later duplicate
    assert u1[3].review == "only text"
    assert u1[4].review == "Fun. U1 loved the dungeon"
    a1 = data.items["A1"]
    assert a1.title == "Space Blaster"
    assert a1.categories == ("Video Games", "PC", "Games")
    assert "<" not in a1.description and "A fast shooter with friends & foes." in a1.description
    assert "Acme" in a1.description
    assert len(data.items["A2"].description) <= 1010
    notes = " | ".join(data.notes)
    assert "without a title" in notes and "5-core" in notes and "repeated" in notes
    test_cases = {c.user_id: c for c in data.split().test}
    assert test_cases["U3"].target == "A5" and test_cases["U3"].review == "Fun. U3 loved the dungeon"
    # without the filter SHORT stays
    raw = load_amazon(d / f"Video_Games_5{ext}", d / f"meta_Video_Games{ext}", min_core=None)
    assert "SHORT" in raw.sequences and "Z9" in raw.items


def test_k_core_is_iterative():
    seqs = {
        "a": [Interaction(i) for i in "xyz"],
        "b": [Interaction(i) for i in "xy"],
        "c": [Interaction(i) for i in "xw"],  # w is rare -> c falls to 1 item -> c dropped -> x falls to 2
    }
    assert {u: [x.item_id for x in s] for u, s in k_core(seqs, 2).items()} == {"a": ["x", "y"], "b": ["x", "y"]}
    assert len(seqs["c"]) == 2  # input untouched


# ---------------------------------------------------------------------------- bad data


def test_missing_column(ml_dir):
    write(ml_dir / "ml-mini.item", "item_id:token\tname:token_seq\n1\tToy Story\n")
    raises_at(lambda: load_dataset(ml_dir), "ml-mini.item", 1, "title", "found columns: item_id, name")
    write(ml_dir / "ml-mini.item", ML_ITEM)
    write(ml_dir / "ml-mini.inter", "user:token\titem_id:token\n7\t1\n")
    raises_at(lambda: load_dataset(ml_dir), "ml-mini.inter", 1, "user_id", "found columns: user, item_id")


def test_wrong_field_count(ml_dir):
    lines = ML_INTER.splitlines(keepends=True)
    lines[2] = "7\t1\t5\n"
    write(ml_dir / "ml-mini.inter", "".join(lines))
    raises_at(lambda: load_dataset(ml_dir), "ml-mini.inter", 3, "expected 4", "found 3")


def test_unknown_item_id(ml_dir):
    write(ml_dir / "ml-mini.inter", ML_INTER + "8\t99\t3\t60\n")
    raises_at(lambda: load_dataset(ml_dir), "ml-mini.inter", 8, "'99'", "ml-mini.item")


def test_empty_title(ml_dir):
    lines = ML_ITEM.splitlines(keepends=True)
    lines[2] = "  \t2\tAction\t1995\n"
    write(ml_dir / "ml-mini.item", "".join(lines))
    raises_at(lambda: load_dataset(ml_dir), "ml-mini.item", 3, "empty title")


def test_non_utf8_byte(ml_dir, tmp_path):
    data = ML_ITEM.encode("utf-8").replace(b"Four Rooms", b"Four R\xf6oms")
    write(ml_dir / "ml-mini.item", data)
    raises_at(lambda: load_dataset(ml_dir), "ml-mini.item", 4, "UTF-8", "0xf6")
    reviews, meta = amazon_records()
    blob = jsonl(meta).encode("utf-8").replace(b"Puzzle Box", b"Puzzle \xff")
    write(tmp_path / "meta_X.json.gz", blob, gz=True)
    write(tmp_path / "X.json.gz", jsonl(reviews), gz=True)
    raises_at(lambda: load_amazon(tmp_path / "X.json.gz", tmp_path / "meta_X.json.gz"), "meta_X.json.gz", 3, "UTF-8")


def test_empty_file(ml_dir):
    write(ml_dir / "ml-mini.inter", "")
    raises_at(lambda: load_dataset(ml_dir), "ml-mini.inter", 1, "empty")


def test_invalid_json_line(tmp_path):
    reviews, meta = amazon_records()
    meta.insert(1, '{"asin": "B1", "title": "broken"')
    write(tmp_path / "meta_Games.json", jsonl(meta))
    write(tmp_path / "reviews_Games.json", jsonl(reviews))
    raises_at(lambda: load_dataset(tmp_path), "meta_Games.json", 2, "invalid JSON")


def test_missing_asin(tmp_path):
    reviews, meta = amazon_records()
    meta.insert(2, {"title": "no asin here"})
    write(tmp_path / "meta_Games.json.gz", jsonl(meta), gz=True)
    write(tmp_path / "reviews_Games.json.gz", jsonl(reviews), gz=True)
    raises_at(lambda: load_dataset(tmp_path), "meta_Games.json.gz", 3, "asin")


def test_review_missing_key(tmp_path):
    reviews, meta = amazon_records()
    del reviews[3]["unixReviewTime"]
    write(tmp_path / "meta_Games.json", jsonl(meta))
    write(tmp_path / "Games.json", jsonl(reviews))
    raises_at(lambda: load_dataset(tmp_path), "Games.json", 4, "unixReviewTime")


def test_nonexistent_path(tmp_path):
    raises_at(lambda: load_dataset(tmp_path / "no-such-data"), "no-such-data", None, "no such", "games-sample")
    raises_at(lambda: load_dataset("nosuch-sample"), "nosuch-sample", None, "no such")


def test_unrecognised_directory(tmp_path):
    write(tmp_path / "ratings.csv", "user,item\n")
    write(tmp_path / "notes.txt", "hello\n")
    err = raises_at(lambda: load_dataset(tmp_path), tmp_path.name, None, "ratings.csv", "notes.txt", ".test.inter")
    assert "meta_" in str(err)
    write(tmp_path / "Games.json", jsonl([{"reviewerID": "u", "asin": "a"}]))
    raises_at(lambda: load_dataset(tmp_path), tmp_path.name, None, "meta_")


def test_full_games_is_shipped_and_splits_as_the_source():
    """The whole Games data ships in the package (the quick start trains on it); its derived
    validation cases are the sample's verbatim validation rows for the same users."""
    full = load_dataset("games")
    assert (len(full.sequences), len(full.items)) == (50546, 16859)
    assert (Path(full.source) / "LICENSE").is_file() and (Path(full.source) / "SOURCE.md").is_file()
    split = full.split()
    assert len(split.train) == 288626 and len(split.valid) == len(split.test) == 50546
    sample = load_dataset("games-sample")
    valid = {c.user_id: c for c in split.valid}
    for case in sample.split().valid:
        assert valid[case.user_id] == case
    assert all(full.title(i) == sample.title(i) for i in sample.items)
