"""From a user's need to the model instruction that fits the model's input.

Both training and serving go through :func:`fit`: the history is cut from its oldest
end until the rendered instruction fits the token budget, so the model always sees the
template's wording whole and the most recent interactions. What still does not fit (one
long title, a long request) is cut by :func:`source_token_ids`, again on both paths.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Sequence

from .aspects import TaskForm, UserNeed
from .templates import Rendered, Template, render, select


@dataclass(frozen=True)
class Instruction:
    rendered: Rendered
    history_dropped: int  # oldest history items left out so the instruction fits

    @property
    def source(self) -> str:
        return self.rendered.source

    @property
    def template(self) -> Template:
        return self.rendered.template


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def source_token_ids(tokenizer, texts: Sequence[str], max_tokens: int) -> list[tuple[list[int], int]]:
    """Each instruction's token ids within ``max_tokens``, and how many tokens were cut: the one
    rule for an over-long instruction, used by training's tokenisation
    (:func:`instructrec.training.tune.tokenize_examples`) and by serving
    (:meth:`instructrec.ranker.Ranker.source_ids`, which the generator reads too), so a model is
    served the tokens it was trained on.

    The end is kept. Of the 24 rankable templates 22 end with the sentence that says what to
    answer and 2 with the user's request; most put the request or stated taste after the
    history, and the history runs oldest first. So the end holds the task and the most recent
    interactions (the strongest signal of the next item), the start the template's opening words
    and the oldest items, the ones :func:`fit` drops first. Cutting the end instead would lose
    the task and the newest items. The
    tokenizer's leading special tokens (BERT's ``[CLS]``) stay; the trailing ones (end of
    sequence) stay with the end."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, not {max_tokens}")
    out: list[tuple[list[int], int]] = []
    for a in range(0, len(texts), TOKENIZE_CHUNK):
        out.extend(_cut_to(tokenizer(list(texts[a : a + TOKENIZE_CHUNK]), return_special_tokens_mask=True), max_tokens))
    return out


# Texts tokenised per call: a fast tokenizer keeps every text's whole encoding until the call
# returns. A relay leg tokenised training's 288,626 Games instructions in one call and peaked at
# 13.0 GB; in calls of this many the data build peaks at 3.1 GB (7.2 before) and a whole leg at
# 4.9 GB, so two legs fit one 24 GB machine. The ids are the same.
TOKENIZE_CHUNK = 2048


def _cut_to(encoded, max_tokens: int) -> list[tuple[list[int], int]]:
    """:func:`source_token_ids` on one tokenizer call's output."""
    out = []
    for ids, special in zip(encoded["input_ids"], encoded["special_tokens_mask"]):
        cut = len(ids) - max_tokens
        if cut <= 0:
            out.append((ids, 0))
            continue
        lead = 0
        while lead < max_tokens and special[lead]:
            lead += 1
        out.append((ids[:lead] + ids[lead + cut :], cut))
    return out


def fit(template: Template, need: UserNeed, tokenizer, max_tokens: int, **render_kw) -> Instruction:
    """Render ``template`` for ``need``, dropping the oldest history items until it fits."""
    rendered = render(template, need, **render_kw)
    if count_tokens(tokenizer, rendered.source) <= max_tokens or len(need.history) <= 1:
        return Instruction(rendered, 0)
    # Binary search the number of most recent items that fits (at least one is kept).
    lo, hi = 1, len(need.history) - 1
    best = replace(need, history=need.history[-1:])
    while lo <= hi:
        mid = (lo + hi) // 2
        trial = replace(need, history=need.history[-mid:])
        if count_tokens(tokenizer, render(template, trial, **render_kw).source) <= max_tokens:
            best, lo = trial, mid + 1
        else:
            hi = mid - 1
    return Instruction(render(template, best, **render_kw), len(need.history) - len(best.history))


def build(need: UserNeed, tokenizer, max_tokens: int, *, task: TaskForm = TaskForm.RERANK, template_id: str | None = None,
          rng: random.Random | None = None) -> Instruction:
    """Select the template for ``need`` (the one selection function) and fit it: the serving entry point."""
    template = select(need, task=task, template_id=template_id, rng=rng, rankable=True)
    return fit(template, need, tokenizer, max_tokens)
