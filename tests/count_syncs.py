"""torchrun entry for tests/test_train.py: the collectives and host reads (``.item()``)
of each training step, for tiedmoe-train's trainer or torchtitan's own on one recipe.

    torchrun ... tests/count_syncs.py {ours|torchtitan} OUT.json RECIPE.toml [--key value ...]

Every op that reaches the dispatcher during ``should_continue_training`` and
``train_step`` is seen; c10d ops (collectives) and ``aten._local_scalar_dense`` (what
``.item()`` runs) are counted per step. Rank 0 writes ``{step: {op: count}}``.
"""

import json
import os
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchtitan.train import Trainer

from tiedmoe_titan.config import parse_recipe
from tiedmoe_titan.train import TiedMoETrainer


class CountSyncs(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "c10d" in name or "_local_scalar_dense" in name:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    which, out, recipe, *overrides = sys.argv[1:]
    job_config = parse_recipe(recipe, overrides)
    trainer = (TiedMoETrainer if which == "ours" else Trainer)(job_config)
    per_step: dict[int, Counter] = {}

    def counted(method):
        def run(*args, **kwargs):
            with CountSyncs(per_step.setdefault(trainer.step, Counter())):
                return method(*args, **kwargs)

        return run

    trainer.train_step = counted(trainer.train_step)
    trainer.should_continue_training = counted(trainer.should_continue_training)
    trainer.train()
    if which == "ours":
        trainer.stop_agreement.close()
    trainer.close()
    if int(os.environ["RANK"]) == 0:
        with open(out, "w") as f:
            json.dump({step: dict(c) for step, c in per_step.items()}, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
