"""An instruction still over the source-token limit after :func:`instructrec.instruction.fit` (one
very long title) is cut by one rule on every path: training's tokenisation, the ranker and the
generator see the same token ids. Two tokenizer layouts: BERT's (``[CLS] ... [SEP]``, the MiniLM
tokenizer) and T5's (``... </s>``, no leading special token: a real ``tokenizers`` word-level
tokenizer with T5's post-processor)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from instructrec.aspects import UserNeed
from instructrec.catalogue import CatalogueItem, build_catalogue
from instructrec.generation import Generator
from instructrec.instruction import fit, source_token_ids
from instructrec.modeling import TINY, LoadedModel, build_base, minilm_tokenizer
from instructrec.ranker import Ranker, eos_id
from instructrec.templates import get_template, render
from instructrec.training.instructions import Example
from instructrec.training.presets import PRESETS
from instructrec.training.tune import tokenize_examples

torch.set_num_threads(1)

LIMIT = 48
LONG_TITLE = "Ultimate Deluxe Collector Edition " * 20 + "Halo Reach"
NEED = UserNeed(history=("Portal", LONG_TITLE))
TASK = "Name the item this user is most likely to interact with next."
TITLES = ["Halo Reach", "Portal 2", "Mario Kart 8", "Zelda"]


def _instruction(tokenizer) -> str:
    inst = fit(get_template("pref-01"), NEED, tokenizer, LIMIT)
    assert inst.history_dropped == 1 and inst.source.endswith(f"{LONG_TITLE}. {TASK}")  # fit did what it could
    return inst.source


def _eos_only(texts: list[str]):
    """A tokenizer in T5's layout, no model hub: words, then ``</s>``; no leading special token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _t5_layout() -> LoadedModel:
    from transformers import T5Config, T5ForConditionalGeneration

    template = get_template("pref-01")
    texts = [render(template, NEED).source, render(template, UserNeed(history=NEED.history[-1:])).source, *TITLES]
    tokenizer = _eos_only(texts)
    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name="t5-layout", kind="seq2seq", device=torch.device("cpu"),
                       dtype=torch.float32)


def _bert_layout() -> LoadedModel:
    model, tokenizer, kind = build_base(TINY)
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, name=TINY, kind=kind, device=torch.device("cpu"),
                       dtype=torch.float32)


@pytest.mark.parametrize("layout", ["bert", "t5"])
def test_training_and_serving_cut_an_over_long_instruction_alike(layout):
    loaded = _bert_layout() if layout == "bert" else _t5_layout()
    tokenizer = loaded.tokenizer
    source = _instruction(tokenizer)
    full = tokenizer(source)["input_ids"]
    assert len(full) > LIMIT + 20

    preset = dataclasses.replace(PRESETS["smoke"], max_source_tokens=LIMIT)
    ranker = Ranker(loaded, max_source_tokens=LIMIT, max_target_tokens=preset.max_target_tokens)
    example = Example(source=source, target="Halo Reach", template_id="pref-01", instantiation="<P1,I0,T2>",
                      strategy="plain", target_form="item", teacher=None, user_id="u", item_id="i")
    trained = tokenize_examples([example], tokenizer, preset, eos_id(tokenizer, loaded.model))[0]["input_ids"]
    served, cut = ranker.source_ids(source)
    assert trained == served == ranker.encode(source, TITLES).source
    assert len(served) == LIMIT and cut == len(full) - LIMIT

    # the end is kept (the newest title and the task), the special tokens stay where they were
    if layout == "bert":
        assert served[0] == tokenizer.cls_token_id and served[1:] == full[-(LIMIT - 1):]
        assert served[-1] == tokenizer.sep_token_id
    else:
        assert served == full[-LIMIT:] and served[-1] == tokenizer.eos_token_id
    text = tokenizer.decode(served, skip_special_tokens=True).lower()
    assert text.endswith(f"halo reach. {TASK}".lower()) and "oldest first" not in text
    # the right-hand cut training used to make kept the opening and lost the task
    right = tokenizer(source, truncation=True, max_length=LIMIT)["input_ids"]
    assert "oldest first" in tokenizer.decode(right).lower() and TASK.lower() not in tokenizer.decode(right).lower()
    assert ranker.score(source, TITLES).source_truncated == cut


def test_the_generator_reads_the_same_ids():
    loaded = _bert_layout()
    ranker = Ranker(loaded, max_source_tokens=LIMIT, max_target_tokens=12)
    catalogue = build_catalogue([CatalogueItem(f"id-{i}", t) for i, t in enumerate(TITLES)], loaded.tokenizer,
                                eos=ranker.eos, max_target_tokens=12)
    generator = Generator(ranker, catalogue)
    source = _instruction(loaded.tokenizer)
    preset = dataclasses.replace(PRESETS["smoke"], max_source_tokens=LIMIT)
    example = Example(source, "Zelda", "pref-01", "<P1,I0,T2>", "plain", "item", None, "u", "i")
    trained = tokenize_examples([example], loaded.tokenizer, preset, ranker.eos)[0]["input_ids"]
    from_text = generator.generate(source, 4, beams=4).items
    from_ids = generator.generate(trained, 4, beams=4).items
    assert [(r.item, r.score) for r in from_text] == [(r.item, r.score) for r in from_ids]
    # and those are the ranker's scores of the titles for that instruction
    scores = ranker.score(source, TITLES).scores
    assert [r.score for r in from_text] == pytest.approx([scores[r.item] for r in from_text], abs=1e-4)


def test_the_rule_leaves_what_fits_alone():
    tok = minilm_tokenizer()
    texts = ["a short instruction", "one two three four five six seven eight"]
    exact = len(tok(texts[1])["input_ids"])
    assert source_token_ids(tok, texts, exact) == [(tok(t)["input_ids"], 0) for t in texts]
    ids, cut = source_token_ids(tok, [texts[1]], exact - 3)[0]
    assert cut == 3 and tok.decode(ids) == "[CLS] four five six seven eight [SEP]"
    assert source_token_ids(tok, [], 8) == []
    with pytest.raises(ValueError, match="at least 1"):
        source_token_ids(tok, texts, 0)


def test_many_texts_are_tokenised_in_calls_that_give_the_same_ids(monkeypatch):
    """Long lists (training's whole instruction stream) go to the tokenizer a chunk at a time,
    which bounds the memory its encodings take; the ids and the cuts are those of one call."""
    from instructrec import instruction

    tokenizer = minilm_tokenizer()
    texts = [_instruction(tokenizer), "Portal 2", "", f"Halo Reach. {TASK}", LONG_TITLE, "Zelda"] * 3
    whole = source_token_ids(tokenizer, texts, LIMIT)
    monkeypatch.setattr(instruction, "TOKENIZE_CHUNK", 4)
    assert source_token_ids(tokenizer, texts, LIMIT) == whole
    assert len(whole) == len(texts) and any(cut for _, cut in whole) and any(not cut for _, cut in whole)
    assert source_token_ids(tokenizer, [], LIMIT) == []
