"""From a user's need to the model instruction that fits the model's input.

Both training and serving go through :func:`fit`: the history is cut from its oldest
end until the rendered instruction fits the token budget, so the model always sees the
template's wording whole and the most recent interactions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

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
