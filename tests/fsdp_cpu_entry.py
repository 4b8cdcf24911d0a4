"""``accelerate launch`` entry point for the FSDP2 recipe on CPU processes (tests only).

accelerate 1.15 turns an FSDP config into FSDP only for GPU-like distributed types: on CPUs
``PartialState`` picks MULTI_CPU and ``AcceleratorState`` never promotes it, so a CPU launch of
the FSDP yaml silently trains with plain DDP (no error, ``optimizer.pt`` instead of FSDP's
``optimizer.bin``). This entry lifts exactly that gate: the plugin accelerate built from the
config's environment is kept and the state says FSDP, so ``Accelerator.prepare`` shards the model
with accelerate's own ``fsdp2_prepare_model`` and the Trainer saves and resumes FSDP checkpoints.
Then it runs ``instructrec`` with the given arguments, unchanged. Each process prints the FSDP
units the preparation made (``FSDP_UNITS {...}``) so the test can compare them with the config.
"""

from __future__ import annotations

import json
import sys


def keep_fsdp_on_cpu() -> None:
    import accelerate.accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original_init = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # what accelerate does for GPUs: the shared states say FSDP (later AcceleratorState()
            # calls copy PartialState's type back, so both are set, as accelerate sets both)
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init

    from tests.fsdp_worker import fsdp_units

    prepare = accelerate.accelerator.fsdp2_prepare_model

    def report_units(accelerator, model):
        model = prepare(accelerator, model)
        print("FSDP_UNITS " + json.dumps({"rank": accelerator.process_index, "units": fsdp_units(model)}), flush=True)
        return model

    accelerate.accelerator.fsdp2_prepare_model = report_units


if __name__ == "__main__":
    keep_fsdp_on_cpu()
    from instructrec.cli import main

    sys.exit(main(sys.argv[1:]))
