"""The DeepSeek-style family against torchtitan's deepseek_v3 model, on CPU in fp32.

The debug flavor: 6 layers, layer 0 dense, MoE layers 1-5 with 8 routed experts in 2
groups (one allowed per token), one shared expert, sigmoid router, expert bias on.
"""

import copy
import dataclasses

import pytest
import torch
from conftest import (
    assert_equals_torchtitan_model,
    assert_matches_single_process,
    assert_tied_equals_untied_with_copied_experts,
    build_model,
    flavor_args,
    tokens,
)
from torchtitan.distributed import ParallelDims
from torchtitan.models.deepseek_v3 import deepseekv3_args
from torchtitan.models.deepseek_v3.model.args import DeepSeekV3ModelArgs
from torchtitan.models.deepseek_v3.model.model import DeepSeekV3Model
from torchtitan.models.utils import get_moe_model_nparams_and_flops

from tiedmoe_titan.config import parse_recipe
from tiedmoe_titan.models import TiedDeepSeekModel, banks_of
from tiedmoe_titan.models.accounting import count_params
from tiedmoe_titan.optim import update_expert_biases
from tiedmoe_titan.parallelize import UnsupportedParallelism
from tiedmoe_titan.plan import plan, shard_dry_run
from tiedmoe_titan.testing import shard_check
from tiedmoe_titan.testing.shard_check import CheckConfig
from tiedmoe_titan.tying import TieConfig

FAMILY = "deepseek"
TIED_2 = TieConfig(group_size=2, untied_first=1)  # banks: (1,), (2, 3), (4, 5)
MOE_LAYERS, TIED_BANKS = 5, 3
RECIPE = "recipes/deepseek/debug_cpu.toml"


def torchtitan_deepseek(args) -> DeepSeekV3Model:
    """torchtitan's own untied deepseek_v3 model with the same shape as ``args``."""
    fields = {f.name for f in dataclasses.fields(DeepSeekV3ModelArgs)}
    plain = DeepSeekV3ModelArgs(**{k: copy.deepcopy(getattr(args, k)) for k in fields})
    plain.moe_args = args.layer_moe_args()  # same expert path and expert bias setting
    plain.moe_impl = "standard"  # torchtitan sets it in update_from_config
    return DeepSeekV3Model(plain)


def test_debug_flavor_exercises_the_family():
    args = flavor_args(FAMILY)
    moe = args.layer_moe_args()
    assert args.attn_type == "sdpa" and args.n_dense_layers == 1 and args.moe_layer_ids() == [1, 2, 3, 4, 5]
    assert (moe.score_func, moe.route_norm, moe.num_shared_experts) == ("sigmoid", True, 1)
    assert (moe.num_expert_groups, moe.num_limited_groups, moe.load_balance_coeff) == (2, 1, 1e-3)


def test_sdpa_flavors_give_no_attention_masks():
    # torchtitan's validator asks for masks and skips them on TypeError.
    with pytest.raises(TypeError):
        build_model(FAMILY).get_attention_masks(tokens(), tokenizer=None)


def test_untied_is_torchtitan_deepseek_exactly():
    ours = build_model(FAMILY, seed=3)
    assert_equals_torchtitan_model(ours, torchtitan_deepseek(ours.model_args), seed=3)


def test_tied_equals_untied_torchtitan_with_copied_experts():
    tied = build_model(FAMILY, TIED_2, seed=5)
    untied = torchtitan_deepseek(flavor_args(FAMILY))
    assert_tied_equals_untied_with_copied_experts(tied, untied)


def test_only_routed_experts_are_tied():
    model = build_model(FAMILY, TIED_2)
    layout = model.model_args.tie_layout()
    assert [b.layers for b in layout.banks] == [(1,), (2, 3), (4, 5)]
    keys = model.state_dict().keys()
    weights = ("w1", "w2", "w3")
    # Routed experts once per bank, under its first layer ...
    assert sorted(k for k in keys if ".moe.experts." in k) == sorted(f"layers.{o}.moe.experts.{w}" for o in (1, 2, 4) for w in weights)
    assert len(banks_of(model)) == TIED_BANKS
    # ... shared experts, routers and expert biases in every MoE layer, the dense FFN in layer 0.
    for layer in layout.moe_layers:
        assert {f"layers.{layer}.moe.shared_experts.{w}.weight" for w in weights} <= keys
        assert {f"layers.{layer}.moe.router.gate.weight", f"layers.{layer}.moe.expert_bias"} <= keys
    assert {f"layers.0.feed_forward.{w}.weight" for w in weights} <= keys
    assert not any(k.startswith("layers.0.moe") for k in keys)
    m2, m3 = model.layers["2"].moe, model.layers["3"].moe
    assert m2.experts is m3.experts and m2.shared_experts is not m3.shared_experts


def test_expert_bias_updates_per_layer_over_a_shared_bank():
    model = build_model(FAMILY, TIED_2, expert_bias_rate=1e-3)
    layers = [model.layers[str(i)].moe for i in range(1, 6)]
    model(tokens())
    counts = [m.tokens_per_expert.clone() for m in layers]
    # Layers 2 and 3 read one bank but route on their own: separate counts ...
    assert counts[1].sum() == counts[2].sum() == 2 * 32 * 2
    assert not torch.equal(counts[1], counts[2])
    # ... and group-limited routing keeps each token within one group of 4 experts.
    update_expert_biases([model], ParallelDims(dp_shard=1, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1))
    for m, c in zip(layers, counts):
        delta = 1e-3 * torch.sign(c.mean() - c)
        torch.testing.assert_close(m.expert_bias, delta - delta.mean(), rtol=0, atol=0)
        assert m.tokens_per_expert.sum() == 0
    assert not torch.equal(layers[1].expert_bias, layers[2].expert_bias)


def test_group_limited_routing_picks_one_group_per_token():
    model = build_model(FAMILY, TIED_2)
    router = model.layers["2"].moe.router
    x = torch.randn(64, model.model_args.dim)
    _, selected, _ = router(x, model.layers["2"].moe.expert_bias)
    groups = selected // 4  # 8 experts in 2 groups
    assert torch.equal(groups[:, 0], groups[:, 1])


@pytest.mark.parametrize(
    "tying",
    [
        [],
        ["--tying.group_size", "2", "--tying.untied_first", "1"],
        ["--tying.group_size", "4", "--tying.untied_first", "0", "--tying.bank_expansion", "2"],
        ["--tying.group_size", "2", "--tying.untied_first", "1", "--tying.bank_expansion", "4", "--tying.narrow_control"],
    ],
)
def test_plan_counts_equal_the_built_model(tying):
    p = plan(parse_recipe(RECIPE, ["--tying.group_size", "1", *tying]))
    model = TiedDeepSeekModel(flavor_args(FAMILY, tying=TieConfig(**p["tying"])))  # real CPU tensors
    assert p["total_params"] == sum(param.numel() for param in model.parameters())
    banks = banks_of(model)
    assert p["expert_params"] == sum(q.numel() for b in banks for q in b.parameters())
    assert [b["num_experts"] for b in p["banks"]] == [b.num_experts for b in banks]
    # Active: everything but routed experts, plus top_k experts of each MoE layer's bank.
    a = model.model_args
    expert_matrix = 3 * a.dim * a.moe_inter_dim
    assert p["active_params"] == p["other_params"] + MOE_LAYERS * a.moe_args.top_k * expert_matrix


def test_untied_flops_equal_torchtitan():
    model = build_model(FAMILY)
    a = model.model_args
    head_dims = a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim
    assert a.get_nparams_and_flops(model, 128) == get_moe_model_nparams_and_flops(a, model, head_dims, 128)


def test_16B_anchor_matches_deepseek_v2_lite_on_meta():
    """DeepSeek-V2-Lite: 15.7B total, 2.4B active (DeepSeek counts active parameters
    without the embedding table)."""
    untied = plan(parse_recipe("recipes/deepseek/16B_g4_64gpu.toml", ["--tying.group_size", "1"]))
    assert untied["total_params"] == 15_706_484_224
    assert untied["active_params"] == 2_661_150_208
    embedding = 102400 * 2048
    assert 2.4e9 <= untied["active_params"] - embedding < 2.5e9
    # torchtitan's own "16B" flavor has the same parameters (only routing choices differ).
    args = copy.deepcopy(deepseekv3_args["16B"])
    args.moe_impl = "standard"
    with torch.device("meta"):
        assert count_params(DeepSeekV3Model(args)).total == untied["total_params"]
    # Tied G=4 (2+2 anchors): 26 MoE layers in 10 banks, counted exactly.
    tied = plan(parse_recipe("recipes/deepseek/16B_g4_64gpu.toml"))
    bank = 64 * 3 * 2048 * 1408
    assert tied["num_banks"] == 10 and tied["num_moe_layers"] == 26
    assert tied["expert_params"] == 10 * bank
    assert tied["total_params"] == untied["total_params"] - 16 * bank
    assert tied["active_params"] == untied["active_params"]


def test_untied_keeps_torchtitan_tensor_parallel_plan():
    """G=1 goes through parallelize_deepseekv3, TP included (a dry run on the fake
    backend: sharding only, no numerics); tied layouts refuse TP."""
    tp = ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2"]
    assert shard_dry_run(parse_recipe(RECIPE, ["--tying.group_size", "1", *tp]), 4)["per_rank_param_bytes"] > 0
    with pytest.raises(UnsupportedParallelism, match="parallelism.tensor_parallel_degree"):
        shard_dry_run(parse_recipe(RECIPE, tp), 4)


# ---- shard once: FSDP2 and expert parallelism on 2 gloo processes ---------------------

TIED = {"group_size": 2, "untied_first": 1}
LAYOUTS = {
    "dp2_g1": {"dp_shard": 2, "tying": {}},
    "dp2_g2": {"dp_shard": 2, "tying": TIED},
    "dp2_ep2_g1": {"dp_shard": 2, "ep": 2, "tying": {}},
    "dp2_ep2_g2": {"dp_shard": 2, "ep": 2, "tying": TIED},
    # torch.compile of each block (MLA, shared experts, banks read by two layers) under FSDP + EP.
    "dp2_ep2_g2_compile": {"dp_shard": 2, "ep": 2, "tying": TIED, "compile_backend": "aot_eager"},
}
COMMON = {"family": FAMILY, "steps": 2, "microbatches": 1}  # gradient accumulation: test_shard_once.py


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    configs = {name: {**COMMON, **fields} for name, fields in LAYOUTS.items()}
    return shard_check.launch(2, configs, str(tmp_path_factory.mktemp("deepseek_ranks2") / "results.pt"))


def check_config(fields: dict) -> CheckConfig:
    return CheckConfig.from_fields({**COMMON, **fields})


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_two_ranks_equal_single_process(two_ranks, name):
    # The state includes the expert biases.
    assert_matches_single_process(two_ranks[name], {**COMMON, **LAYOUTS[name]}, loss_rel=1e-6, grad_rel=1e-5, state_atol=2e-5)


def test_each_rank_holds_each_bank_once(two_ranks):
    expert_numel = MOE_LAYERS * 3 * 8 * 128 * 64  # untied: 5 layers x 3 weights x 8 experts x dim x moe_inter_dim
    for mesh in ("dp2", "dp2_ep2"):
        tied, untied = two_ranks[f"{mesh}_g2"]["expert_memory"], two_ranks[f"{mesh}_g1"]["expert_memory"]
        # Parameters, gradients and AdamW state of routed experts: one copy per bank, not per layer.
        for kind in ("params", "grads", "optimizer"):
            assert tied[kind] * MOE_LAYERS == untied[kind] * TIED_BANKS, (mesh, kind)
        # Each rank holds half of every bank (FSDP shards, or EP places half the experts).
        assert untied["params"] == expert_numel * 4 // 2


def expert_collectives(result: dict, op: str) -> list[int]:
    """Per step, the number of ``op`` calls that move a whole unit holding routed experts."""
    sizes = result["expert_unit_bytes"]
    return [sum(1 for o, group, nbytes in calls if o == op and group == 2 and nbytes in sizes) for calls in result["collectives"]]


def test_bank_collectives_once_per_group(two_ranks):
    tied, untied = two_ranks["dp2_g2"], two_ranks["dp2_g1"]
    microbatches = COMMON["microbatches"]
    # Forward + backward: 2 all-gathers per bank per microbatch, against 2 per MoE layer
    # untied (torchtitan's block units); one reduce-scatter each per microbatch.
    assert expert_collectives(tied, "allgather_base") == [2 * TIED_BANKS * microbatches] * 2
    assert expert_collectives(untied, "allgather_base") == [2 * MOE_LAYERS * microbatches] * 2
    assert expert_collectives(tied, "reduce_scatter_base") == [TIED_BANKS * microbatches] * 2
    assert expert_collectives(untied, "reduce_scatter_base") == [MOE_LAYERS * microbatches] * 2
    # Under EP every layer of a group dispatches its tokens to the bank's one placement.
    a2a = [sum(1 for o, _, _ in calls if o == "all_to_all_single") for calls in two_ranks["dp2_ep2_g2"]["collectives"]]
    assert a2a == [sum(1 for o, _, _ in calls if o == "all_to_all_single") for calls in two_ranks["dp2_ep2_g1"]["collectives"]]
    assert a2a[0] > 0


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_planner_static_memory_equals_the_ranks(two_ranks, name):
    """tiedmoe-plan's parameters, gradients and AdamW state per rank, against what each
    measured rank held (the deepseek blocks: dense FFN, MLA, shared experts, banks)."""
    from tiedmoe_titan.testing.shard_check import estimate_check

    predicted = estimate_check(check_config(LAYOUTS[name]), 2)
    measured = two_ranks[name]["rank_memory"]
    assert (predicted.params, predicted.grads, predicted.optimizer) == (measured["params"], measured["grads"], measured["optimizer"])
