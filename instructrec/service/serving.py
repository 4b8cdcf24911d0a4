"""What the ``serving_*`` handlers share: the need a request describes, and the parts of an
answer more than one endpoint returns (template, fusion, a result's components), built as the
response models of :mod:`.schemas`. No web framework here: a handler takes a validated request
and returns a response model, and the edge (:mod:`.routes`) serialises it.

Answers are assembled with ``model_construct``: every value is the service's own and already of
its field's type, so validating it again would only cost time per result (and could turn a
relevance a rounding step above 1 into a 500). :func:`answer_body` dumps only the fields a
handler set, which is how an optional field stays out of an answer that has none.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from instructrec.aspects import UserNeed
from instructrec.reranker import user_need
from instructrec.templates import TEMPLATE_VERSION

from . import pipeline
from .schemas import Components, FusionInfo, ModelInfo, NeedRequest, TemplateInfo
from .state import ServiceState


def need_of(req: NeedRequest) -> UserNeed:
    """The user's need a /rerank or /recommend request describes: the core's one reading of it
    (:func:`instructrec.reranker.user_need`), which ``Reranker`` and ``rank`` share."""
    return user_need([h.title for h in req.history], instruction=req.instruction, preference=req.preference,
                     intention=req.intention.text if req.intention is not None else None,
                     intention_kind=req.intention.kind if req.intention is not None else "specific")


def item_id(value) -> str | None:
    """An item id as the behaviour index names items (a string), None when not given."""
    return None if value is None or isinstance(value, bool) else str(value)


class Prebuilt(list):
    """A list field's items already as the JSON objects their response model would dump to (the
    fields set, in declared order): a handler's hot path that builds 100 results as dicts skips
    100 ``model_construct`` and ``model_dump`` calls (about a millisecond; the dicts take a
    tenth of that). ``tests/test_response_models.py`` validates them against the model."""


def answer_body(answer: BaseModel) -> dict[str, Any]:
    """A response model as the JSON object the client gets: the fields set, in declared order
    (a :class:`Prebuilt` field as it is)."""
    prebuilt = {name for name in answer.model_fields_set if isinstance(getattr(answer, name), Prebuilt)}
    if not prebuilt:
        return answer.model_dump(exclude_unset=True)
    body = answer.model_dump(exclude_unset=True, exclude=prebuilt)
    return {name: getattr(answer, name) if name in prebuilt else body[name]
            for name in type(answer).model_fields if name in prebuilt or name in body}


class Serving:
    """A handler of one endpoint family, over the running service's state."""

    def __init__(self, state: ServiceState):
        self.state = state
        # the engine current when the request came in: it prepares, scores and names the answer,
        # even when a model swap comes between (None before the first model is loaded)
        self.engine = state.engine

    def model_info(self) -> ModelInfo:
        return ModelInfo.model_construct(**self.engine.model_info())

    def hybrid_versions(self) -> dict[str, str | None]:
        """The gate's and the hybrid's versions (None without a gate)."""
        hybrid = self.engine.hybrid
        return {"gate_version": hybrid.gate.version if hybrid else None,
                "hybrid_version": hybrid.version if hybrid else None}


def template_info(inst) -> TemplateInfo:
    """The template an answer was made with."""
    return TemplateInfo.model_construct(id=inst.template.id, label=inst.template.label,
                                        instantiation=inst.rendered.instantiation.label(),
                                        table_version=TEMPLATE_VERSION)


def fusion_info(out: pipeline.Outcome, versions: dict[str, str | None]) -> FusionInfo:
    """How a rerank answer was scored."""
    f = out.fusion
    return FusionInfo.model_construct(mode=f.mode, requested=f.requested, **versions, signals=f.signals,
                                      weights=f.fused.weights if f.fused is not None else None,
                                      without_behaviour=f.without_behaviour)


def components(out: pipeline.Outcome, i: int) -> Components | None:
    """One fused result's parts (only the signals present are set); None when LM-only."""
    body = components_body(out, i)
    return None if body is None else Components.model_construct(**body)


_COMPONENTS = tuple(Components.model_fields)  # declared order: what model_dump would write


def components_body(out: pipeline.Outcome, i: int) -> dict[str, float] | None:
    """:func:`components` as the JSON object it dumps to."""
    fused = out.fusion.fused
    if fused is None:
        return None
    parts = {name: float(values[i]) for name, values in fused.components.items()}
    parts["lm_loglik"] = out.scores[i]
    return {name: parts[name] for name in _COMPONENTS if name in parts}
