"""The tied families against torchtitan's own untied model, on CPU in fp32."""

import copy
import dataclasses

import pytest
import torch
from conftest import assert_equals_torchtitan_model, assert_tied_equals_untied_with_copied_experts, build_model, flavor_args, tokens
from torchtitan.models.qwen3.model.args import Qwen3ModelArgs
from torchtitan.models.qwen3.model.model import Qwen3Model

from tiedmoe_titan.models import FAMILIES, ExpertBank, banks_of
from tiedmoe_titan.tying import TieConfig

TIED_2 = TieConfig(group_size=2, untied_first=2, untied_last=2)


def torchtitan_qwen3(args) -> Qwen3Model:
    """torchtitan's own untied qwen3 model with the same shape as ``args``."""
    fields = {f.name for f in dataclasses.fields(Qwen3ModelArgs)}
    plain = Qwen3ModelArgs(**{k: copy.deepcopy(getattr(args, k)) for k in fields})
    plain.moe_args = args.layer_moe_args()  # same expert path, same expert bias setting
    return Qwen3Model(plain)


@pytest.mark.parametrize("use_grouped_mm", [True, False], ids=["grouped", "for_loop"])
def test_untied_is_torchtitan_qwen3_exactly(use_grouped_mm):
    """Both models on the same expert path: the default grouped one (on CPU torchtitan's
    GroupedExperts runs tiedmoe_titan.compat's fp32 grouped GEMMs too), and torchtitan's
    untouched fp32 for-loop path. The grouped path against the for-loop one, which is
    bit-equal only for some shapes, is tests/test_cpu_experts.py's."""
    args = flavor_args("qwen3")
    args.moe_args = dataclasses.replace(args.moe_args, use_grouped_mm=use_grouped_mm)
    ours = FAMILIES["qwen3"][0](args)
    torch.manual_seed(3)
    with torch.no_grad():
        ours.init_weights()
    assert all(bank.use_grouped_mm == use_grouped_mm for bank in banks_of(ours))
    assert_equals_torchtitan_model(ours, torchtitan_qwen3(ours.model_args), seed=3)


@pytest.mark.parametrize("family", ["qwen3", "olmoe"])
def test_tied_equals_untied_with_copied_experts(family):
    tied = build_model(family, TIED_2, seed=5)
    untied = build_model(family, seed=6)  # same family, untied, different weights
    assert_tied_equals_untied_with_copied_experts(tied, untied)


def test_each_bank_is_stored_once():
    model = build_model("qwen3", TieConfig(group_size=3, untied_first=1, untied_last=1, bank_expansion=2))
    layout = model.model_args.tie_layout()
    # 8 MoE layers, 1+1 anchors, 6 tied in groups of 3 -> 4 banks.
    assert [b.layers for b in layout.banks] == [(0,), (1, 2, 3), (4, 5, 6), (7,)]
    expert_keys = [k for k in model.state_dict() if ".moe.experts." in k]
    assert sorted(expert_keys) == sorted(f"layers.{b.owner}.moe.experts.{w}" for b in layout.banks for w in ("w1", "w2", "w3"))
    banks = banks_of(model)
    assert len(banks) == layout.num_banks
    params = list(model.parameters())
    assert len({id(p) for p in params}) == len(params)
    for bank_spec in layout.banks:
        owner_bank = model.layers[str(bank_spec.owner)].moe.experts
        assert owner_bank.num_experts == bank_spec.num_experts
        for layer in bank_spec.layers:
            moe = model.layers[str(layer)].moe
            assert moe.experts is owner_bank
            assert moe.router.gate.out_features == bank_spec.num_experts
            assert moe.owns_bank == (layer == bank_spec.owner)
    # Tied banks hold 2x the experts of an anchor (bank expansion), anchors keep 8.
    assert [b.num_experts for b in layout.banks] == [8, 16, 16, 8]
    # The layer -> bank map is in the repr.
    text = repr(model)
    assert "ExpertBank(bank=1, layers=[1, 2, 3], experts=16)" in text
    assert "experts -> bank 1 (owned by layers.1)" in text


def test_bank_initialised_once_from_first_layer_of_group(monkeypatch):
    """Each bank is initialised exactly once, with its first layer's init std (depth
    init); the other layers of the group initialise only their own router."""
    calls = []
    real = ExpertBank.init_weights

    def recording(bank, init_std):
        calls.append((bank, init_std))
        real(bank, init_std)

    monkeypatch.setattr(ExpertBank, "init_weights", recording)
    model = build_model("qwen3", TIED_2, seed=11)
    layout = model.model_args.tie_layout()
    assert len(calls) == len(layout.banks)
    for bank_spec in layout.banks:
        bank = model.layers[str(bank_spec.owner)].moe.experts
        assert [std for b, std in calls if b is bank] == [model.layers[str(bank_spec.owner)].weight_init_std]
    # Depth init gives the layers of a group different stds, so the owner is the one that counts.
    assert model.layers["2"].weight_init_std != model.layers["3"].weight_init_std
    assert not torch.equal(model.layers["2"].moe.router.gate.weight, model.layers["3"].moe.router.gate.weight)


def test_layers_keep_their_own_router_state():
    model = build_model("qwen3", TIED_2, expert_bias_rate=1e-3)
    m2, m3 = model.layers["2"].moe, model.layers["3"].moe
    assert m2.experts is m3.experts
    assert m2.expert_bias is not m3.expert_bias and m2.tokens_per_expert is not m3.tokens_per_expert
    model(tokens())
    # Different routers route differently over the same bank: separate counts.
    assert m2.tokens_per_expert.sum() == m3.tokens_per_expert.sum() == 2 * 32 * 2
    assert not torch.equal(m2.tokens_per_expert, m3.tokens_per_expert)
