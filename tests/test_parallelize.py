"""Parallel settings the tied plan refuses, with one line naming the key."""

import pytest

from tiedmoe_titan.config import parse_recipe
from tiedmoe_titan.parallelize import UnsupportedParallelism
from tiedmoe_titan.plan import shard_dry_run

RECIPE = "recipes/debug_cpu.toml"


def dry_run(world: int, *overrides: str):
    return shard_dry_run(parse_recipe(RECIPE, list(overrides)), world)


def test_expert_parallel_must_divide_every_bank():
    with pytest.raises(UnsupportedParallelism, match="parallelism.expert_parallel_degree = 16 does not divide"):
        dry_run(16, "--parallelism.data_parallel_shard_degree", "16", "--parallelism.expert_parallel_degree", "16")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["--parallelism.tensor_parallel_degree", "2"], "parallelism.tensor_parallel_degree"),
        (["--parallelism.context_parallel_degree", "2"], "parallelism.context_parallel_degree"),
        (["--parallelism.data_parallel_shard_degree", "1", "--parallelism.data_parallel_replicate_degree", "4"], "(DDP)"),
    ],
)
def test_unsupported_parallelism_is_refused_for_tied_banks(overrides, key):
    with pytest.raises(UnsupportedParallelism) as err:
        dry_run(4, "--parallelism.data_parallel_shard_degree", "2", *overrides)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_untied_layout_keeps_torchtitan_parallelisms():
    # G=1 goes through torchtitan's own plan, TP included (qwen3: per-head QK-norm) ...
    tp = ["--tying.group_size", "1", "--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2"]
    assert dry_run(4, "--model.name", "tiedmoe_qwen3", *tp)["per_rank_param_bytes"] > 0
    # ... but OLMoE's full-width QK-norm cannot be split across TP ranks.
    with pytest.raises(UnsupportedParallelism, match="full-width QK-norm"):
        dry_run(4, *tp)


def test_deepep_is_refused():
    with pytest.raises(UnsupportedParallelism, match="expert_parallel_comm_backend = 'deepep'"):
        dry_run(2, "--parallelism.data_parallel_shard_degree", "2", "--parallelism.expert_parallel_comm_backend", "deepep")
