"""Every Prometheus metric of the service, in one place, on a registry per app.

A dedicated :class:`CollectorRegistry` per app lets several apps live in one process
(tests) without duplicate-metric errors; ``/metrics`` exposes exactly this registry, with the
standard ``process_*`` metrics (CPU seconds, memory) of the serving process beside ours.
"""

from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               generate_latest)

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 10000)
_TOKENS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)

REJECT_REASONS = ("unauthorized", "body_too_large", "bad_request", "invalid", "queue_full", "expired", "not_ready",
                  "no_catalogue", "swap_running", "warming_up")
_STEPS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
_WEIGHTS = (-4.0, -2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
FUSION_MODES = ("fused", "lm-only")
GATED_SIGNALS = ("lm", "behaviour", "semantic", "sequential")  # the signals the gate weighs (the LM: 1 + a gated term)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # process_cpu_seconds_total and friends: what `bench service` divides by the requests answered
        ProcessCollector(registry=r)
        self.request_seconds = Histogram(
            "instructrec_request_duration_seconds", "HTTP request duration", ("route", "status"), buckets=_FAST, registry=r)
        self.queue_seconds = Histogram(
            "instructrec_queue_seconds", "time a scoring job waited before its batch started", buckets=_FAST, registry=r)
        self.encode_seconds = Histogram(
            "instructrec_encode_seconds", "model encoder time per scoring job (0 for decoder-only models)",
            buckets=_FAST, registry=r)
        self.decode_seconds = Histogram(
            "instructrec_decode_seconds", "candidate scoring (decoder) time per scoring job", buckets=_FAST, registry=r)
        self.prepare_seconds = Histogram(
            "instructrec_prepare_seconds", "instruction selection, fitting and tokenisation per request",
            buckets=_FAST, registry=r)
        self.batch_size = Histogram(
            "instructrec_batch_size", "scoring jobs (requests) per batch", buckets=_COUNTS, registry=r)
        self.batch_tokens = Histogram(
            "instructrec_batch_tokens", "tokens (instruction + candidates) per batch", buckets=_TOKENS, registry=r)
        self.candidates_per_request = Histogram(
            "instructrec_candidates_per_request", "candidates per rerank request", buckets=_COUNTS, registry=r)
        self.generate_steps = Histogram(
            "instructrec_generate_steps", "decoding steps of a /recommend beam search", buckets=_STEPS, registry=r)
        self.answer_cache = Counter(
            "instructrec_answer_cache", "whole answers by route (recommend, rerank) and cache outcome (hit, miss, "
            "bypassed: Redis down)", ("route", "outcome"), registry=r)
        self.queue_depth = Gauge("instructrec_queue_depth", "scoring jobs waiting for the model", registry=r)
        self.busy_lanes = Gauge("instructrec_busy_lanes", "inference lanes scoring a batch now (setting lanes: how "
                                "many may)", registry=r)
        self.lent_parts = Gauge("instructrec_lent_parts", "parts of requests (candidate passes, vocabulary blocks) "
                                "computed by an idle lane for a busy one since start (setting lend_lanes)", registry=r)
        self.cache_hits = Counter("instructrec_cache_hits", "candidate scores served from the cache", registry=r)
        self.cache_misses = Counter("instructrec_cache_misses", "candidate scores not in the cache", registry=r)
        self.cache_errors = Counter("instructrec_cache_errors", "failed cache operations (Redis down or slow)", registry=r)
        self.cache_bypassed = Counter(
            "instructrec_cache_bypassed", "candidate scores computed without the cache during a Redis outage", registry=r)
        self.cache_up = Gauge("instructrec_cache_up", "1 when the score cache (Redis) is usable", registry=r)
        self.rejected = Counter(
            "instructrec_requests_rejected", "requests refused, by reason", ("reason",), registry=r)
        self.dropped_jobs = Counter(
            "instructrec_dropped_jobs", "scoring jobs skipped because the client went away", registry=r)
        self.fusion_requests = Counter(
            "instructrec_fusion_requests", "rerank requests by how they were scored: fused (the gate's fusion of "
            "the LM with behaviour and semantic signals) or lm-only", ("mode",), registry=r)
        self.without_behaviour = Counter(
            "instructrec_fusion_candidates_without_behaviour", "candidates of fused requests that had no behaviour "
            "signal (id and title unknown to the index, or no history item it knows); only with a behaviour index",
            registry=r)
        self.gate_weight = Histogram(
            "instructrec_fusion_gate_weight", "the gate's weight of a signal in a fused request (the LM's is 1)",
            ("signal",), buckets=_WEIGHTS, registry=r)
        self.fusion_seconds = Histogram(
            "instructrec_fusion_seconds", "time fusion adds to a fused request: the semantic signal (model thread) "
            "and the gate", buckets=_FAST, registry=r)
        self.model_info = Gauge(
            "instructrec_model_info", "the served model (value 1)",
            ("model", "checkpoint_version", "template_version", "tuned_template_version"), registry=r)
        self.ready = Gauge("instructrec_ready", "1 once the model is loaded and warmed up", registry=r)
        self.model_swaps = Counter(
            "instructrec_model_swaps", "models swapped in while serving (POST /admin/reload), by outcome: done, or "
            "failed (the old model kept serving)", ("outcome",), registry=r)
        for reason in REJECT_REASONS:  # export zeros so rates work from the first scrape
            self.rejected.labels(reason)
        for route in ("recommend", "rerank"):
            for outcome in ("hit", "miss", "bypassed"):
                self.answer_cache.labels(route, outcome)
        for outcome in ("done", "failed"):
            self.model_swaps.labels(outcome)
        for mode in FUSION_MODES:
            self.fusion_requests.labels(mode)
        for signal in GATED_SIGNALS:
            self.gate_weight.labels(signal)

    def observe_fusion(self, mode: str, weights: dict[str, float], without_behaviour: int) -> None:
        """One rerank request's fusion: its mode, the gate's weights of its present signals and
        its candidates without behaviour signal."""
        self.fusion_requests.labels(mode).inc()
        for signal in GATED_SIGNALS:
            if signal in weights:
                self.gate_weight.labels(signal).observe(weights[signal])
        if without_behaviour:
            self.without_behaviour.inc(without_behaviour)

    def expose(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
