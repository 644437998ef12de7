"""Run by tests/test_calibration.py under torchrun: every rank merges with its shard of the
calibration data; rank 0 writes the merged parameters."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import graphmerge as gm
from tests.test_calibration import _batches, _models

if __name__ == "__main__":
    dist.init_process_group("gloo")
    out = Path(sys.argv[1])
    for norms, refit in (("repair", False), ("reset", False), ("repair", True)):
        result = gm.merge(_models(((1, 1, 1), (2, 2, 2))), _batches(6), norms=norms,
                          refit=refit, progress=False)
        if dist.get_rank() == 0:
            torch.save(result.module.state_dict(), out / f"{norms}{'_refit' * refit}.pt")
    dist.destroy_process_group()
