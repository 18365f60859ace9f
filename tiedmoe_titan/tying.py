"""Expert tying: which MoE layer uses which bank of routed experts.

This is the one place where tying is defined. It is pure Python (no torch), so the
model, the parallelize function, the optimizer and ``tiedmoe-plan`` all ask the same
``TieLayout`` instead of re-deriving groups themselves.

Vocabulary
----------
* A *bank* is one set of routed-expert weights (w1, w2, w3 of shape
  ``(experts, ...)``). Every MoE layer reads its routed experts from exactly one bank.
* A *tie group* is the run of consecutive MoE layers that share one bank. The first
  layer of the group *owns* the bank (it is registered there, so ``state_dict()``,
  FSDP and DCP see it once); the other layers hold plain references.
* *Anchors* are MoE layers at the start and end of the stack that keep their own
  (untied) bank; the paper keeps 2 + 2.
* *Bank expansion* X: a tied bank may hold X times the experts of an untied layer
  (same top-k), buying back capacity at 1/G of the memory.
* *Narrow control*: an untied model whose layers hold fewer experts, so that its
  unique parameter count matches a tied layout (same top-k, same expert width, so
  the same active parameters). It answers "is tying better than just shrinking?".

Dense (non-MoE) layers are never tied; anchors and groups count MoE layers only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

BANK_LR_SCALES = ("none", "inv_sqrt_g", "inv_g")


class TieConfigError(ValueError):
    """A tying setting that cannot work. The message is one line naming the field and the fix."""


@dataclass
class TieConfig:
    """The ``[tying]`` section of a recipe."""

    group_size: int = 1
    """G: consecutive MoE layers that share one bank of routed experts (1 = untied)."""

    untied_first: int = 0
    """MoE layers at the start of the stack that keep their own bank (anchors)."""

    untied_last: int = 0
    """MoE layers at the end of the stack that keep their own bank (anchors)."""

    bank_expansion: int = 1
    """A tied bank holds this many times the experts of an untied layer (same top-k)."""

    bank_lr_scale: str = "none"
    """Learning-rate scale for a bank shared by g layers: none, inv_sqrt_g (1/sqrt(g)) or inv_g (1/g)."""

    narrow_control: bool = False
    """Build the untied iso-parameter control of this layout instead of the tied model."""


@dataclass(frozen=True)
class BankSpec:
    """One bank: the layers that use it (the first one owns it) and its size."""

    index: int
    layers: tuple[int, ...]
    num_experts: int

    @property
    def owner(self) -> int:
        return self.layers[0]

    @property
    def group_size(self) -> int:
        return len(self.layers)


@dataclass(frozen=True)
class TieLayout:
    """Banks of one model, in layer order. Build it with :meth:`TieLayout.build`."""

    config: TieConfig
    moe_layers: tuple[int, ...]
    experts_per_layer: int
    banks: tuple[BankSpec, ...]
    _bank_of_layer: dict[int, BankSpec] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def build(
        cls,
        config: TieConfig,
        moe_layers: Sequence[int],
        num_experts: int,
        top_k: int,
        num_expert_groups: int | None = None,
    ) -> "TieLayout":
        """Validate ``config`` against the model and lay out its banks.

        ``moe_layers`` are the ids of the MoE layers (dense layers excluded),
        ``num_experts`` the routed experts of an untied layer.
        """
        _validate(config, len(moe_layers))
        groups = _tie_groups(config, tuple(moe_layers))
        tied_experts = num_experts * config.bank_expansion
        sizes = [tied_experts if _in_tied_region(config, g, moe_layers) else num_experts for g in groups]
        if config.narrow_control:
            # The same number of expert matrices as the tied layout, spread evenly over untied layers.
            narrow = round(sum(sizes) / len(moe_layers))
            groups = [(layer,) for layer in moe_layers]
            sizes = [narrow] * len(moe_layers)
        banks = tuple(BankSpec(i, g, n) for i, (g, n) in enumerate(zip(groups, sizes)))
        for bank in banks:
            _check_bank_size(bank, top_k, num_expert_groups, config)
        layout = cls(config, tuple(moe_layers), num_experts, banks)
        layout._bank_of_layer.update({layer: b for b in banks for layer in b.layers})
        return layout

    # ---- questions the rest of the package asks -------------------------------------

    def bank_of(self, layer_id: int) -> BankSpec:
        return self._bank_of_layer[layer_id]

    def owns_bank(self, layer_id: int) -> bool:
        return self.bank_of(layer_id).owner == layer_id

    @property
    def num_banks(self) -> int:
        return len(self.banks)

    @property
    def num_shared_banks(self) -> int:
        """Banks used by more than one layer."""
        return sum(1 for b in self.banks if b.group_size > 1)

    @property
    def num_unshared_moe_layers(self) -> int:
        """MoE layers whose bank is theirs alone (anchors, a trailing group of one, G=1)."""
        return sum(1 for b in self.banks if b.group_size == 1)

    @property
    def is_tied(self) -> bool:
        return self.num_shared_banks > 0

    @property
    def total_bank_experts(self) -> int:
        """Expert matrices stored, over all banks (each bank once)."""
        return sum(b.num_experts for b in self.banks)

    def lr_scale(self, bank: BankSpec) -> float:
        """Learning-rate multiplier for a bank's parameters (1.0 for a bank of one layer)."""
        g = bank.group_size
        return {"none": 1.0, "inv_sqrt_g": 1.0 / math.sqrt(g), "inv_g": 1.0 / g}[
            self.config.bank_lr_scale
        ]

    def describe(self) -> str:
        """Human-readable layer -> bank map, one bank per line."""
        lines = []
        for b in self.banks:
            layers = ",".join(str(i) for i in b.layers)
            kind = f"shared by {b.group_size} layers" if b.group_size > 1 else "untied"
            lines.append(
                f"bank {b.index}: layers [{layers}] {b.num_experts} experts ({kind}, owner layers.{b.owner})"
            )
        return "\n".join(lines)


# ---- helpers ------------------------------------------------------------------------


def _validate(config: TieConfig, num_moe_layers: int) -> None:
    def need_int(name: str, value, minimum: int, fix: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise TieConfigError(f"tying.{name} = {value!r}: must be an integer >= {minimum} ({fix})")

    need_int("group_size", config.group_size, 1, "1 means untied")
    need_int("untied_first", config.untied_first, 0, "number of leading MoE layers kept untied")
    need_int("untied_last", config.untied_last, 0, "number of trailing MoE layers kept untied")
    need_int("bank_expansion", config.bank_expansion, 1, "1 keeps the experts of an untied layer")
    if config.bank_lr_scale not in BANK_LR_SCALES:
        raise TieConfigError(
            f"tying.bank_lr_scale = {config.bank_lr_scale!r}: must be one of {', '.join(BANK_LR_SCALES)}"
        )
    if num_moe_layers == 0:
        if config.group_size > 1:
            raise TieConfigError("tying.group_size > 1 but the model has no MoE layers: set group_size = 1")
        return
    if config.group_size == 1:
        if config.bank_expansion > 1:
            raise TieConfigError(
                f"tying.bank_expansion = {config.bank_expansion} needs tied banks: set tying.group_size > 1 or bank_expansion = 1"
            )
        if config.narrow_control:
            raise TieConfigError(
                "tying.narrow_control matches the parameters of a tied layout: set tying.group_size > 1 to describe it"
            )
        return
    anchors = config.untied_first + config.untied_last
    left = num_moe_layers - anchors
    if left < 2:
        raise TieConfigError(
            f"tying.untied_first + tying.untied_last = {anchors} leave {max(left, 0)} of {num_moe_layers} "
            f"MoE layers to tie: lower the anchors (at most {num_moe_layers - 2} in all) or set group_size = 1"
        )


def _tie_groups(config: TieConfig, moe_layers: tuple[int, ...]) -> list[tuple[int, ...]]:
    if config.group_size == 1:
        return [(layer,) for layer in moe_layers]
    first, last = config.untied_first, len(moe_layers) - config.untied_last
    middle = moe_layers[first:last]
    groups = [(layer,) for layer in moe_layers[:first]]
    # The last group may be shorter than G.
    groups += [middle[i : i + config.group_size] for i in range(0, len(middle), config.group_size)]
    groups += [(layer,) for layer in moe_layers[last:]]
    return groups


def _in_tied_region(config: TieConfig, group: tuple[int, ...], moe_layers: Sequence[int]) -> bool:
    """True for the groups between the anchors (they get the expanded bank)."""
    if config.group_size == 1:
        return False
    position = list(moe_layers).index(group[0])
    return config.untied_first <= position < len(moe_layers) - config.untied_last


def _check_bank_size(bank: BankSpec, top_k: int, num_expert_groups: int | None, config: TieConfig) -> None:
    where = f"bank {bank.index} (layers {list(bank.layers)})"
    if top_k > bank.num_experts:
        fix = "raise tying.bank_expansion" if not config.narrow_control else "use a smaller tying.group_size"
        raise TieConfigError(f"moe top_k = {top_k} exceeds the {bank.num_experts} experts of {where}: {fix} or lower top_k")
    if num_expert_groups and bank.num_experts % num_expert_groups:
        raise TieConfigError(
            f"{where} has {bank.num_experts} experts, not divisible by moe num_expert_groups = {num_expert_groups}: "
            "choose tying.bank_expansion (or the narrow control's group size) so the groups divide the bank"
        )
