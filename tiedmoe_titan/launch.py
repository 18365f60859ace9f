"""``tiedmoe-launch RECIPE.toml [--section.key value ...]``: torchrun on this node.

Picks what a single-node run needs and passes the recipe through to ``tiedmoe-train``:

* processes: ``NPROC`` if set; else one per visible GPU; else (CPU) the world size the
  recipe's parallel degrees ask for (1 if they leave it free);
* rendezvous: ``--standalone`` (a free local port); for several nodes (``NNODES`` > 1,
  e.g. from ``slurm/train.sbatch``) c10d rendezvous at ``RDZV_ENDPOINT`` with
  ``RDZV_ID``;
* logs of local rank 0 only, and on CPU the cores split evenly between the processes.

The recipe is checked before anything is launched: a mistake is one line, exit code 2.
"""

from __future__ import annotations

import os
import sys

import torch

USAGE = "usage: tiedmoe-launch RECIPE.toml [--section.key value ...]"


def recipe_world_size(job_config) -> int:
    p = job_config.parallelism
    shard = p.data_parallel_shard_degree if p.data_parallel_shard_degree > 0 else 1
    return shard * p.data_parallel_replicate_degree * p.context_parallel_degree * p.tensor_parallel_degree * p.pipeline_parallel_degree


def torchrun_command(recipe: str, overrides: list[str], job_config, env: dict[str, str]) -> list[str]:
    nnodes = int(env.get("NNODES", "1"))
    if "NPROC" in env:
        nproc = int(env["NPROC"])
    elif torch.cuda.is_available():
        nproc = torch.cuda.device_count()
    else:
        nproc = max(recipe_world_size(job_config) // nnodes, 1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--local-ranks-filter", "0"]
    if nnodes > 1:
        cmd += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", env["RDZV_ENDPOINT"], "--rdzv-id", env.get("RDZV_ID", "tiedmoe")]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "tiedmoe_titan.train", recipe, *overrides]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        raise SystemExit(USAGE)
    from .config import RecipeError, parse_recipe

    try:
        job_config = parse_recipe(argv[0], argv[1:])
    except RecipeError as e:
        print(f"tiedmoe-launch: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    env = dict(os.environ)
    cmd = torchrun_command(argv[0], argv[1:], job_config, env)
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in env:
        nproc = int(cmd[cmd.index("--nproc-per-node") + 1])
        env["OMP_NUM_THREADS"] = str(max((os.cpu_count() or 1) // nproc, 1))
    print("tiedmoe-launch: " + " ".join(cmd), flush=True)
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
