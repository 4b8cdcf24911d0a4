"""Host memory of loading a checkpoint stored in float32 to serve it in a narrower dtype.

Flan-T5-XL's files hold float32 (11 GB for 3 B parameters). Two ways to serve it in bf16:
read the tensors as stored and cast the model afterwards (how ``load_model`` did it), or read
each tensor straight into the target dtype (``load_model`` now, via ``from_pretrained(dtype=)``).
Each runs in a fresh process on the same generated checkpoint (a Flan-layout T5, random
weights, saved in float32), which reports its peak resident memory (``VmHWM``) and its peak
anonymous memory (sampled every millisecond). The difference matters for what a host must
hold: anonymous memory cannot be dropped, while file pages of a memory-mapped safetensors
file are page cache the kernel may take back.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

VARIANTS = {
    "as-stored-then-cast": "from_pretrained in the checkpoint's dtype, then model.to(dtype)",
    "target-dtype": "instructrec.modeling.load_model(dir, dtype=...): tensors read straight into the dtype",
}


def make_checkpoint(out: Path, d_model: int, layers: int, vocab: int) -> dict[str, Any]:
    """A Flan-layout T5 (gated-GELU, untied head) with seeded random weights, saved in float32."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from instructrec.modeling import minilm_path

    config = T5Config(vocab_size=vocab, d_model=d_model, d_ff=d_model * 4, d_kv=64, num_heads=max(1, d_model // 64),
                      num_layers=layers, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    marker = out / "bench.json"
    wanted = {"d_model": d_model, "layers": layers, "vocab": vocab}
    if marker.is_file() and json.loads(marker.read_text()).get("shape") == wanted:
        return json.loads(marker.read_text())
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config).to(torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(out)  # any tokenizer: loading needs one
    params = sum(p.numel() for p in model.parameters())
    info = {"shape": wanted, "parameters": params,
            "file_mb": round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20, 1)}
    marker.write_text(json.dumps(info))
    return info


def _status(key: str) -> int:
    """A /proc/self/status line in KiB (VmHWM, VmRSS, RssAnon)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def measure(variant: str, directory: str, dtype: str) -> dict[str, Any]:
    """Run in a fresh process: load once, report memory in MiB beyond what imports took."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from instructrec.modeling import DTYPES, load_model

    torch.set_num_threads(1)
    before_rss, before_anon = _status("VmRSS"), _status("RssAnon")
    peak_anon = [before_anon]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
            time.sleep(0.001)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    if variant == "as-stored-then-cast":
        model = AutoModelForSeq2SeqLM.from_pretrained(directory).to(DTYPES[dtype])
    else:
        model = load_model(directory, device="cpu", dtype=dtype).model
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"variant": variant, "seconds": round(seconds, 2), "weights_mb": round(weights / 2**20, 1),
            "peak_rss_mb": round((_status("VmHWM") - before_rss) / 1024, 1),
            "peak_anon_mb": round((peak_anon[0] - before_anon) / 1024, 1),
            "end_anon_mb": round((_status("RssAnon") - before_anon) / 1024, 1),
            "dtypes": sorted({str(p.dtype) for p in model.parameters()})}


def run_load(out: Path, dtype: str, d_model: int, layers: int, vocab: int,
             progress=print) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    progress(f"checkpoint: Flan-layout T5, d_model {d_model}, {layers}+{layers} layers, vocabulary {vocab}, float32")
    info = make_checkpoint(out / "checkpoint", d_model, layers, vocab)
    rows = []
    for variant in VARIANTS:
        progress(f"loading with {variant} in a fresh process")
        proc = subprocess.run([sys.executable, "-m", "instructrec.bench.load_bench", variant, str(out / "checkpoint"), dtype],
                              capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                                                   **_inherited()})
        if proc.returncode != 0:
            raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    import transformers

    return {"server": {"cpu": platform.processor() or _cpu_name(), "dtype": dtype,
                       "transformers": transformers.__version__, **info},
            "rows": rows, "variants": VARIANTS}


def _inherited() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE")}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2], sys.argv[3])))
