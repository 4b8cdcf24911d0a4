"""Request and response models of the HTTP API.

Requests are validated strictly (no "3" for 3, no "yes" for true) with the service's
limits passed as validation context (``max_text_chars``, ``max_candidates``,
``max_history``), so every error names the offending field. Texts are normalised the
same way everywhere (Unicode NFC, whitespace runs collapsed to one space, trimmed, by
:func:`instructrec.text.normalise`): the model and the cache key both see the normalised text.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator,
                      model_validator)

from instructrec.generation import MAX_K
from instructrec.text import normalise  # the core's normaliser: the offline evaluation applies the same one


def _check_text(value: str, info: ValidationInfo) -> str:
    return clean_text(value, (info.context or {}).get("max_text_chars"))


def clean_text(value: str, limit: int | None) -> str:
    """A text checked (valid Unicode, at most ``limit`` characters) and normalised."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("contains invalid Unicode (a lone surrogate)") from None
    if limit is not None and len(value) > limit:
        raise ValueError(f"is {len(value)} characters long; the limit is {limit}")
    return normalise(value)


def _non_empty(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


Text = Annotated[str, AfterValidator(_check_text)]
NonEmptyText = Annotated[str, AfterValidator(_check_text), AfterValidator(_non_empty)]


def _as_title(value: Any) -> Any:
    return {"title": value} if isinstance(value, str) else value


def _limit(name: str, what: str):
    def check(value: Any, info: ValidationInfo) -> Any:
        limit = (info.context or {}).get(name)
        if limit is not None and isinstance(value, list) and len(value) > limit:
            raise ValueError(f"has {len(value)} {what}; the limit is {limit}")
        return value

    return check


# --- native /rerank ----------------------------------------------------------------------


class Intention(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    text: NonEmptyText = Field(description="what the user is looking for now")
    kind: Literal["vague", "specific"] = Field("specific", description="vague (I1) or specific (I2)")


class HistoryItem(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    id: str | int | None = None
    title: Text


class Candidate(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    id: str | int | None = Field(None, description="echoed back in the result")
    title: NonEmptyText


FusionMode = Literal["auto", "lm-only"]


class NeedRequest(BaseModel):
    """The user's need, as both /rerank and /recommend take it.

    ``instruction`` is the user's own free-text request: it fills the intention slot (as a
    vague intention, I1) when no ``intention`` object is given, and is added to the
    instruction as free context otherwise.
    """

    model_config = ConfigDict(extra="forbid", strict=True)
    instruction: Text | None = Field(None, description="free-text request of the user")
    preference: Text | None = Field(None, description="explicit preference in the user's words (P2)")
    intention: Intention | None = Field(None, description="current intention (I1 vague / I2 specific)")
    history: list[Annotated[HistoryItem, BeforeValidator(_as_title)]] = Field(
        default_factory=list, description="past item titles or {id, title}, oldest first (P1)")
    template: str | None = Field(None, min_length=1, max_length=64, description="template id override")

    _max_history = field_validator("history", mode="before")(_limit("max_history", "history items"))


class RerankRequest(NeedRequest):
    """The user's need plus the candidates to rank."""

    candidates: list[Annotated[Candidate, BeforeValidator(_as_title)]] = Field(
        min_length=1, description="titles or {id, title, ...} to rank")
    top_n: int | None = Field(None, ge=1, description="return only the best N (default: all)")
    return_scores: bool = Field(True, description="include scores (the fused score, or the mean log-likelihood of "
                                "the title when LM-only) with their relevance and components")
    fusion: FusionMode = Field("auto", description="auto: the LM fused with the behaviour and semantic signals by "
                               "the service's gate, LM-only on a service without a gate; lm-only: the LM alone")

    _max_candidates = field_validator("candidates", mode="before")(_limit("max_candidates", "candidates"))


ItemId = Annotated[str | int, AfterValidator(lambda v: str(v))]


MetaValue = str | int | float | bool


class RecommendFilter(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    ids: list[ItemId] | None = Field(None, min_length=1, description="only these catalogue items may be recommended")
    exclude_ids: list[ItemId] = Field(default_factory=list, description="these items are never recommended")
    meta: dict[str, MetaValue | Annotated[list[MetaValue], Field(min_length=1)]] | None = Field(
        None, min_length=1, description="only items whose catalogue metadata has, for every key given, the value "
        "given or one of the values listed (a list in the metadata matches when it holds one of them)")


class RecommendRequest(NeedRequest):
    """The user's need; the model writes the items itself, from the service's catalogue (T2)."""

    top_n: int | None = Field(None, ge=1, le=MAX_K, description="how many items to recommend (default 10; the name "
                              "/rerank uses)")
    k: int | None = Field(None, ge=1, le=MAX_K, json_schema_extra={"deprecated": True},
                          description="deprecated: the earlier name of top_n, still accepted")
    exclude_history: bool = Field(True, description="never recommend an item of the history (matched by id, "
                                  "else by title)")
    filter: RecommendFilter | None = None
    fusion: FusionMode = Field("auto", description="auto: with a gate, the model's own k and what the sequential "
                               "model, the behaviour index and the semantic encoder retrieve, ranked by the fused "
                               "scorer; lm-only: the model's own k")

    @field_validator("k")
    @classmethod
    def _k_agrees(cls, k, info: ValidationInfo):
        top_n = info.data.get("top_n")
        if k is not None and top_n is not None and k != top_n:
            raise ValueError(f"is the deprecated name of top_n and disagrees with it ({k} vs {top_n}): give top_n only")
        return k

    @model_validator(mode="after")
    def _default_top_n(self):
        if self.top_n is None:
            self.top_n = self.k or 10
        return self


class RecommendedItem(BaseModel):
    id: str
    title: str
    score: float = Field(description="fused: the fused score /rerank gives the item among the ranked ones; LM-only: "
                         "the title's mean (or sum) token log-likelihood")
    relevance: float | None = Field(None, description="fused: the calibrated probability among the ranked items")
    components: "Components | None" = Field(None, description="fused: the signals the score is made of")


class CatalogueInfo(BaseModel):
    version: str = Field(description="content digest of the catalogue file")
    items: int
    allowed: int = Field(description="items this request could receive after its filter and exclusions")


class RecommendUsage(BaseModel):
    source_tokens: int = Field(description="instruction tokens the model sees")
    steps: int = Field(description="decoding steps the beam search ran (0 when answered from the cache)")
    ranked: int | None = Field(None, description="fused: items the fused scorer ranked (the model's own k and what "
                               "the signals retrieved); null when LM-only")


class AnswerCache(BaseModel):
    enabled: bool = Field(description="a cache is configured and was usable for this request")
    hit: bool


class RecommendResponse(BaseModel):
    id: str
    results: list[RecommendedItem]
    fusion: "FusionInfo | None" = None
    template: "TemplateInfo"
    model: "ModelInfo"
    catalogue: CatalogueInfo
    usage: RecommendUsage
    cache: AnswerCache
    truncated: "InstructionTruncation"


class Components(BaseModel):
    """A fused result's parts: each present signal z-scored within the request (the fused score
    is ``lm + weights.behaviour * behaviour + weights.semantic * semantic + weights.sequential * sequential``),
    and the LM's raw score."""

    lm: float = Field(description="the LM's score, z-scored within the request")
    behaviour: float | None = Field(None, description="item-to-item counts from the history, z-scored (absent: "
                                    "no behaviour signal for this request)")
    semantic: float | None = Field(None, description="MiniLM similarity of the need to the candidate, z-scored")
    sequential: float | None = Field(None, description="the sequential model's (SASRec's) score from the history, "
                                     "z-scored (absent: no sequential model, or nothing it knows)")
    lm_loglik: float = Field(description="the LM's raw score: mean (or sum) token log-likelihood")


class RankedItem(BaseModel):
    index: int = Field(description="position of the candidate in the request")
    id: str | int | None = None
    title: str
    score: float | None = Field(None, description="what the ranking is sorted by: the fused score when fused, else "
                                "the mean (or sum) token log-likelihood; null if return_scores is false")
    relevance: float | None = Field(None, ge=0, le=1, description="fused: the calibrated probability that this is "
                                    "the candidate the user takes (sums to 1 over the request); null when LM-only")
    components: Components | None = Field(None, description="fused: the signals the score is made of; null when LM-only")
    cached: bool = Field(description="the LM score came from the cache")


class FusionInfo(BaseModel):
    """How the answer was scored."""

    mode: Literal["fused", "lm-only"] = Field(description="fused: the gate's fusion of the signals; lm-only: the LM "
                                              "alone (asked for, or the service has no gate)")
    requested: FusionMode
    gate_version: str | None = Field(description="the service's gate (null: none)")
    hybrid_version: str | None = Field(description="gate, behaviour index and semantic encoder versions (null: no gate)")
    signals: list[str] = Field(description="the signals this answer used (lm, behaviour, semantic)")
    weights: dict[str, float] | None = Field(description="the gate's weight of each used signal for this request "
                                             "(lm's is 1 plus a gated term); null when LM-only")
    without_behaviour: list[int] | None = Field(description="request indices of candidates without behaviour signal "
                                                "(all of them when no history item or no candidate is known to the "
                                                "index, or the service has none); null when LM-only")


class TemplateInfo(BaseModel):
    id: str
    label: str = Field(description="the template's <P,I,T> in the table, e.g. <P1,(P2),I1/I2,T3>")
    instantiation: str = Field(description="the <P,I,T> this request actually used")
    table_version: str


class ModelInfo(BaseModel):
    name: str
    checkpoint_version: str


class Usage(BaseModel):
    source_tokens: int = Field(description="instruction tokens the model sees")
    candidate_tokens: int = Field(description="candidate tokens over all candidates")
    scored_tokens: int = Field(description="tokens run through the model for this request (cache misses only)")
    total_tokens: int


class CacheInfo(BaseModel):
    enabled: bool = Field(description="a cache is configured and was usable for this request")
    hits: int
    misses: int


class InstructionTruncation(BaseModel):
    history_dropped: int = Field(description="oldest history items left out so the instruction fits")
    source_tokens_cut: int = Field(description="instruction tokens cut (0 unless the template text alone is too long)")


class Truncation(InstructionTruncation):
    candidates_cut: list[int] = Field(description="request indices of candidates cut to the token limit")


class RerankResponse(BaseModel):
    id: str
    results: list[RankedItem]
    template: TemplateInfo
    model: ModelInfo
    usage: Usage
    cache: CacheInfo
    truncated: Truncation
    fusion: FusionInfo


# --- Cohere/Jina-compatible /v1/rerank and /v2/rerank -----------------------------------


class CompatRerankRequest(BaseModel):
    """A Cohere (v1 or v2) or Jina rerank request. ``query`` becomes a specific intention (I2)
    with no history. A document is a string or an object; of an object, the ``rank_fields``
    (default ``["text"]``) make the text the model scores (:meth:`candidate_texts`), and every
    field comes back unchanged with ``return_documents``."""

    model_config = ConfigDict(extra="ignore", strict=True)  # clients send max_chunks_per_doc, priority, ...
    model: str | None = Field(None, description="accepted and ignored: the served model answers")
    query: NonEmptyText
    documents: list[str | dict[str, Any]] = Field(min_length=1, description="strings or objects")
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False
    rank_fields: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=1, description="fields of a document object that make its text (default: text)")
    max_tokens_per_doc: int | None = Field(None, ge=1, description="cut each document to this many tokens "
                                           "(at most the model's own limit)")
    fusion: FusionMode = Field("auto", description="as /rerank's (an extension: Cohere clients do not send it)")

    _max_documents = field_validator("documents", mode="before")(_limit("max_candidates", "documents"))

    def candidate_texts(self, max_text_chars: int | None) -> list[str]:
        """The text scored for each document: a string as it is; of an object, the one rank
        field's value, or ``"name: value"`` of each rank field joined by ``"; "`` when there are
        several. Raises :class:`FieldError` naming the document field that is missing or bad."""
        fields = self.rank_fields or ["text"]
        texts = []
        for i, doc in enumerate(self.documents):
            item = {"text": doc} if isinstance(doc, str) else doc
            parts = []
            for name in fields:
                where = f"documents[{i}].{name}"
                if name not in item:
                    raise FieldError(where, "Field required")
                value = item[name]
                if not isinstance(value, str):
                    raise FieldError(where, f"Input should be a valid string, not {type(value).__name__}")
                try:
                    value = _non_empty(clean_text(value, max_text_chars))
                except ValueError as exc:
                    raise FieldError(where, str(exc)) from None
                parts.append(value)
            texts.append(parts[0] if len(parts) == 1 else "; ".join(f"{n}: {v}" for n, v in zip(fields, parts)))
        return texts

    def document(self, index: int) -> dict[str, Any]:
        """A document as the client sent it (a string as ``{"text": ...}``)."""
        doc = self.documents[index]
        return {"text": doc} if isinstance(doc, str) else doc


class FieldError(ValueError):
    """A bad value at ``field`` (a path such as ``documents[3].title``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class CompatResult(BaseModel):
    index: int
    relevance_score: float = Field(
        ge=0, le=1, description="fused: the calibrated probability that this is the document the user wants "
        "(the gate's, summing to 1 over the request), in the fused order; LM-only: exp(score), with the default "
        "mean reduction the geometric-mean probability per token of the document text given the query (with "
        "INSTRUCTREC_REDUCTION=sum, the probability of the whole text), in the same order as log_likelihood")
    log_likelihood: float = Field(description="the LM's raw score: mean (or sum) token log-likelihood, <= 0")
    components: Components | None = Field(None, description="fused: the signals the ranking is made of")
    document: dict[str, Any] | None = Field(None, description="the document as sent, every field (return_documents)")


class CompatUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class CompatResponse(BaseModel):
    id: str
    results: list[CompatResult]
    model: str
    usage: CompatUsage
    meta: dict = Field(default_factory=dict)
    fusion: FusionInfo | None = None


class CompatError(BaseModel):
    """Cohere's error shape: what its SDKs put in their exceptions."""

    message: str


# --- probes --------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"]


class HealthFailed(BaseModel):
    status: Literal["failed"]
    error: str = Field(description="why the model could not be loaded")


class ServedModel(ModelInfo):
    device: str = Field(description="where the model runs (cpu, cuda:0, ...)")
    precision: str = Field(description="what it computes in: torch.float32, torch.bfloat16, torch.float16 or int8")


class TitleVectorsProgress(BaseModel):
    done: int = Field(description="catalogue titles whose vectors are computed")
    total: int = Field(description="catalogue titles")
    seconds_left: int = Field(description="expected at the rate so far")


class Ready(BaseModel):
    status: Literal["ready"]
    model: ServedModel
    template_version: str
    cache: Literal["disabled", "up", "down"]
    queue: int = Field(description="requests waiting for the model")
    hybrid_version: str | None = Field(None, description="the gate, behaviour index and semantic encoder fused "
                                       "with the LM (null: no gate, every answer LM-only)")
    model_swaps: int | None = Field(None, description="models swapped in by POST /admin/reload since start-up "
                                    "(present once one was)")
    title_vectors: TitleVectorsProgress | None = Field(None, description="present while the service computes its "
                                                       "catalogue's title vectors (no file kept beside it): a fused "
                                                       "/recommend waits for them, /rerank does not")


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, min_length=1, description="the checkpoint directory (or built-in model) to "
                              "swap to; default: the configured model, read again (e.g. new weights in its directory)")


class ReloadResponse(BaseModel):
    status: Literal["swapped"]
    model: ModelInfo = Field(description="the model now serving new requests")
    previous: ModelInfo = Field(description="the model swapped out (it finishes the requests it had begun)")
    model_swaps: int = Field(description="models swapped in since start-up")
    seconds: float = Field(description="time to load and warm the new model up")


class NotReady(BaseModel):
    status: Literal["loading", "failed"]
    model: str
    error: str | None = Field(None, description="why the model could not be loaded (status failed)")


# --- errors --------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


RecommendResponse.model_rebuild()
