"""Per-rank memory of one training step, estimated from the model's shapes and the layout.

What ``tiedmoe-plan --nodes N --gpus-per-node K`` prints; the formula, its assumptions
and its validation against measured steps are in ``docs/planner.md``. In short, for one
rank:

* parameters: every parameter sharded as FSDP2 / expert parallelism shard it (dim 0,
  padded to a multiple of the shard count; banks on the ``efsdp`` mesh, on dim 1 when
  the EP x efsdp ranks outnumber the experts), in the model's dtype (fp32 master);
* gradients: the same bytes (FSDP2 keeps sharded gradients in the parameter dtype);
* optimizer state: ``optimizer_state_bytes`` (AdamW: two fp32 tensors per parameter;
  Muon: one momentum buffer per matrix and bank, AdamW's two for the rest);
* activations: what autograd saves per token and layer (``layer_activation_bytes``),
  times micro-batch x sequence length, under the activation-checkpointing mode;
* transient: at the loss, the gradients over the vocabulary (2 fp32 tensors of
  batch x seq x vocab besides the saved log-softmax) and the gathered output
  projection; or, in a block's backward, its recomputed activations, incoming
  gradients and two blocks' all-gathered parameters.

The peak is the larger of the forward/backward peak and the optimizer-step peak
(parameters, gradients, optimizer state and the step's scratch).
Nothing is allocated: shapes come from the model built on the meta device.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from torchtitan.config import TORCH_DTYPE_MAP

from .models.bank import banks_of
from .muon import muon_and_adamw_params
from .parallelize import bank_shard_dim

FP32 = 4
INT64 = 8


class MemoryPlanError(ValueError):
    """A setting the memory estimate does not cover; one line naming the key."""


@dataclass(frozen=True)
class StepShape:
    """The training settings that decide a step's memory."""

    local_batch_size: int
    seq_len: int
    microbatches: int = 1
    """Gradient-accumulation steps: above 1, gradients live through every forward."""
    ac_mode: str = "none"  # none | selective | full
    selective_ac_option: str = "2"  # every n-th block fully checkpointed, or "op"
    param_dtype: str = "float32"  # FSDP2 mixed precision: unsharded params, activations
    reduce_dtype: str = "float32"  # FSDP2 mixed precision: gradient reduce-scatter
    optimizer: str = "AdamW"
    optimizer_implementation: str = "fused"  # for-loop | foreach | fused

    @classmethod
    def of_job_config(cls, job_config, data_parallel: int) -> StepShape:
        training = job_config.training
        per_step = training.local_batch_size * data_parallel
        microbatches = training.global_batch_size // per_step if training.global_batch_size > 0 else 1
        if microbatches * per_step != max(training.global_batch_size, per_step):
            raise MemoryPlanError(
                f"training.global_batch_size = {training.global_batch_size} is not a multiple of local_batch_size "
                f"{training.local_batch_size} x data-parallel ranks {data_parallel}: change either, or the ranks"
            )
        ac = job_config.activation_checkpoint
        return cls(
            local_batch_size=training.local_batch_size,
            seq_len=training.seq_len,
            microbatches=microbatches,
            ac_mode=ac.mode,
            selective_ac_option=ac.selective_ac_option,
            param_dtype=training.mixed_precision_param,
            reduce_dtype=training.mixed_precision_reduce,
            optimizer=job_config.optimizer.name,
            optimizer_implementation=job_config.optimizer.implementation,
        )


@dataclass(frozen=True)
class LocalParam:
    """One parameter as a rank holds it after sharding."""

    name: str
    numel: int
    ndim: int
    expert: bool
    muon: bool  # trained by Muon when the recipe picks it (matrices and banks), else AdamW


# ---- optimizer state ----------------------------------------------------------------

ADAM_STATES = 2  # exp_avg, exp_avg_sq, fp32, shaped like the (sharded) parameter
MUON_STATES = 1  # the momentum buffer, fp32, shaped like the (sharded) parameter


def optimizer_state_bytes(optimizer: str, params: list[LocalParam]) -> int:
    """Bytes of optimizer state a rank holds for its (sharded) parameters."""
    if optimizer in ("Adam", "AdamW"):
        return sum(ADAM_STATES * p.numel * FP32 for p in params)
    if optimizer == "Muon":
        return sum((MUON_STATES if p.muon else ADAM_STATES) * p.numel * FP32 for p in params)
    raise MemoryPlanError(f"optimizer.name = {optimizer!r}: the memory planner knows Adam, AdamW and Muon only")


def optimizer_step_temporary_bytes(implementation: str, params: list[LocalParam]) -> int:
    """Scratch memory of one AdamW step: the fused kernel needs none, ``foreach`` one fp32
    copy of all parameters (``_foreach_sqrt`` of the second moments), ``for-loop`` two
    copies of the largest parameter."""
    if implementation == "fused" or not params:
        return 0
    if implementation == "foreach":
        return sum(p.numel for p in params) * FP32
    return 2 * max(p.numel for p in params) * FP32


# ---- parameters and FSDP units ----------------------------------------------------------


def _shard_numel(shape: tuple[int, ...], dim: int, shards: int) -> int:
    """Elements of one shard: ``shape[dim]`` split ``shards`` ways, padded as FSDP2 pads."""
    if shards == 1:
        return math.prod(shape)
    return math.prod(shape) // shape[dim] * math.ceil(shape[dim] / shards)


def local_params(model: nn.Module, parallel_dims) -> list[LocalParam]:
    """Every parameter (each bank once) with the elements one rank holds.

    Non-expert parameters are sharded on dim 0 over ``dp_shard`` (replicated over
    ``dp_replicate``); a bank's experts are split over EP on dim 0, then sharded over
    ``efsdp = dp_shard / ep`` on dim 0, or on dim 1 when ``efsdp x ep`` exceeds the
    experts (both parallelize plans do so)."""
    dp_shard = parallel_dims.dp_shard if parallel_dims.fsdp_enabled else 1
    ep = parallel_dims.ep
    expert_ids = {id(p) for bank in banks_of(model) for p in bank.parameters()}
    muon_ids = {id(p) for p in muon_and_adamw_params(model)[0]}
    out = []
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        expert = id(p) in expert_ids
        if expert and ep > 1:
            local_experts = (shape[0] // ep, *shape[1:])
            efsdp = dp_shard // ep
            dim = bank_shard_dim(shape[0], ep, efsdp)
            numel = _shard_numel(local_experts, dim, efsdp)
        else:
            numel = _shard_numel(shape, 0, dp_shard)
        out.append(LocalParam(name, numel, p.dim(), expert, id(p) in muon_ids))
    return out


def sharded_grad_bytes(params: list[LocalParam], n_layers: int) -> tuple[int, list[int]]:
    """Bytes of the sharded gradients of the head (final norm and output projection,
    the first produced in backward) and of each block (a bank's count under the layer
    that owns it: its gradient is reduce-scattered when the group's first block is
    done). The embedding's, produced last, is in neither."""
    head, blocks = 0, [0] * n_layers
    for p in params:
        parts = p.name.split(".")
        if parts[0] == "layers":
            blocks[int(parts[1])] += p.numel * FP32
        elif parts[0] in ("norm", "output"):
            head += p.numel * FP32
    return head, blocks


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def largest_block_unit(model: nn.Module, ep: int) -> int:
    """Unsharded elements of the biggest block while it runs: its own parameters plus
    the EP-local part of the bank it reads (owned or shared)."""
    largest = 0
    for block in model.layers.values():
        own = _numel(block)
        moe = getattr(block, "moe", None)
        if moe is not None and getattr(block, "moe_enabled", False):
            bank = moe.experts
            own = own - (_numel(bank) if moe.owns_bank else 0) + _numel(bank) // ep
        largest = max(largest, own)
    return largest


# ---- activations ------------------------------------------------------------------------


def norm_saved_bytes(width: int) -> int:
    """What an eager RMSNorm saves per token: its input upcast to fp32, the fp32
    normalised input and 1/rms (its output is counted with whoever saves it)."""
    return 2 * width * FP32 + FP32


def is_mla(model_args) -> bool:
    """True for multi-head latent attention (the deepseek family)."""
    return hasattr(model_args, "kv_lora_rank")


def attention_activation_bytes(model_args, act_bytes: int) -> int:
    """Bytes the attention half of a block saves per token, from its norm on.

    GQA (qwen3 / olmoe): the RMSNorm and QK-norms (``norm_saved_bytes``), the norm's
    output, v and the rotated q / k, the attention output and its log-sum-exp.
    MLA (deepseek, ``q_lora_rank = 0``): the same around sdpa (q and k of width
    ``qk_nope + qk_rope`` per head, v and the output of ``v_head_dim``), plus the
    latent's RMSNorm and its output (``wkv_b``'s input) and the fp32 rope inputs."""
    d = model_args.dim
    attention = norm_saved_bytes(d) + d * act_bytes  # attention_norm, its output (the projections' input)
    h = model_args.n_heads
    if is_mla(model_args):
        qk = h * (model_args.qk_nope_head_dim + model_args.qk_rope_head_dim)
        v = h * model_args.v_head_dim
        latent = norm_saved_bytes(model_args.kv_lora_rank) + model_args.kv_lora_rank * act_bytes
        rope = (h + 1) * model_args.qk_rope_head_dim * FP32
        return attention + latent + rope + (2 * qk + 2 * v) * act_bytes + h * FP32
    n_kv_heads = model_args.n_kv_heads or h
    q = h * model_args.head_dim
    kv = n_kv_heads * model_args.head_dim
    if model_args.qk_norm:
        attention += 2 * (q + kv) * FP32 + (h + n_kv_heads) * FP32
    return attention + (kv + q + kv + q) * act_bytes + h * FP32  # v, rotated q/k, output, lse


def op_checkpoint_kept_bytes(model_args, act_bytes: int) -> int:
    """Bytes per token torchtitan's op-level selective checkpointing keeps of a block:
    its input, every other matmul output (q and v), the attention output and its
    log-sum-exp."""
    h = model_args.n_heads
    if is_mla(model_args):
        q = h * (model_args.qk_nope_head_dim + model_args.qk_rope_head_dim)
        v = out = h * model_args.v_head_dim
    else:
        q = out = h * model_args.head_dim
        v = (model_args.n_kv_heads or h) * model_args.head_dim
    return model_args.dim * act_bytes + (q + v + out) * act_bytes + h * FP32


def layer_activation_bytes(model_args, num_experts: int, moe: bool, act_bytes: int) -> dict[str, int]:
    """Bytes autograd saves per token for one block with no checkpointing, by part.

    Counted from the tensors torch saves for backward in torchtitan's qwen3 and
    deepseek_v3 blocks (eager, listed in docs/planner.md): the attention
    (``attention_activation_bytes``), the FFN's RMSNorm and its output; a dense FFN's
    four hidden states; an MoE layer's router scores (fp32), routing indices, the k
    copies of each token sent to experts, four expert hidden states per copy, the fp32
    un-permuted expert outputs it combines with the scores, and its shared experts'
    four hidden states."""
    d = model_args.dim
    attention = attention_activation_bytes(model_args, act_bytes)
    ffn_norm = norm_saved_bytes(d) + d * act_bytes
    if not moe:
        dense_hidden = model_args.inter_dim if is_mla(model_args) else model_args.hidden_dim
        return {"attention": attention, "ffn": ffn_norm + 4 * dense_hidden * act_bytes}
    moe_args = model_args.moe_args
    k, f, e = moe_args.top_k, model_args.moe_inter_dim, num_experts
    # fp32 logits and two softmaxes (routing, routing losses); top-k and sort indices.
    router = 3 * e * FP32 + (2 * k + 2) * FP32 + 3 * k * INT64
    experts = k * d * act_bytes + 4 * k * f * act_bytes + k * d * FP32
    shared = 4 * moe_args.num_shared_experts * f * act_bytes
    return {"attention": attention, "ffn": ffn_norm + router + experts + shared}


# ---- the estimate -----------------------------------------------------------------------


@dataclass
class RankMemory:
    """Bytes on one rank. ``total`` is the step's peak: the larger of ``forward_backward``
    and ``optimizer_step``."""

    params: int
    grads: int
    optimizer: int
    buffers: int
    activations: int  # saved for backward at the forward/backward peak
    transient: int  # loss, FSDP units in flight, backward scratch at that peak
    forward_backward: int
    optimizer_step: int

    @property
    def static(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return max(self.forward_backward, self.optimizer_step)

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "static": self.static, "total": self.total}


def block_checkpointing(ac_mode: str, selective_ac_option: str, n_layers: int) -> list[str]:
    """What each block keeps for backward: "all" (no checkpointing), "input" (full
    checkpointing) or "op" (torchtitan's op-level selective policy)."""
    if ac_mode == "none":
        return ["all"] * n_layers
    if ac_mode == "full":
        return ["input"] * n_layers
    if ac_mode == "selective":
        if selective_ac_option == "op":
            return ["op"] * n_layers
        if selective_ac_option.isdigit() and int(selective_ac_option) > 0:
            # torchtitan wraps every n-th block it visits (its counter starts at 1).
            every = int(selective_ac_option)
            return ["input" if (i + 1) % every == 0 else "all" for i in range(n_layers)]
    raise MemoryPlanError(
        f"activation_checkpoint.mode = {ac_mode!r} (selective_ac_option {selective_ac_option!r}): the memory "
        "planner knows none, full, and selective with 'op' or a positive integer"
    )


def meta_model(model_cls, model_args) -> nn.Module:
    """The model on the meta device: shapes only, nothing allocated."""
    with torch.device("meta"):
        return model_cls(model_args)


def estimate(model: nn.Module, parallel_dims, shape: StepShape) -> RankMemory:
    """Per-rank memory of one training step of ``model`` (a ``meta_model``) under
    ``parallel_dims``."""
    for key, degree in (("tensor", parallel_dims.tp), ("context", parallel_dims.cp), ("pipeline", parallel_dims.pp)):
        if degree > 1:
            raise MemoryPlanError(
                f"parallelism.{key}_parallel_degree = {degree}: the memory planner covers FSDP / HSDP and "
                f"expert parallelism only; set it to 1"
            )
    for key, value in (("mixed_precision_param", shape.param_dtype), ("mixed_precision_reduce", shape.reduce_dtype)):
        if value not in TORCH_DTYPE_MAP:
            raise MemoryPlanError(f"training.{key} = {value!r}: choose one of {', '.join(TORCH_DTYPE_MAP)}")
    model_args = model.model_args
    params = local_params(model, parallel_dims)
    param_bytes = sum(p.numel for p in params) * FP32
    optimizer = optimizer_state_bytes(shape.optimizer, params)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())

    fsdp = parallel_dims.fsdp_enabled
    # Mixed precision applies to what FSDP all-gathers and to what the step computes.
    act_bytes = TORCH_DTYPE_MAP[shape.param_dtype].itemsize
    tokens = shape.local_batch_size * shape.seq_len
    layout = model_args.tie_layout()
    moe_layers = set(layout.moe_layers)
    per_layer = []
    for layer in range(model_args.n_layers):
        experts = layout.bank_of(layer).num_experts if layer in moe_layers else 0
        per_layer.append(sum(layer_activation_bytes(model_args, experts, layer in moe_layers, act_bytes).values()))
    block_input = model_args.dim * act_bytes
    kept = {"input": block_input, "op": op_checkpoint_kept_bytes(model_args, act_bytes)}
    policies = block_checkpointing(shape.ac_mode, shape.selective_ac_option, model_args.n_layers)
    saved_per_block = [tokens * (per_layer[i] if p == "all" else kept[p]) for i, p in enumerate(policies)]
    saved_blocks = sum(saved_per_block)
    # The final norm, its output (the output projection's input) and the log-softmax
    # kept by the loss.
    saved_head = tokens * (norm_saved_bytes(model_args.dim) + model_args.dim * act_bytes + model_args.vocab_size * FP32)
    activations = saved_blocks + saved_head

    # Peak early in backward, at the loss: the log-softmax's gradient and the logits'
    # gradient (batch x seq x vocab, fp32), with [norm, output] still gathered (FSDP
    # does not reshard it after forward).
    output_unit = _numel(model.output) + _numel(model.norm) if fsdp else 0
    at_loss = activations + 2 * tokens * model_args.vocab_size * FP32 + output_unit * act_bytes
    # Or later, as the backward of a block starts: the activations still saved (its own
    # and the earlier blocks'), its own again if it was checkpointed (recomputed), the
    # incoming gradients (block output, residual, the k routed copies of each token),
    # the gathered parameters of the largest block and of the next, prefetched, and the
    # sharded gradients the head and the later blocks have already produced. (A block's
    # unsharded gradients and the reduce-scatter input come as its activations are
    # freed.) Early blocks hold fewer activations, but more finished gradients.
    gradients = tokens * (2 + model_args.moe_args.top_k) * model_args.dim * act_bytes
    block = largest_block_unit(model, parallel_dims.ep) if fsdp else 0
    # With several micro-batches every gradient is held throughout (``grads_in_flight``).
    head_grads, block_grads = sharded_grad_bytes(params, model_args.n_layers) if shape.microbatches == 1 else (0, [0] * model_args.n_layers)
    in_block = max(
        sum(saved_per_block[: i + 1])
        + (tokens * per_layer[i] if policies[i] != "all" else 0)
        + head_grads + sum(block_grads[i + 1 :])
        for i in range(model_args.n_layers)
    ) + gradients + 2 * block * act_bytes
    transient = max(at_loss, in_block) - activations
    grads_in_flight = param_bytes if shape.microbatches > 1 else 0
    forward_backward = param_bytes + optimizer + buffers + grads_in_flight + activations + transient
    optimizer_step = 2 * param_bytes + optimizer + buffers + optimizer_step_temporary_bytes(
        shape.optimizer_implementation, params
    )
    return RankMemory(
        params=param_bytes,
        grads=param_bytes,
        optimizer=optimizer,
        buffers=buffers,
        activations=activations,
        transient=transient,
        forward_backward=forward_backward,
        optimizer_step=optimizer_step,
    )
