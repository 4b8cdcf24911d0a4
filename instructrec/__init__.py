"""instructrec: recommendation as instruction following (InstructRec, arXiv 2305.07001).

The core package holds the method shared by training and serving: the instruction
format, the template table and its selection, model loading and the likelihood ranker.
The layers above it live beside it and are never imported by it: :mod:`instructrec.training`,
:mod:`instructrec.service` and :mod:`instructrec.bench`.

``from instructrec import Reranker`` is the one-call API (:mod:`instructrec.reranker`). It is
imported on first use, so ``import instructrec`` alone stays light (no torch).
"""

import importlib

__version__ = "0.1.0"

_LAZY = {name: ".reranker" for name in ("Reranker", "RerankerError", "RerankerWarning", "Ranking", "RankedItem",
                                        "Recommendation", "RecommendedItem")}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # found directly next time
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
