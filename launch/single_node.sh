#!/usr/bin/env bash
# Train a recipe on this node with torchrun: one process per GPU, or on CPU as many as
# the recipe's parallel degrees ask for (override with NPROC=N).
#   launch/single_node.sh recipes/debug_cpu.toml --parallelism.data_parallel_shard_degree 2
set -euo pipefail
exec python3 -m tiedmoe_titan.launch "$@"
