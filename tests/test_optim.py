"""Optimizers: each bank parameter once, bank LR groups, per-layer expert bias."""

import math

import pytest
import torch
from conftest import build_model
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims

from tiedmoe_titan.optim import build_tied_optimizers
from tiedmoe_titan.tying import TieConfig


def single_process_dims() -> ParallelDims:
    return ParallelDims(dp_shard=1, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)


def optimizers_for(model, lr=1e-3):
    config = JobConfig().optimizer
    config.lr = lr
    config.implementation = "for-loop"
    return build_tied_optimizers([model], config, single_process_dims())


@pytest.mark.parametrize("mode, scale", [("none", 1.0), ("inv_sqrt_g", 1 / math.sqrt(3)), ("inv_g", 1 / 3)])
def test_bank_lr_groups(mode, scale):
    model = build_model("qwen3", TieConfig(group_size=3, untied_first=1, untied_last=1, bank_lr_scale=mode))
    (optimizer,) = optimizers_for(model, lr=1e-3).optimizers
    # Each parameter exactly once across groups.
    seen = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    shared_bank = model.layers["1"].moe.experts  # layers 1-3
    anchor_bank = model.layers["0"].moe.experts
    assert lr_of[id(shared_bank.w1)] == pytest.approx(1e-3 * scale)
    assert lr_of[id(anchor_bank.w1)] == pytest.approx(1e-3)
    assert lr_of[id(model.layers["2"].moe.router.gate.weight)] == pytest.approx(1e-3)


def test_expert_bias_updates_each_layer_over_a_shared_bank():
    model = build_model("qwen3", TieConfig(group_size=2, untied_first=2, untied_last=2), expert_bias_rate=1e-3)
    optimizers = optimizers_for(model)
    x = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(0))
    model(x).float().mean().backward()
    counts = {layer: model.layers[layer].moe.tokens_per_expert.clone() for layer in ("2", "3")}
    optimizers.step()
    for layer, c in counts.items():
        moe = model.layers[layer].moe
        delta = 1e-3 * torch.sign(c.mean() - c)
        torch.testing.assert_close(moe.expert_bias, delta - delta.mean())
        assert moe.tokens_per_expert.sum() == 0
    assert not torch.equal(model.layers["2"].moe.expert_bias, model.layers["3"].moe.expert_bias)
