"""Make the small data sample shipped in ``instructrec/training/data/sample/games``.

    python -m instructrec.training.data.make_sample --source ../shared/data/games --users 3000 --seed 0 \\
        --out instructrec/training/data/sample/games

Draws a seeded sample of users from RecBole leave-one-out sequence files, copies their
``*.test.inter`` and ``*.valid.inter`` rows verbatim (original ids, file order) and writes
an ``.item`` file restricted to the items those users touch. Copies ``LICENSE`` and writes
``SOURCE.md``. Deterministic: the same source, ``--users`` and ``--seed`` give the same bytes.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path

from instructrec.training.data.recbole import load_recbole_sequences, one_file, read_lines

SOURCE_TEMPLATE = """\
# Games sample: source and licence

A deterministic subset of the Amazon Review Data 2018 "Video Games" category
(Jianmo Ni, Jiacheng Li, Julian McAuley, *Justifying recommendations using
distantly-labeled reviews and fine-grained aspects*, EMNLP 2019;
https://nijianmo.github.io/amazon/), as processed by RUCAIBox for LLMRank
(https://github.com/RUCAIBox/LLMRank) — the InstructRec paper's Games data: 5-core
filtered, chronological leave-one-out sequences, item titles only. The processed
files are MIT-licensed by RUCAIBox; see `LICENSE` in this folder.

## What is here

{users} users drawn with seed {seed} from the {total_users} users of the full data, and
the {items} items they interacted with ({interactions} interactions). Each user's full
sequence is kept; the sample is not re-filtered, so within it many items occur only once.

| file | content |
| --- | --- |
| `{name}.item` | `item_id:token  title:token_seq`, restricted to the sampled users' items |
| `{name}.test.inter` | `user_id:token  item_id_list:token_seq  item_id:token`: full history (oldest first) and the test target |
| `{name}.valid.inter` | the same without the last item: history and the validation target |

Rows are copied verbatim from `{src_test}`, `{src_valid}` and `{src_item}`
(original user and item ids, original order).

## How it was made

```
python -m instructrec.training.data.make_sample --source {source_arg} --users {users} --seed {seed} --out {out_arg}
```

Load it with `instructrec.training.data.load.load_dataset("games-sample")`.
"""


def _rows(path: Path) -> tuple[str, list[str]]:
    lines = [line for line in read_lines(path) if line.strip()]
    return lines[0], lines[1:]


def make_sample(source: Path, out: Path, users: int, seed: int, source_arg: str | None = None, out_arg: str | None = None) -> dict[str, int]:
    full = load_recbole_sequences(source)  # validates the source before copying anything
    test_path = one_file(source, "*.test.inter")
    prefix = test_path.name[: -len(".test.inter")]
    valid_path = source / f"{prefix}.valid.inter"
    item_path = one_file(source, "*.item", prefer=(prefix, prefix.rsplit("-", 1)[0]))
    name = item_path.name.split(".")[0]

    all_users = list(full.sequences)  # file order
    chosen = set(random.Random(seed).sample(all_users, users)) if users < len(all_users) else set(all_users)
    used = {x.item_id for u in chosen for x in full.sequences[u]}

    out.mkdir(parents=True, exist_ok=True)
    header, rows = _rows(test_path)
    (out / f"{name}.test.inter").write_text(
        "\n".join([header, *(r for r in rows if r.split("\t", 1)[0].strip() in chosen)]) + "\n", encoding="utf-8"
    )
    if valid_path.is_file():
        header, rows = _rows(valid_path)
        (out / f"{name}.valid.inter").write_text(
            "\n".join([header, *(r for r in rows if r.split("\t", 1)[0].strip() in chosen)]) + "\n", encoding="utf-8"
        )
    header, rows = _rows(item_path)
    (out / f"{name}.item").write_text(
        "\n".join([header, *(r for r in rows if r.split("\t", 1)[0].strip() in used)]) + "\n", encoding="utf-8"
    )
    if (source / "LICENSE").is_file():
        shutil.copyfile(source / "LICENSE", out / "LICENSE")
    stats = {
        "users": len(chosen),
        "items": len(used),
        "interactions": sum(len(full.sequences[u]) for u in chosen),
        "total_users": len(all_users),
    }
    (out / "SOURCE.md").write_text(
        SOURCE_TEMPLATE.format(
            name=name,
            seed=seed,
            src_test=test_path.name,
            src_valid=valid_path.name,
            src_item=item_path.name,
            source_arg=source_arg or source,
            out_arg=out_arg or out,
            **stats,
        ),
        encoding="utf-8",
    )
    check = load_recbole_sequences(out)
    assert len(check.sequences) == stats["users"] and len(check.items) == stats["items"], "sample does not reload"
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, help="directory with <Name>.item and <Name>*.test.inter/.valid.inter")
    ap.add_argument("--users", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    stats = make_sample(Path(args.source), Path(args.out), args.users, args.seed, args.source, args.out)
    size = sum(p.stat().st_size for p in Path(args.out).iterdir() if p.is_file())
    print(f"{stats['users']} users, {stats['items']} items, {stats['interactions']} interactions, {size} bytes -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
