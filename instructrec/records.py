"""Run records shared by training, evaluation and the benches: what a run was measured on
(CPU, cores, torch and threads, load), the command line that started it, and percentiles.

Standard library only (torch is imported when a machine description is asked for), so every
layer above the core can write the same record without importing another layer.
"""

from __future__ import annotations

import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

# CPU flags worth knowing for this workload (fp32 / bf16 / int8 matmuls).
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                "amx_int8")



def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation between order statistics (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 50)


def _cpuinfo() -> list[dict[str, str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    blocks = []
    for block in text.strip().split("\n\n"):
        entry = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                entry[key.strip()] = value.strip()
        blocks.append(entry)
    return blocks


def cpu_model() -> str:
    for entry in _cpuinfo():
        if entry.get("model name"):
            return entry["model name"]
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> set[str]:
    for entry in _cpuinfo():
        if "flags" in entry:
            return set(entry["flags"].split())
    return set()


def physical_cores() -> int | None:
    cores = {(e.get("physical id"), e.get("core id")) for e in _cpuinfo() if "core id" in e}
    return len(cores) or None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (call it when the run's thread settings are in place)."""
    import torch

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:  # pragma: no cover
        tf_version = None
    flags = cpu_flags()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - informative only
        capability = None
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "physical_cores": physical_cores(),
        "cpu_features": {f: f in flags for f in CPU_FEATURES},
        "torch_cpu_capability": capability,
        "torch": torch.__version__,
        "transformers": tf_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ},
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def bf16_support() -> dict[str, Any]:
    """Whether this CPU has native bf16 (AVX512-BF16 / AMX) and what torch reports."""
    import torch

    flags = cpu_flags()
    out = {"avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags, "amx_int8": "amx_int8" in flags,
           "amx_tile": "amx_tile" in flags}
    try:
        out["mkldnn_bf16_supported"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - private API, informative only
        out["mkldnn_bf16_supported"] = None
    return out


def invoked_as() -> str:
    """The process's own command line (under pytest this is pytest's)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("instructrec", "instructrec.exe"):
        argv[0] = "instructrec"
    elif argv and Path(argv[0]).parts[-2:] == ("instructrec", "cli.py"):
        argv[:1] = ["python", "-m", "instructrec.cli"]
    return shlex.join(argv)


def platform_brief() -> dict[str, Any]:
    """The short machine record a training run keeps in its checkpoint metadata."""
    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}


def code_commit() -> str | None:
    """The git commit of the code running (``+dirty`` with uncommitted changes), or None outside a clone."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
