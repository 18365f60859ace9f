"""tiedmoe-plan and the parameter / FLOP accounting behind it."""

import json
import subprocess
import sys

import pytest
from conftest import build_model, flavor_args
from torchtitan.models.utils import get_moe_model_nparams_and_flops

from tiedmoe_titan.config import RecipeError, parse_recipe
from tiedmoe_titan.models import FAMILIES
from tiedmoe_titan.plan import plan
from tiedmoe_titan.tying import TieConfig

RECIPE = "recipes/debug_cpu.toml"


def plan_of(*overrides: str) -> dict:
    return plan(parse_recipe(RECIPE, list(overrides)))


@pytest.mark.parametrize("family", ["qwen3", "olmoe"])
@pytest.mark.parametrize(
    "tying",
    [
        [],
        ["--tying.group_size", "2"],
        ["--tying.group_size", "3", "--tying.untied_first", "1", "--tying.untied_last", "1", "--tying.bank_expansion", "2"],
        ["--tying.group_size", "4", "--tying.untied_first", "2", "--tying.untied_last", "2", "--tying.narrow_control"],
    ],
)
def test_plan_counts_equal_the_built_model(family, tying):
    p = plan_of("--model.name", f"tiedmoe_{family}", "--tying.group_size", "1", *tying)
    args = flavor_args(family, tying=TieConfig(**p["tying"]))
    model = FAMILIES[family][0](args)  # real CPU tensors, not meta
    assert p["total_params"] == sum(param.numel() for param in model.parameters())
    banks = [m.experts for m in model.modules() if getattr(m, "owns_bank", False)]
    assert p["expert_params"] == sum(q.numel() for b in banks for q in b.parameters())
    assert p["num_banks"] == len(banks)
    assert [b["num_experts"] for b in p["banks"]] == [b.num_experts for b in banks]


def test_anchor_totals_match_published_counts():
    olmoe = plan_of("--model.flavor", "1B-7B", "--tying.group_size", "1")
    assert round(olmoe["total_params"] / 1e9, 2) == 6.92
    assert round(olmoe["active_params"] / 1e9, 2) == 1.28
    qwen = plan_of("--model.name", "tiedmoe_qwen3", "--model.flavor", "30B-A3B", "--tying.group_size", "1")
    assert round(qwen["total_params"] / 1e9, 1) == 30.5
    assert abs(qwen["active_params"] / 1e9 - 3.3) < 0.06


def test_regular_olmoe_g4_halves_parameters():
    p = plan_of("--model.flavor", "regular", "--tying.group_size", "4")
    assert p["num_banks"] == 7 and p["num_shared_banks"] == 3
    assert round(p["untied_to_tied_ratio"], 2) == 2.04
    # Tying does not change what a token computes.
    assert p["active_params"] == p["untied_active_params"]


def closed_form_flops(model, seq_len: int) -> int:
    """6 x (non-embedding, non-expert params + each layer's top_k experts) + attention."""
    a = model.model_args
    expert_matrix = 3 * a.dim * a.moe_inter_dim
    non_expert = sum(p.numel() for n, p in model.named_parameters() if ".moe.experts." not in n and "embedding" not in n)
    return 6 * (non_expert + a.n_layers * a.moe_args.top_k * expert_matrix) + 6 * a.n_layers * a.n_heads * 2 * a.head_dim * seq_len


def test_flops_per_token_closed_form():
    seq_len = 128
    untied = build_model("olmoe")
    tied = build_model("olmoe", TieConfig(group_size=2, untied_first=2, untied_last=2, bank_expansion=2))
    tied_flops = tied.model_args.get_nparams_and_flops(tied, seq_len)[1]
    untied_flops = untied.model_args.get_nparams_and_flops(untied, seq_len)[1]
    assert tied_flops == closed_form_flops(tied, seq_len)
    assert untied_flops == closed_form_flops(untied, seq_len)
    # A bank counts once per layer that uses it: tying changes compute only through the
    # wider routers of expanded banks, never by dropping the shared layers' experts.
    router_growth = 6 * 4 * untied.model_args.dim * 8  # 4 tied layers, 8 more router outputs each
    assert tied_flops - untied_flops == router_growth
    # At G=1 torchtitan's own accounting agrees.
    head_dims = 2 * untied.model_args.head_dim
    assert get_moe_model_nparams_and_flops(untied.model_args, untied, head_dims, seq_len)[1] == untied_flops


def test_bad_recipe_values_are_one_line_errors():
    with pytest.raises(RecipeError, match="tying.group_size"):
        plan_of("--tying.group_size", "0")
    with pytest.raises(RecipeError, match="model.flavor"):
        plan_of("--model.flavor", "huge")


def test_cli_json_and_exit_code():
    out = subprocess.run(
        [sys.executable, "-m", "tiedmoe_titan.plan", RECIPE, "--json"], capture_output=True, text=True, check=True
    )
    p = json.loads(out.stdout)
    assert {"total_params", "expert_params", "active_params", "untied_total_params"} <= p.keys()
    bad = subprocess.run(
        [sys.executable, "-m", "tiedmoe_titan.plan", RECIPE, "--tying.untied_first", "5"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "tying.untied_first" in bad.stderr


def test_real_scale_shard_dry_run_on_64_fake_ranks():
    """OLMoE-1B-7B, G=4 with 2+2 anchors, 64 ranks with EP=8, on torchtitan's fake backend:
    each rank holds 1/64 of every bank once, 7/16 of the untied expert bytes."""
    from tiedmoe_titan.plan import shard_dry_run

    layout = ["--model.flavor", "1B-7B", "--parallelism.data_parallel_shard_degree", "64", "--parallelism.expert_parallel_degree", "8"]
    tied_cfg = parse_recipe(RECIPE, [*layout, "--tying.group_size", "4"])
    untied_cfg = parse_recipe(RECIPE, [*layout, "--tying.group_size", "1"])
    tied, untied = shard_dry_run(tied_cfg, 64), shard_dry_run(untied_cfg, 64)
    assert tied["per_rank_expert_param_bytes"] == plan(tied_cfg)["expert_params"] * 4 // 64
    assert tied["per_rank_expert_param_bytes"] * 16 == untied["per_rank_expert_param_bytes"] * 7
    assert tied["per_rank_other_param_bytes"] == untied["per_rank_other_param_bytes"]
