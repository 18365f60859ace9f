"""An MoE layer whose routed experts live in a (possibly shared) ExpertBank.

``TiedMoE`` is torchtitan's ``MoE`` (its router, token reordering, expert-parallel
dispatch and aux-loss-free expert bias are reused unchanged) with two additions:

* its ``experts`` attribute is the layer's bank. The first layer of a tie group
  registers the bank as a submodule; the other layers keep a plain attribute, so
  ``state_dict()``, ``parameters()``, FSDP and DCP see each bank once.
* it computes its own routing losses (load-balancing and router z-loss) from its
  router's logits, because torchtitan 0.2.2's loss function only sees logits and
  labels. ``model_routing_loss`` combines them; the trainer adds that to the loss.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.models.moe import MoE, MoEArgs

from ..compat import in_backward
from ..tying import TieLayout
from .bank import ExpertBank


def routing_losses(
    gate_logits: torch.Tensor,
    num_tokens_per_expert: torch.Tensor,
    top_k: int,
    score_func: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load-balancing loss and router z-loss of one layer on one microbatch.

    Args:
        gate_logits: router logits, shape ``(tokens, experts)``.
        num_tokens_per_expert: routed assignments per expert, shape ``(experts,)``
            (sums to ``tokens * top_k``).

    Returns ``(lb, z)`` with
        lb = E * sum_i f_i * P_i, f_i = assignments to i / (tokens * top_k), P_i = mean
             routing probability of i (Switch / megablocks convention: 1.0 when the
             load is uniform; Hugging Face's OLMoE code reports top_k times this),
        z  = mean over tokens of logsumexp(logits)^2.
    """
    logits_f32 = gate_logits.float()
    num_tokens, num_experts = logits_f32.shape
    if score_func == "softmax":
        probs = F.softmax(logits_f32, dim=-1)
    else:  # sigmoid routers: balance the normalised affinities (DeepSeek-V3's choice)
        scores = torch.sigmoid(logits_f32)
        probs = scores / scores.sum(dim=-1, keepdim=True)
    load_fraction = num_tokens_per_expert.detach().float() / (num_tokens * top_k)
    lb = num_experts * torch.dot(load_fraction, probs.mean(dim=0))
    z = torch.logsumexp(logits_f32, dim=-1).square().mean()
    return lb, z


class LogitsKeepingLinear(nn.Linear):
    """The router's gate; keeps its latest output (the router logits) for the routing
    losses. An attribute rather than a hook, so torch.compile of the router traces it."""

    logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.logits = super().forward(x)
        return self.logits


ROUTING_STATS = ("entropy_sum", "tokens", "lb_sum", "z_sum", "forwards")
"""Entries of ``TiedMoE.stats_routing``: router entropy (nats) summed over tokens, tokens
routed, load-balancing and z-loss summed over forwards, and the number of forwards."""


class TiedMoE(MoE):
    """torchtitan's MoE layer reading its routed experts from ``bank``.

    Everything else (router, expert bias, token counts, shared experts) is this
    layer's own, so load balancing works per layer over a shared bank.
    """

    def __init__(self, moe_args: MoEArgs, dim: int, bank: ExpertBank, layer_id: int):
        super().__init__(
            dataclasses.replace(moe_args, num_experts=bank.num_experts),
            dim=dim,
            hidden_dim=bank.hidden_dim,
        )
        # torchtitan built a private GroupedExperts; the bank replaces it.
        del self.experts
        self.layer_id = layer_id
        self.owns_bank = bank.owner == layer_id
        if self.owns_bank:
            self.experts = bank
        else:
            # A plain attribute, not a submodule: the bank is registered (and so
            # saved, sharded and optimised) once, under the first layer of its group.
            object.__setattr__(self, "experts", bank)

        self.score_func = moe_args.score_func
        # (lb, z) of the latest forward, attached to the graph; read by the trainer.
        self.routing_losses: tuple[torch.Tensor, torch.Tensor] | None = None
        gate = self.router.gate
        self.router.gate = LogitsKeepingLinear(gate.in_features, gate.out_features, bias=gate.bias is not None)
        # Routing statistics for tiedmoe_titan.metrics, which reads and resets them:
        # accumulated on device by training forwards (not by activation-checkpoint
        # recomputes, not in eval mode); never saved. See ``ROUTING_STATS``.
        self.register_buffer("stats_tokens_per_expert", torch.zeros(bank.num_experts, dtype=torch.float32), persistent=False)
        self.register_buffer("stats_routing", torch.zeros(len(ROUTING_STATS), dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torchtitan's MoE adds this forward's routed assignments to tokens_per_expert.
        counted_before = self.tokens_per_expert.clone()
        out = super().forward(x)
        gate = self.router.gate
        logits, gate.logits = gate.logits, None
        # Computed during an activation-checkpointing recompute too: the recompute
        # must save the same tensors as the forward. Kept only from the forward.
        counts = self.tokens_per_expert - counted_before
        losses = routing_losses(logits, counts, self.router.top_k, self.score_func)
        if not in_backward():
            self.routing_losses = losses
            if self.training:
                self._accumulate_statistics(logits, counts, losses)
        return out

    @torch.no_grad()
    def _accumulate_statistics(
        self, logits: torch.Tensor, counts: torch.Tensor, losses: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        """Add one forward's routing to the statistics buffers, on device (no host sync)."""
        logits = logits.detach().float()
        if self.score_func == "softmax":
            log_p = F.log_softmax(logits, dim=-1)
        else:  # the normalised sigmoid scores, as routing_losses balances them
            log_s = F.logsigmoid(logits)
            log_p = log_s - torch.logsumexp(log_s, dim=-1, keepdim=True)
        entropy_sum = -(log_p.exp() * log_p).sum()
        one = entropy_sum.new_ones(())
        lb, z = losses
        self.stats_tokens_per_expert.add_(counts.float())
        # Order: ROUTING_STATS.
        self.stats_routing.add_(torch.stack([entropy_sum, one * logits.shape[0], lb.detach().float(), z.detach().float(), one]))

    def reset_statistics(self, device: torch.device | str | None = None) -> None:
        """Zero the statistics (and, given ``device``, re-create them there)."""
        if device is None:
            self.stats_tokens_per_expert.zero_()
            self.stats_routing.zero_()
            return
        self.stats_tokens_per_expert = torch.zeros(self.experts.num_experts, dtype=torch.float32, device=device)
        self.stats_routing = torch.zeros(len(ROUTING_STATS), dtype=torch.float32, device=device)

    def init_weights(self, init_std: float, buffer_device: torch.device) -> None:
        self.reset_statistics(buffer_device)  # to_empty() left them uninitialised
        if self.owns_bank:
            super().init_weights(init_std, buffer_device)
            return
        # The bank was initialised by the first layer of its group (the paper's code
        # aliases that layer's experts); initialising it again here would make the
        # bank's init depend on the last layer of the group instead.
        self.router.init_weights(init_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(init_std)
        with torch.device(buffer_device):
            self.tokens_per_expert = torch.zeros(self.experts.num_experts, dtype=torch.float32)
            if self.load_balance_coeff is not None:
                self.expert_bias = torch.zeros(self.experts.num_experts, dtype=torch.float32)

    def extra_repr(self) -> str:
        if self.owns_bank:
            return ""
        return f"experts -> bank {self.experts.bank_index} (owned by layers.{self.experts.owner})"


def tied_moe_layers(model: nn.Module) -> list[TiedMoE]:
    return [m for m in model.modules() if isinstance(m, TiedMoE)]


def model_routing_loss(
    model: nn.Module, aux_loss_coeff: float, z_loss_coeff: float
) -> torch.Tensor | None:
    """aux_loss_coeff * mean_l lb_l + z_loss_coeff * mean_l z_l over the MoE layers of
    the latest forward (averaged over layers as the paper's code does), or None when
    both coefficients are zero or no forward has run. Consumes the stored losses."""
    layers = tied_moe_layers(model)
    losses = [m.routing_losses for m in layers if m.routing_losses is not None]
    for m in layers:
        m.routing_losses = None
    if not losses or (aux_loss_coeff == 0 and z_loss_coeff == 0):
        return None
    lb = torch.stack([lb for lb, _ in losses]).mean()
    z = torch.stack([z for _, z in losses]).mean()
    return aux_loss_coeff * lb + z_loss_coeff * z


def loss_with_routing(loss_sum: torch.Tensor, labels: torch.Tensor, model: nn.Module, routing) -> torch.Tensor:
    """The training loss of one microbatch: ``loss_sum`` (cross-entropy summed over its
    tokens) plus the model's routing loss (``model_routing_loss``, coefficients from
    ``routing``) weighted by the microbatch's non-ignored tokens. The trainer divides
    the sum by the global count of non-ignored tokens, so the routing loss enters as its
    token-weighted mean over microbatches. It adds gradient, not value: the loss logged
    stays the cross-entropy."""
    routing_loss = model_routing_loss(model, routing.aux_loss_coeff, routing.z_loss_coeff)
    if routing_loss is None:
        return loss_sum
    weighted = routing_loss * (labels != IGNORE_INDEX).sum()
    return loss_sum + (weighted - weighted.detach())


def tie_experts(layers: nn.ModuleDict, layout: TieLayout, moe_args: MoEArgs, dim: int, hidden_dim: int) -> None:
    """Give every MoE block in ``layers`` a ``TiedMoE`` reading its bank from ``layout``.

    Each block's ``moe`` (built by torchtitan's block constructor) is replaced; the
    bank of a group is created once and registered under the group's first layer.
    """
    for spec in layout.banks:
        bank = ExpertBank(spec, dim, hidden_dim, moe_args.use_grouped_mm)
        for layer_id in spec.layers:
            layers[str(layer_id)].moe = TiedMoE(moe_args, dim, bank, layer_id)
