"""One class per model kind, each running that kind's steps for the ranker and the generator.

The loader (:func:`instructrec.modeling.load_model`) tells a model's kind from its config; this
registry is the one place that maps the kind to the code that runs it.
"""

from __future__ import annotations

from .base import Backend, Head, Steps
from .causal import CausalBackend
from .prefix_lm import PrefixLMBackend, prefix_head
from .seq2seq import Seq2SeqBackend, decoder_parts, t5_scales_decoder_output

BACKENDS: dict[str, type[Backend]] = {b.kind: b for b in (Seq2SeqBackend, PrefixLMBackend, CausalBackend)}


def backend_class(kind: str) -> type[Backend]:
    """The backend that runs models of ``kind`` (a ``LoadedModel.kind``)."""
    try:
        return BACKENDS[kind]
    except KeyError:
        raise ValueError(f"no backend for model kind {kind!r}; known: {', '.join(BACKENDS)}") from None


__all__ = ["Backend", "BACKENDS", "CausalBackend", "Head", "PrefixLMBackend", "Seq2SeqBackend", "Steps",
           "backend_class", "decoder_parts", "prefix_head", "t5_scales_decoder_output"]
