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
from .templates import HISTORY_SEPARATOR, Rendered, Template, history_entries, render, render_history, select


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
    """Render ``template`` for ``need``, dropping the oldest history items until it fits: the most
    recent items that fit (at least one is kept).

    The number kept is guessed from the whole rendering's tokens (each history item's share,
    found by the tokens' character offsets) and verified with the guess and one item more, so
    three tokenisations settle what a binary search over a history of 20 took five or six for;
    a wrong guess (token counts that are not additive across items) falls back to that binary
    search in the range the two verifications left. Either way the result is the largest count
    that fits, as long as keeping more items never takes fewer tokens."""
    rendered = render(template, need, **render_kw)
    n = len(need.history)
    if n <= 1:
        return Instruction(rendered, 0)
    offsets = bool(getattr(tokenizer, "is_fast", False))  # a slow tokenizer gives no offsets
    full = tokenizer(rendered.source, return_offsets_mapping=offsets)
    if len(full["input_ids"]) <= max_tokens:
        return Instruction(rendered, 0)

    def fits(k: int) -> bool:
        trial = replace(need, history=need.history[-k:])
        return count_tokens(tokenizer, render(template, trial, **render_kw).source) <= max_tokens

    lo, hi, best = 1, n - 1, 1  # the answer: the largest count in [lo, hi] that fits, else best
    guess = _guess_kept(rendered.source, need.history, full, max_tokens) if offsets else None
    if guess is not None:
        if not fits(guess):
            hi = guess - 1
        elif guess == n - 1 or not fits(guess + 1):
            best, lo = guess, n  # settled
        else:
            best, lo = guess + 1, guess + 2
    while lo <= hi:  # a binary search over what the verifications left
        mid = (lo + hi) // 2
        if fits(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    kept = replace(need, history=need.history[-best:])
    return Instruction(render(template, kept, **render_kw), n - best)


def _guess_kept(source: str, history: Sequence[str], encoded, max_tokens: int) -> int | None:
    """How many of the most recent ``history`` items the rendering ``source`` (tokenised in
    ``encoded``, with offsets) can keep within ``max_tokens``, counting each item's tokens where
    it stands; None when the rendered history is not found in ``source``."""
    at = source.find(render_history(history))
    if at < 0:
        return None
    ends, pos = [], at  # each item's end in source, its separator included
    for entry in history_entries(history):
        pos += len(entry) + len(HISTORY_SEPARATOR)
        ends.append(pos)
    ends[-1] -= len(HISTORY_SEPARATOR)  # the last item has none
    per_item = [0] * len(history)
    item = 0
    for start, stop in encoded["offset_mapping"]:
        if stop <= start or start < at or start >= ends[-1]:
            continue
        while start >= ends[item]:
            item += 1
        per_item[item] += 1
    excess, dropped = len(encoded["input_ids"]) - max_tokens, 0
    while excess > 0 and dropped < len(history) - 1:
        excess -= per_item[dropped]
        dropped += 1
    return len(history) - dropped


def build(need: UserNeed, tokenizer, max_tokens: int, *, task: TaskForm = TaskForm.RERANK, template_id: str | None = None,
          rng: random.Random | None = None) -> Instruction:
    """Select the template for ``need`` (the one selection function) and fit it: the serving entry point."""
    template = select(need, task=task, template_id=template_id, rng=rng, rankable=True)
    return fit(template, need, tokenizer, max_tokens)
