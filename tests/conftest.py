"""Test settings shared by every test module.

Tests run beside other work on a 2-core machine: spinning OpenMP threads collapse under
contention, so torch gets one thread and OpenMP waits passively. Nothing reaches a model hub.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
