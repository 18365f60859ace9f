"""Parallelize function of the tied families: each bank is sharded once.

An untied layout (G=1) is exactly torchtitan's model, so it goes through torchtitan's
own plan for the family unchanged (``parallelize_qwen3``, ``parallelize_deepseekv3``).
A tied layout gets the plan below.

FSDP2 units of a tied model (innermost first)::

    per block      fully_shard([attention_norm, attention, ffn_norm, moe.router, moe.shared_experts])
                   everything of the block except the bank, on the dp mesh (a dense
                   block's feed_forward too)
    per bank       fully_shard([block_a, block_b, ...])   the blocks of the bank's tie group
                   what is left in them is exactly the bank (registered under block_a);
                   on the efsdp mesh under expert parallelism
    root           tok_embeddings, [norm, output], model

Because the bank's unit spans its whole group, FSDP all-gathers the bank once before
the group's first block runs forward and reshards it after the last one, all-gathers
it once when backward reaches the group, and reduce-scatters its gradient once after
the group's first block finishes backward. Per microbatch that is 2 all-gathers and 1
reduce-scatter per bank, against one of each per MoE layer untied. (Letting the bank
be its own unit would re-gather it for every layer of the group.)

Expert parallelism places each bank's experts across the EP ranks once (torchtitan's
``ExpertParallel`` hooks live on the bank module, so every layer of the group
dispatches its tokens to the same placement).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import parallelize_module
from torchtitan.config import TORCH_DTYPE_MAP, JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.distributed.expert_parallel import ExpertParallel
from torchtitan.models.deepseek_v3.infra.parallelize import parallelize_deepseekv3
from torchtitan.models.deepseek_v3.model.model import DeepSeekV3Model
from torchtitan.models.llama3.infra.parallelize import disable_fsdp_gradient_division
from torchtitan.models.llama4.infra.parallelize import apply_compile
from torchtitan.models.qwen3.infra.parallelize import parallelize_qwen3
from torchtitan.models.qwen3.model.model import Qwen3Model

from . import compat
from .models.bank import banks_of
from .tying import TieLayout


class UnsupportedParallelism(ValueError):
    """A parallelism setting the tied plan cannot honour; one line naming the key."""


# The torchtitan model each family builds on -> torchtitan's plan for it.
TORCHTITAN_PLANS = {Qwen3Model: parallelize_qwen3, DeepSeekV3Model: parallelize_deepseekv3}


def torchtitan_base(model: nn.Module) -> type:
    """The torchtitan model class ``model``'s family builds on."""
    return next(base for base in TORCHTITAN_PLANS if isinstance(model, base))


def parallelize_tied(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig) -> nn.Module:
    layout: TieLayout = model.model_args.tie_layout()
    check_parallelism(type(model), layout, parallel_dims, job_config)
    if layout.is_tied:
        _parallelize_tied_layout(model, layout, parallel_dims, job_config)
    else:
        TORCHTITAN_PLANS[torchtitan_base(model)](model, parallel_dims, job_config)
    compat.adapt_fsdp(model)
    return model


def check_parallelism(model_cls: type, layout: TieLayout, parallel_dims: ParallelDims, job_config: JobConfig) -> None:
    """Refuse, in one line naming the key, what this model and layout cannot honour."""
    for bank in layout.banks:
        if bank.num_experts % parallel_dims.ep:
            raise UnsupportedParallelism(
                f"parallelism.expert_parallel_degree = {parallel_dims.ep} does not divide the {bank.num_experts} "
                f"experts of bank {bank.index} (layers {list(bank.layers)}): choose a degree that divides "
                f"every bank ({sorted({b.num_experts for b in layout.banks})})"
            )
    if parallel_dims.tp > 1 and model_cls.tensor_parallel_refusal:
        raise UnsupportedParallelism(
            f"parallelism.tensor_parallel_degree = {parallel_dims.tp}: {model_cls.tensor_parallel_refusal}; set it to 1"
        )
    backend = job_config.parallelism.expert_parallel_comm_backend
    if backend != "standard":
        raise UnsupportedParallelism(
            f"parallelism.expert_parallel_comm_backend = {backend!r}: tied MoE layers dispatch tokens with "
            "torchtitan's standard all-to-all; set it to \"standard\""
        )
    if not layout.is_tied:
        return
    tied = f"tied banks (tying.group_size = {layout.config.group_size})"
    refusals = {
        "parallelism.tensor_parallel_degree": parallel_dims.tp > 1,
        "parallelism.context_parallel_degree": parallel_dims.cp > 1,
        "parallelism.pipeline_parallel_degree": parallel_dims.pp > 1,
        "model.converters (float8 / mx)": bool(job_config.model.converters),
        # torchtitan's DDP averages gradients while its loss is already divided by the
        # global token count (FSDP is set to sum); HSDP (dp_shard > 1) has no such issue.
        "parallelism.data_parallel_replicate_degree without data_parallel_shard_degree (DDP)": (
            parallel_dims.dp_replicate_enabled and not parallel_dims.fsdp_enabled
        ),
    }
    for key, refused in refusals.items():
        if refused:
            raise UnsupportedParallelism(f"{key} is not supported with {tied} yet: turn it off or set tying.group_size = 1")


def _parallelize_tied_layout(model, layout: TieLayout, parallel_dims: ParallelDims, job_config: JobConfig) -> None:
    compile_enabled = job_config.compile.enable and "model" in job_config.compile.components
    if parallel_dims.ep_enabled:
        ep_mesh = parallel_dims.get_mesh("ep")
        for bank in banks_of(model):
            parallelize_module(bank, ep_mesh, ExpertParallel())
    if job_config.activation_checkpoint.mode != "none":
        apply_ac(
            model,
            job_config.activation_checkpoint,
            model_compile_enabled=compile_enabled,
            op_sac_save_list=compat.SAC_SAVE_OPS[torchtitan_base(model)],
            base_folder=job_config.job.dump_folder,
        )
    if compile_enabled:
        apply_compile(model, job_config.compile, parallel_dims.ep_enabled)

    if parallel_dims.fsdp_enabled:
        apply_tied_fsdp(model, layout, parallel_dims, job_config)


def bank_shard_dim(num_experts: int, ep: int, efsdp: int) -> int:
    """The dim FSDP shards a bank's EP-local experts on over ``efsdp`` ranks. EP has
    split the experts on dim 0; when ``efsdp x ep`` exceeds them there is not one
    expert per rank left, so FSDP shards dim 1 instead, as torchtitan's plans do."""
    return 1 if efsdp * ep > num_experts else 0


def _unwrapped(block: nn.Module) -> nn.Module:
    """The transformer block inside an activation-checkpoint wrapper, if any."""
    return getattr(block, "_checkpoint_wrapped_module", block)


def _non_bank_modules(block: nn.Module) -> list[nn.Module]:
    """The children of a block that hold its parameters, except the bank."""
    inner = _unwrapped(block)
    modules = [m for name, m in inner.named_children() if name != "moe"]
    if getattr(inner, "moe_enabled", False):
        moe = inner.moe
        modules += [m for name, m in moe.named_children() if name != "experts"]
    return [m for m in modules if any(True for _ in m.parameters())]


def apply_tied_fsdp(model: nn.Module, layout: TieLayout, parallel_dims: ParallelDims, job_config: JobConfig) -> None:
    training = job_config.training
    mp_policy = MixedPrecisionPolicy(
        param_dtype=TORCH_DTYPE_MAP[training.mixed_precision_param],
        reduce_dtype=TORCH_DTYPE_MAP[training.mixed_precision_reduce],
    )
    policy = job_config.parallelism.fsdp_reshard_after_forward
    if policy not in ("default", "always", "never"):
        raise UnsupportedParallelism(
            f"parallelism.fsdp_reshard_after_forward = {policy!r}: must be default, always or never"
        )
    reshard = policy != "never"
    dp_names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
    edp_names = ["dp_replicate", "efsdp"] if parallel_dims.dp_replicate_enabled else ["efsdp"]
    dp_config = {"mesh": parallel_dims.get_mesh(dp_names), "mp_policy": mp_policy}
    if training.enable_cpu_offload:
        dp_config["offload_policy"] = CPUOffloadPolicy()
    bank_config = dict(dp_config)
    if parallel_dims.ep_enabled:
        bank_config["mesh"] = parallel_dims.get_mesh(edp_names)

    fully_shard(model.tok_embeddings, **dp_config, reshard_after_forward=reshard)
    layers = model.layers
    block_units = {}
    for layer_id, block in layers.items():
        block_units[int(layer_id)] = _non_bank_modules(block)
        fully_shard(block_units[int(layer_id)], **dp_config, reshard_after_forward=reshard)
    efsdp = parallel_dims.get_mesh("efsdp").size() if parallel_dims.ep_enabled else 1
    for bank in layout.banks:
        placement = None
        if bank_shard_dim(bank.num_experts, parallel_dims.ep, efsdp) == 1:
            placement = lambda param: Shard(1)  # noqa: E731
        blocks = [layers[str(layer)] for layer in bank.layers]
        fully_shard(blocks, **bank_config, reshard_after_forward=reshard, shard_placement_fn=placement)
    fully_shard([model.norm, model.output], **dp_config, reshard_after_forward=policy == "always")
    fully_shard(model, **dp_config)
    # torchtitan normalises the loss by the global token count: FSDP must sum, not average.
    disable_fsdp_gradient_division(model)
    if parallel_dims.ep_enabled:
        _set_explicit_prefetch(model, layout, block_units)


def _set_explicit_prefetch(model, layout: TieLayout, block_units: dict[int, list[nn.Module]]) -> None:
    """Expert parallelism syncs device and host, which stalls FSDP's implicit prefetch
    (as torchtitan notes), so the next units are listed explicitly: while block i
    computes, block i+1's units are gathered, including the bank of a group that
    starts there (forward) or ends there (backward)."""
    layers = model.layers
    ids = sorted(block_units)
    nonbank = {i: block_units[i][0] for i in ids}  # any module of a unit names the unit

    def entered(i: int, at: str) -> list[FSDPModule]:
        units = [nonbank[i]]
        if i in layout.moe_layers:
            group = layout.bank_of(i).layers
            if i == (group[0] if at == "forward" else group[-1]):
                units.insert(0, layers[str(i)])  # the bank's unit
        return units

    model.tok_embeddings.set_modules_to_forward_prefetch(entered(ids[0], "forward"))
    for i, j in zip(ids, ids[1:]):
        nonbank[i].set_modules_to_forward_prefetch(entered(j, "forward"))
        nonbank[j].set_modules_to_backward_prefetch(entered(i, "backward"))
    nonbank[ids[-1]].set_modules_to_forward_prefetch([model.norm])
    model.norm.set_modules_to_backward_prefetch(entered(ids[-1], "backward"))
    nonbank[ids[0]].set_modules_to_backward_prefetch([model.tok_embeddings])
