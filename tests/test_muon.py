"""Muon: torch's math on matrices and per expert on banks, AdamW on the rest; the same
parameters under FSDP2 and expert parallelism as in one process.

The sharded runs use float32 Newton-Schulz: in bfloat16 the 1e-7 differences that
reduction order leaves in sharded gradients flip bf16 roundings, so two layouts drift
apart by a visible fraction of an update (see docs/muon.md); in float32 they agree to
about 1e-6 after three steps at lr 0.02.
"""


import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import assert_matches_single_process, build_model
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims

from tiedmoe_titan.config import RecipeError, parse_recipe
from tiedmoe_titan.muon import MuonConfig, MuonWithAdamW, muon_and_adamw_params, newton_schulz
from tiedmoe_titan.optim import build_tied_optimizers
from tiedmoe_titan.testing import shard_check
from tiedmoe_titan.testing.shard_check import CheckConfig, reference
from tiedmoe_titan.tying import TieConfig

TIED = {"group_size": 2, "untied_first": 2, "untied_last": 2}
MUON_FP32 = {"optimizer": {"name": "Muon", "muon": {"ns_dtype": "float32"}}, "lr": 0.02}
TWO_RANKS = {
    "dp2_g1": {"dp_shard": 2, "tying": {}, **MUON_FP32},
    "dp2_g2": {"dp_shard": 2, "tying": TIED, **MUON_FP32},
    "dp2_ep2_g1": {"dp_shard": 2, "ep": 2, "tying": {}, **MUON_FP32},
    "dp2_ep2_g2": {"dp_shard": 2, "ep": 2, "tying": TIED, **MUON_FP32},
}
# torch's bfloat16 Newton-Schulz: the gathered path in bfloat16; close, not equal (docstring).
BF16_NS = {"dp2_g2_bf16_ns": {"dp_shard": 2, "tying": TIED, "optimizer": {"name": "Muon"}, "lr": 0.02}}
# efsdp 2 x ep 2 > 2 experts: banks are sharded on dim 1, so experts are split and gathered.
FOUR_RANKS = {
    "dp4_ep2_g2_split_experts": {
        "dp_shard": 4, "ep": 2, "tying": TIED, "model_overrides": {"moe_args": {"num_experts": 2}},
        "steps": 2, "microbatches": 1, **MUON_FP32,
    },
}


def single_process_dims() -> ParallelDims:
    return ParallelDims(dp_shard=1, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)


def muon_optimizers(model, lr=0.02, weight_decay=0.1, **muon):
    """Muon through build_tied_optimizers; float32 Newton-Schulz unless told (bf16 matmuls are slow on CPU)."""
    config = JobConfig().optimizer
    config.name, config.lr, config.weight_decay, config.implementation = "Muon", lr, weight_decay, "for-loop"
    config.muon = MuonConfig(**{"ns_dtype": "float32", **muon})
    return build_tied_optimizers([model], config, single_process_dims())


def backward(model, seed=0):
    x = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(seed))
    model(x).float().mean().backward()


# ---- the math ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(128, 64), (64, 128), (96, 96)])
def test_newton_schulz_is_torchs_in_bfloat16(shape):
    g = torch.randn(*shape)
    expected = _zeropower_via_newtonschulz(g, (DEFAULT_A, DEFAULT_B, DEFAULT_C), 5, EPS)
    assert torch.equal(newton_schulz(g, 5, torch.bfloat16), expected)
    # A batch is each matrix on its own, up to rounding: a batched matmul and a single one
    # may take different BLAS kernels (1.1e-6 apart on one CPU after 5 iterations).
    batch = torch.randn(3, *shape)
    for matrix, result in zip(batch, newton_schulz(batch, 5, torch.float32)):
        torch.testing.assert_close(result, newton_schulz(matrix, 5, torch.float32), rtol=1e-5, atol=1e-5)


def test_matrix_and_bank_steps_are_torch_muon():
    """A matrix steps exactly as torch.optim.Muon; a bank as torch.optim.Muon on each
    expert matrix separately (momentum, Nesterov, weight decay, lr adjusted for the
    expert's (out, in) shape)."""
    matrix, bank = torch.randn(64, 128), torch.randn(4, 128, 64)
    ours = [matrix.clone().requires_grad_(), bank.clone().requires_grad_()]
    theirs = [matrix.clone().requires_grad_()] + [e.clone().requires_grad_() for e in bank]
    ours_opt = MuonWithAdamW([{"params": ours, "use_muon": True}], MuonConfig(), lr=0.02, weight_decay=0.1)
    theirs_opt = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1)
    for step in range(3):
        grads = [torch.randn(64, 128), torch.randn(4, 128, 64)]
        ours[0].grad, ours[1].grad = grads
        for p, g in zip(theirs, [grads[0], *grads[1]]):
            p.grad = g.clone()
        ours_opt.step()
        theirs_opt.step()
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)
    # A batched matmul and single ones may take different BLAS kernels: a one-ulp bf16
    # flip moves an entry by ~1e-5 per step. A missing per-expert lr adjustment, or one
    # normalisation across experts, would move them by ~1e-2.
    torch.testing.assert_close(ours[1], torch.stack(theirs[1:]), rtol=0, atol=1e-4)


def test_each_bank_expert_update_is_orthogonal():
    """Experts whose gradients differ by 10^6 in scale all get an update with singular
    values near 1: each expert matrix is orthogonalised on its own."""
    model = build_model("qwen3", TieConfig(**TIED, bank_lr_scale="inv_sqrt_g"))
    optimizers = muon_optimizers(model, weight_decay=0.0)
    banks = {name: p for name, p in model.named_parameters() if p.ndim == 3}
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for p in banks.values():
        scales = torch.logspace(-3, 3, p.shape[0]).view(-1, 1, 1)
        p.grad = torch.randn(p.shape, generator=g) * scales
    before = {name: p.detach().clone() for name, p in banks.items()}
    optimizers.step()
    lr_of = {p: group["lr"] for group in optimizers.optimizers[0].param_groups for p in group["params"]}
    singular = []
    for name, p in banks.items():
        out_dim, in_dim = p.shape[1:]
        adjusted_lr = lr_of[p] * max(1, out_dim / in_dim) ** 0.5  # torch's "original" adjustment
        update = (before[name] - p.detach()) / adjusted_lr
        singular.append(torch.linalg.svdvals(update))  # (experts, min(out, in))
    singular = torch.cat(singular)
    # Muon's quintic iteration lands in about [0.7, 1.15] rather than exactly on 1.
    assert singular.min() > 0.6 and singular.max() < 1.2, (singular.min(), singular.max())


# ---- parameter groups, schedule, checkpoint -----------------------------------------


def test_muon_trains_matrices_and_banks_adamw_the_rest():
    model = build_model("qwen3", TieConfig(**TIED))
    muon, adamw = muon_and_adamw_params(model)
    names = {p: name for name, p in model.named_parameters()}
    muon_names, adamw_names = {names[p] for p in muon}, {names[p] for p in adamw}
    assert sorted(map(id, muon + adamw)) == sorted(map(id, model.parameters()))
    assert all(model.get_parameter(n).ndim in (2, 3) for n in muon_names)
    assert {n for n in muon_names if model.get_parameter(n).ndim == 3} == {
        f"layers.{i}.moe.experts.{w}" for i in (0, 1, 2, 4, 6, 7) for w in ("w1", "w2", "w3")
    }
    assert "layers.3.attention.wq.weight" in muon_names
    assert {"tok_embeddings.weight", "output.weight", "norm.weight", "layers.3.moe.router.gate.weight"} <= adamw_names
    assert all(".router." in n or n in ("tok_embeddings.weight", "output.weight") or model.get_parameter(n).ndim == 1 for n in adamw_names)


def test_groups_lr_and_bank_scale():
    model = build_model("qwen3", TieConfig(group_size=3, untied_first=1, untied_last=1, bank_lr_scale="inv_g"))
    (optimizer,) = muon_optimizers(model, lr=0.02, weight_decay=0.1, adamw_lr_ratio=0.1).optimizers
    group_of = {p: g for g in optimizer.param_groups for p in g["params"]}
    assert len(group_of) == sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    shared_bank, anchor_bank = model.layers["1"].moe.experts.w1, model.layers["0"].moe.experts.w1
    assert group_of[shared_bank]["use_muon"] and group_of[shared_bank]["lr"] == pytest.approx(0.02 / 3)
    assert group_of[anchor_bank]["use_muon"] and group_of[anchor_bank]["lr"] == pytest.approx(0.02)
    assert group_of[model.layers["2"].attention.wq.weight]["lr"] == pytest.approx(0.02)
    router = group_of[model.layers["2"].moe.router.gate.weight]
    assert not router["use_muon"] and router["lr"] == pytest.approx(0.002)


def test_every_group_follows_the_cosine_schedule():
    model = build_model("qwen3", TieConfig(**TIED, bank_lr_scale="inv_sqrt_g"))
    optimizers = muon_optimizers(model)
    config = JobConfig().lr_scheduler
    config.warmup_steps, config.decay_type, config.min_lr_factor = 2, "cosine", 0.1
    schedulers = build_lr_schedulers(optimizers, config, training_steps=10)
    groups = optimizers.optimizers[0].param_groups
    assert {g["use_muon"] for g in groups} == {True, False} and len(groups) == 3
    initial = [g["initial_lr"] for g in groups]
    factors = []
    for _ in range(10):
        optimizers.step()  # no gradients: only the schedule moves
        schedulers.step()
        step_factors = [g["lr"] / lr for g, lr in zip(groups, initial)]
        assert step_factors == pytest.approx([step_factors[0]] * len(groups))
        factors.append(step_factors[0])
    assert factors[1] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)
    assert factors[1:] == sorted(factors[1:], reverse=True)


def test_checkpoint_round_trip(tmp_path):
    """Both kinds of state go through DCP; a restored optimizer takes the same next step."""
    model = build_model("qwen3", TieConfig(**TIED, bank_lr_scale="inv_g"), expert_bias_rate=1e-3)
    optimizers = muon_optimizers(model)
    backward(model, seed=0)
    optimizers.step()
    optimizers.zero_grad()
    saved = optimizers.state_dict()
    assert "state.layers.2.moe.experts.w1.momentum_buffer" in saved
    assert "state.layers.2.attention.wq.weight.momentum_buffer" in saved
    assert "state.tok_embeddings.weight.exp_avg_sq" in saved and "state.layers.2.moe.router.gate.weight.exp_avg" in saved
    assert saved["param_groups.layers.2.moe.experts.w1.use_muon"] is True
    dcp.save(saved, checkpoint_id=str(tmp_path))

    restored_model = build_model("qwen3", TieConfig(**TIED, bank_lr_scale="inv_g"), expert_bias_rate=1e-3)
    restored_model.load_state_dict(model.state_dict())
    restored = muon_optimizers(restored_model)
    loaded = restored.state_dict()
    dcp.load(loaded, checkpoint_id=str(tmp_path))
    restored.load_state_dict(loaded)
    for m, opts in ((model, optimizers), (restored_model, restored)):
        backward(m, seed=1)
        opts.step()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(restored_model.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_expert_bias_updates_with_muon():
    model = build_model("qwen3", TieConfig(**TIED), expert_bias_rate=1e-3)
    optimizers = muon_optimizers(model)
    backward(model)
    counts = model.layers["3"].moe.tokens_per_expert.clone()
    optimizers.step()
    delta = 1e-3 * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(model.layers["3"].moe.expert_bias, delta - delta.mean())


# ---- configuration -----------------------------------------------------------------


def test_recipe_chooses_muon():
    job_config = parse_recipe("recipes/olmoe/regular_g4_muon.toml")
    assert job_config.optimizer.name == "Muon" and job_config.optimizer.lr == 0.02
    # The paper's reference recipe: Muon's weight decay 0.1, AdamW's 0.01, bank LR / sqrt(G).
    assert job_config.optimizer.muon == MuonConfig(weight_decay=0.1) and job_config.optimizer.weight_decay == 0.01
    assert job_config.tying.bank_lr_scale == "inv_sqrt_g"
    assert (job_config.lr_scheduler.decay_type, job_config.lr_scheduler.min_lr_factor) == ("cosine", 0.1)
    with pytest.raises(RecipeError, match=r"unknown key \[optimizer.muon\] 'momentun': did you mean 'momentum'"):
        parse_recipe("recipes/olmoe/regular_g4_muon.toml", ["--optimizer.muon.momentun", "0.9"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--optimizer.name", "muon"], "optimizer.name = 'muon': must be one of 'Adam', 'AdamW', 'Muon'"),
        (["--optimizer.muon.momentum", "1.0"], r"optimizer.muon.momentum = 1.0: must be in \[0, 1\)"),
        (["--optimizer.muon.ns_steps", "0"], "optimizer.muon.ns_steps = 0: must be an integer >= 1"),
    ],
)
def test_bad_settings_are_one_line(overrides, message):
    with pytest.raises(RecipeError, match=message) as error:
        parse_recipe("recipes/olmoe/regular_g4_muon.toml", overrides)
    assert "\n" not in str(error.value)


def test_muon_refuses_early_step_in_backward():
    config = JobConfig().optimizer
    config.name, config.early_step_in_backward = "Muon", True
    with pytest.raises(ValueError, match="optimizer.early_step_in_backward = true is not supported with optimizer.name") as error:
        build_tied_optimizers([build_model("qwen3")], config, single_process_dims())
    assert "\n" not in str(error.value)


# ---- sharded runs against one process ----------------------------------------------


def launch(nproc: int, configs: dict, tmp_path_factory) -> dict:
    return shard_check.launch(nproc, configs, str(tmp_path_factory.mktemp(f"muon_ranks{nproc}") / "results.pt"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return launch(2, {**TWO_RANKS, **BF16_NS}, tmp_path_factory)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return launch(4, FOUR_RANKS, tmp_path_factory)


def assert_matches(result: dict, fields: dict) -> None:
    # Three steps at lr 0.02 move weights by up to 3e-2; layouts agree to 6e-8 (Muon) and 1.2e-6 (AdamW).
    assert_matches_single_process(result, fields, loss_rel=1e-5, state_atol=5e-6)


@pytest.mark.parametrize("name", list(TWO_RANKS))
def test_two_ranks_equal_single_process(two_ranks, name):
    assert_matches(two_ranks[name], TWO_RANKS[name])


def test_bfloat16_newton_schulz_stays_close(two_ranks):
    """bf16 Newton-Schulz turns reduction-order noise into one-ulp flips, so the two
    layouts differ by a fraction of each parameter's movement (measured: at most 7% in
    norm over 3 steps); a layout that mis-scaled, skipped or doubled an update moves
    by a whole update. Expert biases are left to the losses: they move in sign steps of
    the token counts, so one routing flip moves them by a whole step."""
    cfg = CheckConfig.from_fields(BF16_NS["dp2_g2_bf16_ns"])
    ref, initial = reference(cfg), shard_check.initial_state(cfg)
    result = two_ranks["dp2_g2_bf16_ns"]
    assert result["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    for name, value in ref["state"].items():
        if name in initial and value.is_floating_point() and not name.endswith("expert_bias"):
            moved = (value - initial[name]).norm()
            assert (result["state"][name] - value).norm() <= 0.15 * moved, name


@pytest.mark.parametrize("name", list(FOUR_RANKS))
def test_banks_split_within_experts_equal_single_process(four_ranks, name):
    assert_matches(four_ranks[name], FOUR_RANKS[name])
