"""Model kinds are backend classes: the loaded model picks one, and the ranker and the generator
run through that same object (real tiny models of each kind)."""

from __future__ import annotations

import pytest
import torch

from instructrec.backends import BACKENDS, CausalBackend, PrefixLMBackend, Seq2SeqBackend, backend_class
from instructrec.catalogue import CatalogueItem, build_catalogue
from instructrec.generation import Generator
from instructrec.modeling import (CAUSAL, PREFIX_LM, SEQ2SEQ, TINY, TINY_CAUSAL, TINY_PREFIX, TINY_T5, kind_of,
                                  load_model)
from instructrec.ranker import Ranker

torch.set_num_threads(1)

TITLES = ["Halo 3", "Halo Reach", "Portal 2", "Mario Kart 8"]


@pytest.mark.parametrize("name, kind, cls", [(TINY, SEQ2SEQ, Seq2SeqBackend), (TINY_T5, SEQ2SEQ, Seq2SeqBackend),
                                             (TINY_PREFIX, PREFIX_LM, PrefixLMBackend),
                                             (TINY_CAUSAL, CAUSAL, CausalBackend)])
def test_each_kind_gets_its_backend_shared_by_ranker_and_generator(name, kind, cls):
    loaded = load_model(name, device="cpu", dtype="float32")
    ranker = Ranker(loaded, max_target_tokens=12)
    assert loaded.kind == kind == kind_of(loaded.model.config) and type(ranker.backend) is cls and ranker.kind == kind
    assert ranker.backend.ranker is ranker and ranker.backend.model is loaded.model
    catalogue = build_catalogue([CatalogueItem(str(i), t) for i, t in enumerate(TITLES)], ranker.tokenizer,
                                eos=ranker.eos, max_target_tokens=ranker.max_target_tokens)
    generator = Generator(ranker, catalogue)
    assert generator.backend is ranker.backend
    # the generator's steps are the backend's: with the beam as wide as the catalogue it is the ranker's sort
    found = {r.title: r.score for r in generator.top_k("a shooter", len(TITLES), beams=len(TITLES))}
    scores = dict(zip(TITLES, ranker.score("a shooter", TITLES).scores))
    assert found.keys() == scores.keys()
    assert all(abs(found[t] - scores[t]) < 1e-4 for t in TITLES)


def test_kind_is_read_only_and_unknown_kinds_are_refused():
    ranker = Ranker(load_model(TINY, device="cpu", dtype="float32"))
    with pytest.raises(AttributeError):
        ranker.kind = CAUSAL
    assert set(BACKENDS) == {SEQ2SEQ, PREFIX_LM, CAUSAL}
    with pytest.raises(ValueError, match="no backend for model kind 'rnn'"):
        backend_class("rnn")
    with pytest.raises(NotImplementedError, match="does not train causal models"):
        CausalBackend.candidate_states(None, None, None, None, None)


def test_what_each_kind_tells_the_ranker_and_the_service():
    """The per-kind numbers the ranker and the service's warm-up ask for come from the backend."""
    seq2seq = Ranker(load_model(TINY, device="cpu", dtype="float32"))
    assert seq2seq.backend.encoder() is seq2seq.model.get_encoder() and seq2seq.kv_row_bytes(20) > 0
    assert seq2seq.backend.shares_passes() and not Ranker(seq2seq.loaded, share_cross_kv=False).backend.shares_passes()
    assert seq2seq.warm_instruction_lengths() == []
    prefix = Ranker(load_model(TINY_PREFIX, device="cpu", dtype="float32"), max_target_tokens=16)
    assert prefix.backend.encoder() is None and prefix.backend.shares_passes() and prefix.kv_row_bytes(20) > 0
    assert prefix.max_source_tokens == 512 - 16  # the instruction and its candidate share the positions
    causal = Ranker(load_model(TINY_CAUSAL, device="cpu", dtype="float32"))
    assert causal.backend.encoder() is None and not causal.backend.shares_passes()
    assert causal.kv_row_bytes(20) == 0 and causal.warm_instruction_lengths() == []


def test_warm_up_reaches_the_last_padded_length_within_the_positions():
    """With a candidate limit that leaves an instruction limit between two padded lengths (512 - 12
    = 500), the last padded length (512) is warmed with the 500 tokens that pad to it."""
    ranker = Ranker(load_model(TINY_PREFIX, device="cpu", dtype="float32"), max_target_tokens=12)
    assert ranker.max_source_tokens == 500
    assert ranker.warm_instruction_lengths()[-2:] == [496, 512]
