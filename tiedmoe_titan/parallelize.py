"""Parallelize function of the tied families.

An untied layout (G=1) is exactly torchtitan's model, so it goes through torchtitan's
own ``parallelize_qwen3`` unchanged (TP, EP, CP, AC, compile, FSDP/HSDP, DDP).
A tied layout must treat each bank as one object under FSDP and EP; until that
plan exists, tied models train on a single process (activation checkpointing and
compile still apply) and any data/expert/tensor/context parallelism is refused.
"""

from __future__ import annotations

from torch import nn

from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.models.qwen3.infra.parallelize import parallelize_qwen3


class UnsupportedParallelism(ValueError):
    pass


def parallelize_tied(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig) -> nn.Module:
    layout = model.model_args.tie_layout()
    if layout.is_tied:
        spread = {
            "parallelism.data_parallel_shard_degree": parallel_dims.dp_shard,
            "parallelism.data_parallel_replicate_degree": parallel_dims.dp_replicate,
            "parallelism.expert_parallel_degree": parallel_dims.ep,
            "parallelism.tensor_parallel_degree": parallel_dims.tp,
            "parallelism.context_parallel_degree": parallel_dims.cp,
        }
        used = [f"{k} = {v}" for k, v in spread.items() if v > 1]
        if used:
            raise UnsupportedParallelism(
                f"{', '.join(used)}: tied banks (tying.group_size = {layout.config.group_size}) "
                "train on a single process in this version; set these degrees to 1 or tying.group_size = 1"
            )
    return parallelize_qwen3(model, parallel_dims, job_config)
