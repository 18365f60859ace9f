"""Muon for tied MoE models: torch's Muon on matrices and expert banks, AdamW on the rest.

The paper trains with Muon (Newton-Schulz orthogonalised momentum) on matrices and
AdamW at a tenth of Muon's learning rate on embeddings, the output head, routers and
1-D parameters. ``MuonWithAdamW`` is one optimizer per model part holding both kinds
of parameter groups, so torchtitan's ``OptimizersContainer`` (checkpointing through
DCP, one ``LambdaLR`` per optimizer, step hooks) works unchanged: every group, Muon or
AdamW, bank-scaled or not, follows the schedule from its own initial learning rate.

The Muon math is ``torch.optim.Muon``'s (momentum, decoupled weight decay, its
learning-rate adjustment, its Newton-Schulz coefficients and normalisation; a matrix
steps bit for bit as under ``torch.optim.Muon``), with three extensions:

* A bank is 3-D (experts x out x in): each expert matrix is orthogonalised on its own
  (all of a bank's at once, batched) and the learning-rate adjustment uses the
  expert's (out, in) shape.
* Newton-Schulz runs in bfloat16 as torch's does, or in float32 (``ns_dtype``): in
  bfloat16 the last-bit differences that reduction order leaves in sharded gradients
  flip roundings, so the same run under two layouts drifts apart.
* Parameters may be DTensors (FSDP2, expert parallelism). Momentum and the parameter
  update are elementwise and run on the local shard. Newton-Schulz needs whole
  matrices: when no mesh dimension shards the last two dims (a bank sharded over its
  experts, Shard(0), the usual case) each rank orthogonalises the experts it holds and
  nothing is communicated. Otherwise (a 2-D matrix sharded by rows; a bank sharded on
  dim 1 because efsdp x ep > experts) the momentum-updated matrix is all-gathered over
  the mesh dimensions that split it (not over those that split experts), every rank of
  that group orthogonalises it and keeps its own slice. That costs one all-gather per
  such parameter per step, (N - 1) / N of its bytes in ``ns_dtype`` received per rank,
  and N redundant Newton-Schulz runs; ``docs/muon.md`` has the numbers and the
  alternative (whole matrices assigned to ranks).
"""

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.optim.adam import adam
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.models.moe.moe import GroupedExperts, TokenChoiceTopKRouter

from .compat import MUON_NS_COEFFICIENTS, MUON_NS_EPS, muon_adjusted_lr

NS_COEFFICIENTS = MUON_NS_COEFFICIENTS
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class MuonConfig:
    """The ``[optimizer.muon]`` section: used when ``[optimizer] name = "Muon"``.

    Muon's learning rate is ``optimizer.lr``; AdamW's betas, eps and the weight decay
    come from ``[optimizer]`` too."""

    adamw_lr_ratio: float = 0.1
    """AdamW's learning rate (embeddings, output head, routers, 1-D parameters) as a multiple of optimizer.lr."""

    momentum: float = 0.95
    """Muon's momentum."""

    nesterov: bool = True
    """Nesterov momentum."""

    ns_steps: int = 5
    """Newton-Schulz iterations per step."""

    ns_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Precision of the Newton-Schulz iteration: bfloat16 as torch.optim.Muon; float32 makes the step independent of the parallel layout."""

    adjust_lr_fn: Literal["original", "match_rms_adamw"] = "original"
    """torch.optim.Muon's learning-rate adjustment for the matrix shape: sqrt(max(1, out/in)), or 0.2 sqrt(max(out, in))."""

    weight_decay: float | None = None
    """Muon's decoupled weight decay (scaled by Muon's lr, like AdamW's); unset: optimizer.weight_decay."""


@dataclass
class OptimizerWithMuon:
    """What this package adds to torchtitan's ``[optimizer]`` (merged field by field):
    torchtitan hands only that section to ``build_optimizers_fn``."""

    muon: MuonConfig = field(default_factory=MuonConfig)


# ---- which parameters Muon trains --------------------------------------------------


def muon_and_adamw_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters of ``model`` split into Muon's (2-D matrices and expert
    banks) and AdamW's (embeddings, output head, routers, 1-D parameters)."""
    head = getattr(model, "output", None)
    adamw_modules = [m for m in model.modules() if isinstance(m, (nn.Embedding, TokenChoiceTopKRouter)) or m is head]
    adamw_only = {p for m in adamw_modules for p in m.parameters()}
    banks = {p for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters(recurse=False)}
    muon, adamw = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        is_matrix = p not in adamw_only and (p.ndim == 2 or p in banks)
        (muon if is_matrix else adamw).append(p)
    return muon, adamw


# ---- Newton-Schulz on whole matrices ---------------------------------------------------


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def newton_schulz(update: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz iteration (its coefficients, Frobenius
    normalisation, eps and transpose rule) on every matrix (the last two dims) of
    ``update`` at once, computed in ``dtype``: torch's helper takes one matrix and
    always computes in bfloat16."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype).reshape(-1, *update.shape[-2:])
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=MUON_NS_EPS)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).reshape(update.shape)


def orthogonalise(update: torch.Tensor, param: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """Orthogonalised ``update`` (this rank's part of ``param``'s momentum-updated
    gradient), per matrix, as this rank's part again.

    A mesh dimension that shards one of the last two dims splits matrices: the update
    is all-gathered (in ``dtype``, which Newton-Schulz casts to anyway) over those
    dimensions only (placements on the expert dim stay), so every rank holds whole
    matrices, and each keeps its own slice of the result."""
    if not isinstance(param, DTensor):
        return newton_schulz(update, steps, dtype)
    mesh, placements = param.device_mesh, param.placements
    # Shard and _StridedShard carry ``dim``; Replicate and Partial do not.
    whole = tuple(Replicate() if getattr(p, "dim", -1) >= param.ndim - 2 else p for p in placements)
    if whole == tuple(placements):
        return newton_schulz(update, steps, dtype)
    shape, stride = param.shape, param.stride()
    gathered = DTensor.from_local(update.to(dtype), mesh, placements, run_check=False, shape=shape, stride=stride)
    ortho = newton_schulz(gathered.redistribute(mesh, whole).to_local(), steps, dtype)
    # Replicate -> Shard takes the local chunk: no communication.
    ortho = DTensor.from_local(ortho, mesh, whole, run_check=False, shape=shape, stride=stride)
    return ortho.redistribute(mesh, placements).to_local()


# ---- the optimizer -----------------------------------------------------------------


class MuonWithAdamW(torch.optim.AdamW):
    """AdamW whose parameter groups with ``use_muon`` take torch's Muon step instead:
    Nesterov momentum, Newton-Schulz orthogonalisation per matrix (per expert for a
    3-D bank), decoupled weight decay, shape-adjusted learning rate.

    Groups carry their own hyperparameters (Muon groups: ``momentum``, ``nesterov``,
    ``ns_steps``, ``ns_dtype``, ``adjust_lr_fn``), so bank learning-rate groups can be
    split off any group and keep its kind."""

    def __init__(self, params: Any, muon: MuonConfig, **adamw_kwargs: Any) -> None:
        super().__init__(params, **adamw_kwargs)
        muon_defaults = {
            "use_muon": False,
            "momentum": muon.momentum,
            "nesterov": muon.nesterov,
            "ns_steps": muon.ns_steps,
            "ns_dtype": muon.ns_dtype,
            "adjust_lr_fn": muon.adjust_lr_fn,
        }
        self.defaults.update(muon_defaults)
        for group in self.param_groups:
            for key, value in muon_defaults.items():
                group.setdefault(key, value)
            for p in group["params"] if group["use_muon"] else ():
                if p.ndim not in (2, 3):
                    raise ValueError(f"Muon trains matrices and 3-D expert banks, not a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        lr, momentum = group["lr"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                # Adam's load_state_dict expects a step in every state; Muon counts its own.
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["step"] += 1
            grad, buf = _local(p.grad), _local(state["momentum_buffer"])
            buf.lerp_(grad, 1 - momentum)
            update = grad.lerp(buf, momentum) if group["nesterov"] else buf
            update = orthogonalise(update, p, group["ns_steps"], NS_DTYPES[group["ns_dtype"]])
            param = _local(p)
            param.mul_(1 - lr * group["weight_decay"])
            # The adjustment follows the shape of one matrix: (out, in) of an expert for a bank.
            param.add_(update, alpha=-muon_adjusted_lr(lr, group["adjust_lr_fn"], p.shape[-2:]))

    def _adamw_step(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
        has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
        beta1, beta2 = group["betas"]
        adam(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
            amsgrad=group["amsgrad"], has_complex=has_complex, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
            foreach=group["foreach"], capturable=group["capturable"], differentiable=group["differentiable"],
            fused=group["fused"], decoupled_weight_decay=group["decoupled_weight_decay"],
        )


class MuonOptimizersContainer(OptimizersContainer):
    """torchtitan's container with one ``MuonWithAdamW`` per model part."""

    def __init__(self, model_parts: list[nn.Module], optimizer_kwargs: dict[str, Any], muon: MuonConfig) -> None:
        self.model_parts = model_parts
        self.optimizers = []
        all_params = []
        adamw_lr = optimizer_kwargs["lr"] * muon.adamw_lr_ratio
        muon_weight_decay = optimizer_kwargs["weight_decay"] if muon.weight_decay is None else muon.weight_decay
        for model in model_parts:
            muon_params, adamw_params = muon_and_adamw_params(model)
            groups = [
                {"params": muon_params, "use_muon": True, "weight_decay": muon_weight_decay},
                {"params": adamw_params, "use_muon": False, "lr": adamw_lr},
            ]
            self.optimizers.append(MuonWithAdamW([g for g in groups if g["params"]], muon, **optimizer_kwargs))
            all_params += muon_params + adamw_params
        self._validate_length(len(model_parts))
        self._post_init(all_params, optimizer_kwargs)
