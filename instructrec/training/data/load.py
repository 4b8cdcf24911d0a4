"""One entry point for every supported data layout: :func:`load_dataset`.

>>> data = load_dataset("games")                 # the full Games data shipped with the package
>>> data = load_dataset("games-sample")          # its 3,000-user sample (tests)
>>> data = load_dataset("../shared/data/games")  # RecBole sequence files
>>> split = data.split()
"""

from __future__ import annotations

import re
from pathlib import Path

from instructrec.training.data.amazon import load_amazon
from instructrec.training.data.recbole import contents, load_recbole_atomic, load_recbole_sequences
from instructrec.training.data.types import DataError, InteractionData

SAMPLES_DIR = Path(__file__).resolve().parent / "sample"
FULL_DIR = Path(__file__).resolve().parent / "full"  # whole datasets shipped with the package: "games"
JSON_SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz")
EXPECTED = (
    "expected one of: RecBole sequence files (<Name>.item + <Name>.test.inter [+ .valid.inter]); "
    "RecBole atomic files (<Name>.inter + <Name>.item); Amazon 2018 JSON lines "
    "(<reviews>.json[.gz] + meta_<Category>.json[.gz]); or a shipped dataset name ({samples})"
)


def available_samples() -> list[str]:
    if not SAMPLES_DIR.is_dir():
        return []
    return sorted(p.name for p in SAMPLES_DIR.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def shipped_datasets() -> list[str]:
    """Whole datasets inside the package (``games``: the paper's Games data, see ``full/games/SOURCE.md``)."""
    if not FULL_DIR.is_dir():
        return []
    return sorted(p.name for p in FULL_DIR.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def _expected() -> str:
    names = [*shipped_datasets(), *(f"{n}-sample" for n in available_samples())]
    return EXPECTED.format(samples=", ".join(names) or "none installed")


def sample_path(name: str = "games") -> Path:
    """The directory of a data sample shipped inside the package (``games``: 3,000 users of
    the InstructRec Games data, see ``sample/games/SOURCE.md``)."""
    p = SAMPLES_DIR / name
    if not p.is_dir():
        raise DataError(p, None, f"no shipped sample {name!r}; available: {', '.join(available_samples()) or 'none'}")
    return p


def find_amazon_files(directory: Path) -> tuple[Path, Path] | None:
    """``(reviews, metadata)`` JSON-lines files in ``directory``; None if there are no JSON
    files; DataError if they are incomplete or ambiguous."""
    jsons = sorted(p for p in directory.iterdir() if p.is_file() and p.name.lower().endswith(JSON_SUFFIXES))
    if not jsons:
        return None
    metas = [p for p in jsons if p.name.lower().startswith("meta_")]
    reviews = [p for p in jsons if not p.name.lower().startswith("meta_")]
    if not metas or not reviews:
        missing = "a metadata file meta_<Category>.json[.gz]" if not metas else "a reviews file <Category>.json[.gz]"
        raise DataError(directory, None, f"Amazon-style JSON files found ({contents(directory)}) but no {missing}")
    if len(metas) > 1:
        raise DataError(directory, None, f"more than one metadata file: {', '.join(p.name for p in metas)}")
    if len(reviews) > 1:
        named = [p for p in reviews if "review" in p.name.lower()]
        category = metas[0].name.split(".")[0][len("meta_"):].lower()
        same = [p for p in reviews if p.name.split(".")[0].lower() in (category, f"{category}_5")]
        reviews = named if len(named) == 1 else same if len(same) == 1 else reviews
    if len(reviews) > 1:
        raise DataError(
            directory, None, f"more than one candidate reviews file: {', '.join(p.name for p in reviews)}"
        )
    return reviews[0], metas[0]


def load_dataset(path: str | Path, *, min_core: int | None = None) -> InteractionData:
    """Load the dataset at ``path`` (a directory, or a shipped sample name like
    ``"games-sample"``), choosing the loader from the files inside:

    * ``*.test.inter`` -> :func:`~instructrec.training.data.recbole.load_recbole_sequences`
    * ``*.inter`` + ``*.item`` -> :func:`~instructrec.training.data.recbole.load_recbole_atomic`
    * ``meta_*.json[.gz]`` + a reviews ``*.json[.gz]`` -> :func:`~instructrec.training.data.amazon.load_amazon`

    ``min_core``: k-core filter; None means none for RecBole files (already filtered) and
    5 for raw Amazon data.
    """
    p = Path(path)
    if not p.exists():
        m = re.fullmatch(r"([\w.]+)-sample", str(path))
        if m and m.group(1) in available_samples():
            p = sample_path(m.group(1))
        elif str(path) in shipped_datasets():
            p = FULL_DIR / str(path)
        else:
            raise DataError(p, None, f"no such file or directory; {_expected()}")
    if not p.is_dir():
        raise DataError(p, None, f"is a file, not a dataset directory; {_expected()}")

    if any(f.is_file() for f in p.glob("*.test.inter")):
        return load_recbole_sequences(p, min_core=min_core)
    has_item = any(f.is_file() for f in p.glob("*.item"))
    has_inter = any(f.is_file() and not f.name.endswith((".valid.inter", ".train.inter")) for f in p.glob("*.inter"))
    if has_item and has_inter:
        return load_recbole_atomic(p, min_core=min_core)
    amazon = find_amazon_files(p)
    if amazon is not None:
        return load_amazon(*amazon, min_core=5 if min_core is None else min_core)
    raise DataError(p, None, f"no recognisable dataset files; found: {contents(p)}; {_expected()}")
