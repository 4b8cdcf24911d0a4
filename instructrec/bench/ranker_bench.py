"""``instructrec bench ranker``: one request through every scoring variant, same model, same inputs.

The input is a real Games user: the 20 most recent titles of the sample user whose
rendered instruction (``instructrec.instruction.build``, the serving entry point) is
closest to 200 tokens; the candidates are real Games titles (a seeded sample of the
catalogue without the history). For each candidate count every variant is warmed up,
then timed ``repeats`` times, the variants interleaved within each repeat so that a
change of machine load hits them alike.

Variants (all on the same weights):

* ``naive`` -- one full forward pass per candidate (``Ranker.score(naive=True)``).
* ``encoder_once`` -- encoder once, candidates batched in length buckets, but each chunk's
  decoder projects the encoder output to cross-attention K/V for every row itself
  (:func:`no_shared_kv_ranker`, defined here).
* ``shared_kv`` -- the default fast path (``Ranker.score``): encoder once, cross-attention
  K/V computed once and shared across rows via ``expand``, head only at real positions.
* ``bf16`` -- ``shared_kv`` on the model loaded with ``dtype="bfloat16"``.
* ``int8`` -- ``shared_kv`` on ``torch.ao.quantization.quantize_dynamic`` (``nn.Linear`` ->
  int8 weights, dynamically quantised activations) of the fp32 model.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
import time
from typing import Any, Callable, Sequence

import torch

from instructrec.aspects import UserNeed
from instructrec.backends import backend_class
from instructrec.instruction import build, count_tokens
from instructrec.ranker import HEAD_PROFILE_LABEL, Ranker
from instructrec.training.data.load import load_dataset

from . import report

VARIANTS: dict[str, str] = {
    "naive": "one full forward pass (encoder + decoder + vocabulary head over all positions) per candidate: "
             "Ranker.score(..., naive=True), fp32",
    "encoder_once": "encoder once per request; candidates in length buckets under the ranker's token budget, head "
                    "only at real positions; but no shared K/V: each chunk's decoder projects the encoder output "
                    "(expanded to every row) to cross-attention K/V itself, i.e. once per candidate "
                    "(instructrec.bench.ranker_bench.no_shared_kv_ranker), fp32",
    "shared_kv": "the default fast path Ranker.score(...): encoder once, cross-attention K/V computed once (one "
                 "probe decoder step) and shared by all rows via expand, length buckets, head only at real "
                 "positions, fp32",
    "bf16": "shared_kv with the model loaded by load_model(..., dtype='bfloat16') (weights and activations bf16; "
            "log-softmax in fp32)",
    "int8": "shared_kv on instructrec.modeling.quantize_int8 (what --dtype int8 / INSTRUCTREC_DTYPE=int8 load): "
            "torch.ao.quantization.quantize_dynamic(fp32 model, {nn.Linear}, dtype=torch.qint8), int8 weights, "
            "activations quantised per call; embeddings and attention matmuls stay fp32",
}
DEFAULT_CANDIDATES = (1, 10, 100, 1000)
TARGET_SOURCE_TOKENS = 200
HISTORY_TITLES = 20
PRECISION_VARIANTS = ("bf16", "int8")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the encoder-once variant without shared K/V ----------------------------------------------


def no_shared_kv_ranker(loaded, **kw) -> Ranker:
    """The fast path minus K/V sharing: the encoder still runs once per request, but every
    chunk's decoder gets an empty cross-attention cache, so each cross-attention layer
    projects the encoder output to keys and values for every candidate row, as a batched
    implementation without the cache trick does. Scores equal the fast path's."""
    return Ranker(loaded, share_cross_kv=False, **kw)


# --- inputs ------------------------------------------------------------------------------------


def load_games(dataset: str = "games-sample"):
    return load_dataset(dataset)


def pick_instruction(data, tokenizer, max_source_tokens: int, history: int = HISTORY_TITLES,
                     target_tokens: int = TARGET_SOURCE_TOKENS) -> dict[str, Any]:
    """The user whose last ``history`` titles render (via ``instruction.build``) closest to
    ``target_tokens`` instruction tokens, without dropping history; ties by user id."""
    best = None
    users = sorted(u for u, s in data.sequences.items() if len(s) >= history)
    if not users:  # a dataset without long histories: the longest one
        users = [max(sorted(data.sequences), key=lambda u: len(data.sequences[u]))]
    for user in users:
        titles = tuple(data.items[x.item_id].title for x in data.sequences[user][-history:])
        inst = build(UserNeed(history=titles), tokenizer, max_tokens=max_source_tokens)
        n = count_tokens(tokenizer, inst.source)
        key = (inst.history_dropped > 0, abs(n - target_tokens), user)
        if best is None or key < best[0]:
            best = (key, user, titles, inst, n)
    _, user, titles, inst, n = best
    return {"user": user, "history": list(titles), "history_titles": len(titles) - inst.history_dropped,
            "history_dropped": inst.history_dropped, "template": inst.template.id, "source": inst.source,
            "source_tokens": n}


def candidate_pool(data, exclude: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """``n`` distinct real titles from the catalogue, not in ``exclude``, in a seeded order."""
    skip = set(exclude)
    titles = sorted({it.title for it in data.items.values() if it.title and it.title.strip() and it.title not in skip})
    if n > len(titles):
        raise ValueError(f"asked for {n} candidates but the catalogue has {len(titles)} usable titles")
    return random.Random(seed).sample(titles, n)


# --- FLOPs -------------------------------------------------------------------------------------

FLOPS_FORMULA = """\
S = instruction tokens, T_c = target tokens of candidate c (title + end-of-sequence), N = candidates
H = hidden size, A = heads x head dim (= H for BERT), F = FFN size, m = FFN matrices (2; 3 if gated),
V = vocabulary, L_enc / L_dec = layers
encoder     = L_enc * S * (8*H*A + 2*m*H*F + 4*S*A)        # Q,K,V,O projections + FFN + QK^T and AV
cross_kv    = L_dec * S * 4*H_enc*A                         # cross-attention K and V of the instruction
decoder(c)  = T_c * L_dec * (12*H*A + 4*T_c*A + 4*S*A + 2*m*H*F)
              # self Q,K,V,O (8HA) + cross Q,O (4HA) + self scores over T_c + cross scores over S + FFN
head(c)     = T_c * (2*H*H [BERT LM-head transform; 0 for T5] + 2*H*V)
first_step  = decoder and head of one token at position 0 (T_c = 1 in the formulas above)
one request = encoder + cross_kv + sum_c (decoder(c) + head(c))
executed by shared_kv, bf16, int8 = one request - (N-1)*first_step
              # the start-token step is the same for every candidate: run once, shared
prefix-LM (one BERT, L layers): instruction = L * S * (8*H*A + 2*m*H*F + 4*S*A);
candidate(c) = T_c * L * (8*H*A + 2*m*H*F + 4*(S + T_c)*A) + head(c); no cross_kv, no shared
first step; naive runs S + T_c tokens per candidate: L * (S+T_c) * (8*H*A + 2*m*H*F + 4*(S+T_c)*A) + head(c)
executed by encoder_once = encoder + N*cross_kv + sum_c (...)
executed by naive        = N*(encoder + cross_kv) + sum_c (...)
Not counted: embeddings, layer norms, softmax, activations, biases, and padding inside length buckets."""


def model_dims(model) -> dict[str, Any] | None:
    """Layer sizes for the FLOPs formula: BERT2BERT (EncoderDecoderModel of BERT configs) or T5."""
    cfg = model.config
    if getattr(cfg, "model_type", "") == "encoder-decoder":
        enc, dec = cfg.encoder, cfg.decoder
        if not all(hasattr(c, "intermediate_size") for c in (enc, dec)):
            return None

        def bert(c):
            return {"H": c.hidden_size, "A": c.hidden_size, "F": c.intermediate_size, "m": 2,
                    "L": c.num_hidden_layers}

        return {"arch": "bert2bert", "enc": bert(enc), "dec": bert(dec), "V": dec.vocab_size, "head_transform": True}
    if getattr(cfg, "model_type", "") in ("t5", "mt5", "umt5"):
        gated = str(getattr(cfg, "feed_forward_proj", "")).startswith("gated")
        a = cfg.num_heads * cfg.d_kv

        def t5(layers):
            return {"H": cfg.d_model, "A": a, "F": cfg.d_ff, "m": 3 if gated else 2, "L": layers}

        return {"arch": "t5", "enc": t5(cfg.num_layers), "dec": t5(cfg.num_decoder_layers or cfg.num_layers),
                "V": cfg.vocab_size, "head_transform": False}
    from instructrec.prefixlm import is_prefix_lm

    if is_prefix_lm(cfg):
        one = {"H": cfg.hidden_size, "A": cfg.hidden_size, "F": cfg.intermediate_size, "m": 2, "L": cfg.num_hidden_layers}
        return {"arch": "prefix-lm", "enc": one, "dec": one, "V": cfg.vocab_size, "head_transform": True}
    return None


def _prefix_lm_flops(dims: dict, source_tokens: int, target_lengths: Sequence[int]) -> dict[str, float]:
    b, V, S = dims["enc"], dims["V"], source_tokens
    per_token = 8 * b["H"] * b["A"] + 2 * b["m"] * b["H"] * b["F"]
    instruction = b["L"] * S * (per_token + 4 * S * b["A"])
    candidates = sum(t * b["L"] * (per_token + 4 * (S + t) * b["A"]) for t in target_lengths)
    head = sum(t * (2 * b["H"] * b["H"] + 2 * b["H"] * V) for t in target_lengths)
    naive = sum(b["L"] * (S + t) * (per_token + 4 * (S + t) * b["A"]) for t in target_lengths) + head
    fast = instruction + candidates + head
    return {"encoder": float(instruction), "cross_kv": 0.0, "decoder": float(candidates), "head": float(head),
            "first_step": 0.0, "request": float(fast),
            "executed": {"naive": float(naive), "encoder_once": None, "shared_kv": float(fast), "bf16": float(fast),
                         "int8": float(fast)}}


def request_flops(dims: dict, source_tokens: int, target_lengths: Sequence[int]) -> dict[str, float]:
    """FLOPs of one request by part, and executed per variant (see FLOPS_FORMULA)."""
    if dims["arch"] == "prefix-lm":
        return _prefix_lm_flops(dims, source_tokens, target_lengths)
    e, d, V, S = dims["enc"], dims["dec"], dims["V"], source_tokens
    encoder = e["L"] * S * (8 * e["H"] * e["A"] + 2 * e["m"] * e["H"] * e["F"] + 4 * S * e["A"])
    cross_kv = d["L"] * S * 4 * e["H"] * d["A"]
    decoder = sum(t * d["L"] * (12 * d["H"] * d["A"] + 4 * t * d["A"] + 4 * S * d["A"] + 2 * d["m"] * d["H"] * d["F"])
                  for t in target_lengths)
    head = sum(t * ((2 * d["H"] * d["H"] if dims["head_transform"] else 0) + 2 * d["H"] * V) for t in target_lengths)
    first_step = (d["L"] * (12 * d["H"] * d["A"] + 4 * d["A"] + 4 * S * d["A"] + 2 * d["m"] * d["H"] * d["F"])
                  + (2 * d["H"] * d["H"] if dims["head_transform"] else 0) + 2 * d["H"] * V)
    n = len(target_lengths)
    useful = encoder + cross_kv + decoder + head
    fast = useful - (n - 1) * first_step
    return {
        "encoder": float(encoder), "cross_kv": float(cross_kv), "decoder": float(decoder), "head": float(head),
        "first_step": float(first_step), "request": float(useful),
        "executed": {"naive": float(n * (encoder + cross_kv) + decoder + head),
                     "encoder_once": float(encoder + n * cross_kv + decoder + head),
                     "shared_kv": float(fast), "bf16": float(fast), "int8": float(fast)},
    }


# --- matmul peak -----------------------------------------------------------------------------


@torch.inference_mode()
def matmul_peak(dtype: torch.dtype, size: int, min_seconds: float = 0.3, min_calls: int = 3,
                max_calls: int = 200) -> dict[str, Any]:
    """GFLOP/s of a square fp32/bf16 matmul at the current thread count (best and median call)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dtype)
    b = torch.randn(size, size, generator=gen).to(dtype)
    for _ in range(2):
        a @ b
    times: list[float] = []
    end = time.perf_counter() + min_seconds
    while len(times) < min_calls or (time.perf_counter() < end and len(times) < max_calls):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    flop = 2.0 * size ** 3
    return {"dtype": str(dtype).replace("torch.", ""), "size": size, "calls": len(times),
            "gflops_best": flop / min(times) / 1e9, "gflops_median": flop / report.median(times) / 1e9}


# --- where the time goes ------------------------------------------------------------------------

PROFILE_VARIANTS = ("shared_kv", "bf16", "int8")
_MATMULS = {"aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
            "mkldnn::_linear_pointwise", "quantized::linear_dynamic"}
_COPIES = {"aten::copy_", "aten::cat", "aten::index_select", "aten::index", "aten::gather", "aten::clone",
           "aten::contiguous", "aten::_to_copy", "aten::to", "aten::empty", "aten::empty_strided", "aten::zeros",
           "aten::zero_", "aten::fill_", "aten::index_add_", "aten::masked_select", "aten::repeat", "aten::expand"}
_ELEMENTWISE = {"aten::gelu", "aten::native_layer_norm", "aten::layer_norm", "aten::add", "aten::add_",
                "aten::mul", "aten::mul_", "aten::sub", "aten::div", "aten::where", "aten::tanh", "aten::relu",
                "aten::dropout", "aten::rsub", "aten::masked_fill", "aten::embedding", "aten::lt", "aten::le",
                "aten::arange"}
PROFILE_GROUPS = ("layer matmuls (encoder, decoder)", "vocabulary head matmul",
                  "normalising over the vocabulary (log-softmax, logsumexp)",
                  "attention (scaled dot product)", "copies, gathers, allocation",
                  "element-wise (GELU, layer norm, adds, embeddings)", "other ops")


def profile_group(op: str, in_head: bool) -> str:
    """Which part of the work an aten op is, for the profile summary; ``in_head``: it ran inside
    the vocabulary projection (the ranker's blocked head, or the model's output embeddings)."""
    if op in _MATMULS:
        return PROFILE_GROUPS[1] if in_head else PROFILE_GROUPS[0]
    if in_head or "log_softmax" in op:
        return PROFILE_GROUPS[2]
    if "scaled_dot_product" in op or op in ("aten::_softmax", "aten::softmax"):
        return PROFILE_GROUPS[3]
    if op in _COPIES:
        return PROFILE_GROUPS[4]
    if op in _ELEMENTWISE:
        return PROFILE_GROUPS[5]
    return PROFILE_GROUPS[6]


def _label_module(module, label: str):
    """Hooks that wrap every call of ``module`` in a profiler range named ``label``."""
    from torch.autograd.profiler import record_function

    open_ranges: list = []

    def enter(*_):
        open_ranges.append(record_function(label).__enter__())

    def leave(*_):
        if open_ranges:
            open_ranges.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]


@torch.inference_mode()
def profile_request(call: Callable[[], Any], model, top: int = 8) -> dict[str, Any]:
    """One call under the torch profiler: self CPU time by group of ops and the costliest ops.

    Self times of ops on the calling thread, intra-op threads included in each op's span; what
    is not inside any op (Python, the transformers code between ops) is the wall time minus
    their sum. The profiler itself adds a little to every op. Ops inside the ranker's labelled
    vocabulary range or the model's output embeddings (``get_output_embeddings()``) count as
    the vocabulary head.
    """
    from torch.profiler import ProfilerActivity, profile

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    hooks = _label_module(head, HEAD_PROFILE_LABEL) if isinstance(head, torch.nn.Module) else []
    try:
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            call()
        wall_ms = (time.perf_counter() - t0) * 1000
    finally:
        for h in hooks:
            h.remove()
    groups = {g: 0.0 for g in PROFILE_GROUPS}
    for evt in prof.events():
        if evt.name == HEAD_PROFILE_LABEL:
            continue
        parent, in_head = evt.cpu_parent, False
        while parent is not None and not in_head:
            in_head, parent = parent.name == HEAD_PROFILE_LABEL, parent.cpu_parent
        groups[profile_group(evt.name, in_head)] += evt.self_cpu_time_total / 1000
    ops = [{"op": e.key, "shapes": [list(x) for x in (e.input_shapes or []) if x], "calls": e.count,
            "self_ms": e.self_cpu_time_total / 1000}
           for e in prof.key_averages(group_by_input_shape=True) if e.key != HEAD_PROFILE_LABEL]
    in_ops = sum(groups.values())
    ops.sort(key=lambda o: -o["self_ms"])
    return {"wall_ms": wall_ms, "in_ops_ms": in_ops, "outside_ops_ms": max(0.0, wall_ms - in_ops),
            "groups": [{"group": g, "ms": ms, "share": ms / wall_ms if wall_ms else None} for g, ms in groups.items()],
            "top_ops": ops[:top]}


# --- the run -----------------------------------------------------------------------------------


def _make_rankers(model_name: str, variants: Sequence[str], batch_tokens: int, loaded32):
    """{variant: ranker or an exception}. The fp32 model is shared by naive/encoder_once/shared_kv."""
    from instructrec.modeling import INT8, load_model, quantize_int8

    kw = dict(batch_tokens=batch_tokens)  # token limits: the checkpoint's own (Ranker's default)
    rankers: dict[str, Any] = {}
    for v in variants:
        try:
            if v in ("naive", "shared_kv"):
                rankers[v] = Ranker(loaded32, **kw)
            elif v == "encoder_once":
                if not backend_class(loaded32.kind).cross_attention:
                    raise NotImplementedError(f"{loaded32.kind} model: no cross-attention to share or not")
                rankers[v] = no_shared_kv_ranker(loaded32, **kw)
            elif v == "bf16":
                rankers[v] = Ranker(load_model(model_name, device="cpu", dtype="bfloat16"), **kw)
            elif v == "int8":
                rankers[v] = Ranker(dataclasses.replace(loaded32, model=quantize_int8(loaded32.model), quantized=INT8), **kw)
            else:
                raise ValueError(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported as the variant's status
            rankers[v] = exc
    return rankers


@dataclasses.dataclass
class _Bench:
    """One ranker bench run: the rankers, the request they all score, and what is known of them."""

    rankers: dict[str, Any]  # variant -> Ranker, or the exception that prevented it
    status: dict[str, tuple[str, str]]  # variant -> (ok | n/a | failed, reason)
    reference: Ranker  # the limits all variants share
    inp: dict[str, Any]  # the instruction (see pick_instruction)
    pool: list[str]  # candidate titles; a request of n candidates takes the first n
    tgt_len: list[int]  # target tokens per pool title
    dims: Any  # the model's shape for the FLOPs formula, or None
    peak: dict[str, Any]  # the CPU's measured matmul peak

    @property
    def source(self) -> str:
        return self.inp["source"]


def run_bench(model: str = "minilm-bert2bert", candidates: Sequence[int] = DEFAULT_CANDIDATES, repeats: int = 5,
              warmup: int = 1, threads: int | None = None, naive_max: int = 100,
              variants: Sequence[str] = tuple(VARIANTS), batch_tokens: int = 4096, seed: int = 0,
              peak_size: int = 1024, dataset: str = "games-sample", profile_candidates: int = 100,
              progress: Callable[[str], None] = log) -> dict[str, Any]:
    """Run the ranker bench; returns the ``ranker`` section of results.json."""
    if threads:
        torch.set_num_threads(threads)
    sizes, variants = _checked(candidates, repeats, warmup, variants)
    machine = report.machine_info()
    bench, loaded32 = _prepare(model, variants, batch_tokens, dataset, sizes[-1], seed, peak_size, progress)
    rows: list[dict[str, Any]] = []
    for n in sizes:
        active = [v for v in variants if bench.status[v][0] == "ok" and not (v == "naive" and n > naive_max)]
        times, scores = _time_size(bench, n, active, warmup, repeats, progress)
        flops = request_flops(bench.dims, bench.inp["source_tokens"], bench.tgt_len[:n]) if bench.dims else None
        naive_ms = report.median(times["naive"]) if "naive" in times and times["naive"] else None
        for v in variants:
            row: dict[str, Any] = {"variant": v, "candidates": n}
            if bench.status[v][0] != "ok" or (v in times and not times[v]):
                status = bench.status[v]
                row.update(status=status[0] if status[0] != "ok" else "failed", reason=status[1])
            elif v not in active:
                row.update(status="skipped", reason=f"naive runs only up to --naive-max {naive_max} candidates")
            else:
                row.update(_timed_row(bench, v, n, times, scores, naive_ms, flops))
                progress(f"  {n:>5} candidates  {v:<13} median {row['median_ms']:9.2f} ms  min {row['min_ms']:9.2f}  "
                         f"max {row['max_ms']:9.2f}" + (f"  {row['ratio_to_naive']:.1f}x naive"
                                                        if row["ratio_to_naive"] else ""))
            rows.append(row)
    profiles = _profiles(bench, profile_candidates, progress)
    ref = bench.reference
    return {
        "kind": "ranker",
        "machine": machine,
        "bf16_support": report.bf16_support(),
        "quantized_engine": torch.backends.quantized.engine,
        "config": {"model": model, "kind": loaded32.kind,
                   "parameters_m": sum(p.numel() for p in loaded32.model.parameters()) / 1e6,
                   "candidates": sizes, "repeats": repeats, "warmup": warmup, "threads": torch.get_num_threads(),
                   "naive_max": naive_max, "batch_tokens": batch_tokens, "seed": seed, "dataset": dataset,
                   "max_source_tokens": ref.max_source_tokens, "max_target_tokens": ref.max_target_tokens,
                   "reduction": ref.reduction},
        "input": {"user": bench.inp["user"], "history_titles": bench.inp["history_titles"],
                  "history": bench.inp["history"], "template": bench.inp["template"],
                  "source_tokens": bench.inp["source_tokens"], "source": bench.source,
                  "mean_target_tokens": sum(bench.tgt_len) / len(bench.tgt_len), "candidates": bench.pool},
        "variants": {v: {"description": VARIANTS[v], "status": bench.status[v][0], "reason": bench.status[v][1] or None}
                     for v in variants},
        "peak": bench.peak,
        "flops": {"formula": FLOPS_FORMULA, "dims": bench.dims} if bench.dims else
                 {"reason": f"no FLOPs formula for {type(loaded32.model).__name__}"},
        "rows": rows,
        "profile": profiles,
        "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _checked(candidates: Sequence[int], repeats: int, warmup: int, variants: Sequence[str]) -> tuple[list[int], list[str]]:
    """The candidate counts, ascending, and the variants in canonical order; ValueError if unusable."""
    sizes = sorted(set(int(n) for n in candidates))
    if not sizes or sizes[0] < 1:
        raise ValueError("candidate counts must be positive integers")
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return sizes, [v for v in VARIANTS if v in variants]


def _prepare(model: str, variants: list[str], batch_tokens: int, dataset: str, largest: int, seed: int,
             peak_size: int, progress) -> tuple[_Bench, Any]:
    """Load the model and its variants, pick the request and its candidates, measure the matmul peak."""
    from instructrec.modeling import load_model
    from instructrec.ranker import target_ids

    progress(f"loading {model} (fp32) ...")
    loaded32 = load_model(model, device="cpu", dtype="float32")
    rankers = _make_rankers(model, variants, batch_tokens, loaded32)
    reference = next(r for r in rankers.values() if isinstance(r, Ranker))  # same limits for all
    data = load_games(dataset)
    inp = pick_instruction(data, loaded32.tokenizer, reference.max_source_tokens)
    pool = candidate_pool(data, inp["history"], largest, seed=seed)
    progress(f"instruction: user {inp['user']}, {inp['history_titles']} titles, template {inp['template']}, "
             f"{inp['source_tokens']} tokens; candidates up to {largest} real titles")
    tgt_len = [len(target_ids(loaded32.tokenizer, c, reference.max_target_tokens, reference.eos)[0]) for c in pool]
    dims = model_dims(loaded32.model)
    progress(f"matmul peak at {torch.get_num_threads()} threads ({peak_size}x{peak_size}) ...")
    peak = {"size": peak_size, "threads": torch.get_num_threads(),
            "float32": matmul_peak(torch.float32, peak_size), "bfloat16": matmul_peak(torch.bfloat16, peak_size)}
    status = {v: ("ok", "") if isinstance(r, Ranker) else
              ("n/a", str(r)) if isinstance(r, NotImplementedError) else ("failed", f"{type(r).__name__}: {r}")
              for v, r in rankers.items()}
    return _Bench(rankers, status, reference, inp, pool, tgt_len, dims, peak), loaded32


def _time_size(bench: _Bench, n: int, active: list[str], warmup: int, repeats: int,
               progress) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warm-up calls, then ``repeats`` timed rounds over the active variants at ``n`` candidates:
    (milliseconds per variant, the first scores per variant). A variant that fails is marked so."""
    cands = bench.pool[:n]
    times: dict[str, list[float]] = {v: [] for v in active}
    scores: dict[str, list[float]] = {}

    def call(v: str) -> list[float] | None:
        try:
            return bench.rankers[v].score(bench.source, cands, naive=(v == "naive")).scores
        except Exception as exc:  # noqa: BLE001 - e.g. int8 kernels missing: reported, the run goes on
            bench.status[v] = ("failed", f"{type(exc).__name__}: {exc}")
            progress(f"  {v} failed at {n} candidates: {bench.status[v][1]}")
            return None

    for v in active:
        for _ in range(warmup):
            if bench.status[v][0] == "ok":
                call(v)
    for _ in range(repeats):
        for v in active:
            if bench.status[v][0] != "ok":
                continue
            t0 = time.perf_counter()
            s = call(v)
            dt = (time.perf_counter() - t0) * 1000
            if s is not None:
                times[v].append(dt)
                scores.setdefault(v, s)
    return times, scores


def _timed_row(bench: _Bench, v: str, n: int, times: dict, scores: dict, naive_ms: float | None,
               flops: dict | None) -> dict[str, Any]:
    """A measured variant's row: times, the speed-up over naive, FLOP rates, agreement of scores."""
    med = report.median(times[v])
    row: dict[str, Any] = dict(status="ok", times_ms=times[v], median_ms=med, min_ms=min(times[v]),
                               max_ms=max(times[v]), candidates_per_s=n / (med / 1000))
    row["ratio_to_naive"] = naive_ms / med if naive_ms else None
    if flops:
        executed = flops["executed"][v]
        peak_key = "bfloat16" if v == "bf16" else "float32"
        row.update(gflop_executed=executed / 1e9, gflop_request=flops["request"] / 1e9,
                   gflops_per_s=executed / 1e9 / (med / 1000),
                   # the speed-up over naive that FLOPs alone allow this variant
                   naive_flop_ratio=flops["executed"]["naive"] / executed)
        row["peak_fraction"] = row["gflops_per_s"] / bench.peak[peak_key]["gflops_best"]
        row["peak_dtype"] = peak_key
    ref = scores.get("shared_kv")
    if ref is not None and v in scores:
        row["spearman_vs_fp32"] = report.spearman(scores[v], ref) if v != "shared_kv" else (1.0 if n > 1 else None)
        row["max_abs_diff_vs_fp32"] = max(abs(a - b) for a, b in zip(scores[v], ref))
    if "naive" in scores and v in scores:
        row["max_abs_diff_vs_naive"] = max(abs(a - b) for a, b in zip(scores[v], scores["naive"]))
    return row


def _profiles(bench: _Bench, profile_candidates: int, progress) -> dict[str, Any]:
    """The torch profiler's time by group of ops, once per profiled variant ({} when off)."""
    if not profile_candidates:
        return {}
    n = min(profile_candidates, len(bench.pool))
    profiles: dict[str, Any] = {}
    for v in PROFILE_VARIANTS:
        if v in bench.rankers and bench.status[v][0] == "ok":
            progress(f"profiling {v} at {n} candidates ...")
            profiles[v] = profile_request(lambda: bench.rankers[v].score(bench.source, bench.pool[:n]),
                                          bench.rankers[v].model)
    return {"candidates": n, "variants": profiles} if profiles else {}
