"""All service configuration in one object, read from ``INSTRUCTREC_*`` environment variables.

``Settings(**overrides)`` gives keyword arguments priority over the environment, which is
how ``instructrec serve --model/--host/--port`` override it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from instructrec.options import ALIASES, DEVICE_HELP, DTYPE_HELP, INFERENCE_DTYPES


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INSTRUCTREC_", extra="ignore", validate_default=True)

    # -- model ------------------------------------------------------------------------
    model: str | None = Field(
        default=None,
        description="checkpoint directory or built-in model name; default artifacts/quickstart/model if it exists",
    )
    device: str = Field(default="auto", description=DEVICE_HELP)
    dtype: str = Field(default="auto", description=DTYPE_HELP[INFERENCE_DTYPES])
    reduction: Literal["mean", "sum"] = Field(default="mean", description="score = mean or sum of title token log-probs")
    max_source_tokens: int | None = Field(default=None, ge=8, description="instruction token limit (default: checkpoint preset)")
    max_target_tokens: int | None = Field(default=None, ge=2, description="candidate token limit (default: checkpoint preset, else 48)")
    torch_threads: int | None = Field(default=None, ge=1, description="torch intra-op threads (default: torch's "
                                      "choice; 1 when lanes > 1, and nothing else may be set then)")
    lanes: int = Field(default=0, ge=0, description="inference threads, each scoring whole batches with one torch "
                       "thread, so up to this many batches run at once and an answer never depends on which lane "
                       "or what load scored it; an idle lane computes parts of a busy one's request (lend_lanes). "
                       "0 (default): the CPU cores this process may use (its affinity and cgroup quota), or 1 on "
                       "a GPU or with torch_threads > 1 (one thread using torch's intra-op threads)")
    lend_lanes: bool = Field(default=True, description="with lanes > 1, a request scored while other lanes are idle "
                             "has some of its candidate passes and vocabulary blocks computed by them: the same "
                             "answer, bit for bit, sooner; a lent lane returns after its part when a request waits. "
                             "Off: each request on one core, for throughput-bound loads (2 cores: one client 47.4 "
                             "against 33.6 ms at 10 candidates, 8 clients 1.66x one client's requests/s against 1.17x)")
    warmup: bool = Field(default=True, description="run a warm-up batch at the largest budget before /ready turns green")
    prep_cache_size: int = Field(default=65536, ge=0, description="candidate texts whose token ids preparation "
                                 "keeps, and a 16th as many fitted instructions (least recently used out; 0 keeps none)")

    # -- generation over a catalogue (/recommend) ------------------------------------------
    catalogue: str | None = Field(default=None, description="catalogue file for /recommend (`instructrec catalogue "
                                  "build`); without one /recommend answers 409")
    beams: int | None = Field(default=None, ge=1, le=1000, description="beam width of /recommend's constrained search "
                              "(default: the request's k; never below k)")

    # -- hybrid scoring (the LM fused with behaviour and semantic signals by a gate) ----------
    gate: str | None = Field(default=None, description="gate file (gate.json, fitted for the served model) that fuses "
                             "the LM's scores with the behaviour and semantic signals; default: gate.json in the model "
                             "directory when it exists; 'none' turns fusion off (every answer LM-only)")
    behaviour: str | None = Field(default=None, description="behaviour index (.npz: item-to-item counts) for the "
                                  "behaviour signal; needs a gate; with a catalogue it must be built over the "
                                  "catalogue's items")
    sequential: str | None = Field(default=None, description="the sequential model's directory (SASRec in plain "
                                   "torch, `instructrec sequential train`) for the sequential signal; needs a gate; "
                                   "default: sequential/ in the model directory when it exists; 'none': no such signal")
    retrieve_per_source: int = Field(default=50, ge=1, le=1000, description="fused /recommend: items each signal "
                                     "(the sequential model, the behaviour index, the semantic encoder) proposes for "
                                     "the fused scorer to rank, beside the model's own k")
    semantic: bool = Field(default=True, description="with a gate: the MiniLM similarity of the need to each "
                           "candidate as a signal (run in the inference thread, title vectors cached)")

    # -- micro-batching -----------------------------------------------------------------
    batch_tokens: int = Field(default=4096, ge=64, description="token budget of one batch (and of one forward pass)")
    max_wait_ms: float = Field(default=5.0, ge=0, description="longest wait for more requests to join a batch")
    max_queue: int = Field(default=256, ge=1, description="requests waiting for the model before new ones get 429 "
                           "(large enough that the deadline, not this, is what refuses)")
    max_queue_wait_ms: float = Field(default=5000.0, gt=0, description="longest a request waits for the model: "
                                     "requests are queued while the work ahead of them, at the measured drain rate, "
                                     "lets them start by then (8 requests of 100 candidates on 2 CPU cores wait about "
                                     "3 s); past it 429 with Retry-After = seconds until enough work drains; one admitted "
                                     "that still waits at queue_expiry_factor times this is dropped (503 with Retry-After)")
    queue_expiry_factor: float = Field(default=2.0, ge=1.0, description="an admitted request is dropped (503 with "
                                       "Retry-After) only once it has waited this many times max_queue_wait_ms: "
                                       "admission assumes the drain rate it measured, and a rate that falls afterwards "
                                       "(a slower core, a noisy neighbour) should delay the requests it admitted, not "
                                       "fail them")
    max_batch_requests: int = Field(default=32, ge=1, description="requests sharing one batch at most (1 turns micro-batching off)")
    batch_invariant: bool = Field(default=True, description="score each request of a batch in forward passes of its "
                                  "own, so its answer is bit for bit the one it gets alone (false: requests share "
                                  "passes, faster on GPUs, but in bf16/fp16/int8 near-ties may reorder with the load)")
    mixed_kv_mb: float = Field(default=256.0, ge=0, description="(batch_invariant=false) per-row copies of cross-attention keys/values one "
                               "decoder pass mixing several requests may make (MB); beyond it each request's rows get "
                               "their own passes, sharing them without copies (0: never copy)")

    # -- cache ------------------------------------------------------------------------
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis for the score cache; empty disables it")
    cache_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=1, description="how long a cached score lives")
    cache_namespace: str = Field(default="instructrec:score", min_length=1, description="prefix of every cache key")
    cache_timeout_ms: float = Field(default=100.0, gt=0, description="Redis socket / operation timeout")
    cache_retry_seconds: float = Field(default=5.0, ge=0, description="back-off before trying Redis again after an error")
    cache_connections: int = Field(default=8, ge=1, description="Redis connections, each used by its own I/O thread "
                                   "(cache I/O stays off the event loop); requests beyond them wait for one")
    cache_answers: bool = Field(default=True, description="also keep each /rerank answer whole, by its request "
                                "body and everything that decides it (model, precision, templates, gate and signals): "
                                "a repeated request is answered from one Redis read, the per-candidate work skipped")
    cache_answer_ttl_seconds: int = Field(default=3600, ge=1, description="how long a kept /rerank answer lives: "
                                          "a 100-candidate fused answer takes about 41 kB of Redis against 15 kB for its "
                                          "100 scores, so whole answers are kept for repeats that come soon")

    # -- security and limits --------------------------------------------------------------
    api_key: SecretStr | None = Field(default=None, description="if set, rerank routes need 'Authorization: Bearer <key>'")
    max_candidates: int = Field(default=1000, ge=1, description="candidates per request")
    max_history: int = Field(default=1000, ge=0, description="history items per request")
    max_text_chars: int = Field(default=2000, ge=1, description="characters per text (title, query, preference, ...)")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="request body size")

    # -- server ---------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: str = "info"
    keep_alive_seconds: float = Field(default=75.0, gt=0, description="how long an idle client connection stays open; "
                                      "longer than a client's or load balancer's idle pool (often 60 s), so the server "
                                      "never closes one the instant a client reuses it (uvicorn's 5 s default lost a "
                                      "request that way in a soak run)")

    @model_validator(mode="after")
    def _auto_lanes(self):
        if self.lanes == 0:
            self.lanes = auto_lanes(self.device, self.torch_threads)
        return self

    @field_validator("dtype", mode="before")
    @classmethod
    def _known_dtype(cls, value):
        name = ALIASES.get(str(value).strip().lower(), str(value).strip().lower())
        if name not in INFERENCE_DTYPES:
            raise ValueError(f"{value!r} is not one of {', '.join(INFERENCE_DTYPES)}")
        return name

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value):
        return None if value in ("", None) else value

    @field_validator("model", "catalogue", "gate", "behaviour", "sequential", mode="before")
    @classmethod
    def _empty_model_is_none(cls, value):
        return None if value in ("",) else value

    @property
    def gate_disabled(self) -> bool:
        """``INSTRUCTREC_GATE=none``: no fusion, even with a gate.json beside the model."""
        return (self.gate or "").strip().lower() in ("none", "off")

    @property
    def cache_enabled(self) -> bool:
        return bool(self.redis_url.strip())


def cpu_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may run on: its affinity, capped by a cgroup CPU quota (a container's
    `cpus` limit: cgroup v2 ``cpu.max``, or v1 ``cpu/cpu.cfs_quota_us`` over its period)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = None
    try:
        limit, period = (cgroup / "cpu.max").read_text().split()[:2]
        quota = None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        try:
            limit = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
            quota = limit / int((cgroup / "cpu" / "cpu.cfs_period_us").read_text()) if limit > 0 else None
        except (OSError, ValueError):
            pass
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def auto_lanes(device: str, torch_threads: int | None) -> int:
    """``lanes=0``: one lane per CPU core on a CPU; one lane on a GPU (a GPU runs one batch at a
    time) or when torch's intra-op threads were asked for (``torch_threads`` > 1)."""
    if (torch_threads or 1) > 1 or device.startswith("cuda"):
        return 1
    if device == "auto":
        from instructrec.modeling import resolve_device  # what the engine will resolve "auto" to

        if resolve_device(device).type == "cuda":
            return 1
    return cpu_cores()
