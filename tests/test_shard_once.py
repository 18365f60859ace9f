"""Shard-once FSDP2 + expert parallelism, proven with several gloo processes.

Every layout trains 3 steps (2 microbatches each, routing losses and expert bias on)
from the same saved initial weights on the same tokens as a single process; losses,
first-step gradients and final weights must match, and the collectives each rank
issues are counted at the process-group level.
"""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_matches_single_process

from tiedmoe_titan.testing import shard_check
from tiedmoe_titan.testing.shard_check import CheckConfig, reference

UNTIED = {}
TIED = {"group_size": 2, "untied_first": 2, "untied_last": 2}
MOE_LAYERS, TIED_BANKS = 8, 6  # the debug flavor: 8 MoE layers; G=2 with 2+2 anchors -> 6 banks

TWO_RANKS = {
    "dp2_g1": {"dp_shard": 2, "tying": UNTIED},
    "dp2_g2": {"dp_shard": 2, "tying": TIED},
    "dp2_ep2_g1": {"dp_shard": 2, "ep": 2, "tying": UNTIED},
    "dp2_ep2_g2": {"dp_shard": 2, "ep": 2, "tying": TIED},
    "dp2_ep2_g2_full_ac": {"dp_shard": 2, "ep": 2, "tying": TIED, "activation_checkpoint": "full"},
    "dp2_g2_olmoe_compile_selective_ac": {
        "family": "olmoe", "dp_shard": 2, "tying": TIED, "activation_checkpoint": "selective", "compile_backend": "aot_eager",
    },
    "dp2_ep2_g2_compile": {"dp_shard": 2, "ep": 2, "tying": TIED, "compile_backend": "aot_eager"},
}
BF16 = {"dp2_g2_bf16": {"dp_shard": 2, "tying": TIED, "mixed_precision_param": "bfloat16"}}
FOUR_RANKS = {
    "dp4_ep2_g2": {"dp_shard": 4, "ep": 2, "tying": TIED},  # first: also round-tripped through DCP
    "dp4_ep2_g1": {"dp_shard": 4, "ep": 2, "tying": UNTIED},
    "hsdp2x2_g1": {"dp_replicate": 2, "dp_shard": 2, "tying": UNTIED},
    "hsdp2x2_g2": {"dp_replicate": 2, "dp_shard": 2, "tying": TIED},
}


def launch(nproc: int, configs: dict, tmp_path_factory, dcp: bool = False) -> dict:
    folder = tmp_path_factory.mktemp(f"ranks{nproc}")
    return shard_check.launch(nproc, configs, str(folder / "results.pt"), str(folder / "dcp") if dcp else None)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return launch(2, {**TWO_RANKS, **BF16}, tmp_path_factory)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return launch(4, FOUR_RANKS, tmp_path_factory, dcp=True)


def check_config(fields: dict) -> CheckConfig:
    return CheckConfig.from_fields(fields)


def assert_matches(result: dict, fields: dict) -> None:
    assert_matches_single_process(result, fields, loss_rel=1e-6, grad_rel=1e-5, state_atol=2e-5)


@pytest.mark.parametrize("name", list(TWO_RANKS))
def test_two_ranks_equal_single_process(two_ranks, name):
    assert_matches(two_ranks[name], TWO_RANKS[name])


def test_bf16_params_fp32_reduce_close_to_fp32(two_ranks):
    """bf16 all-gathered parameters, fp32 gradient reduction: close to the fp32 run."""
    fields = BF16["dp2_g2_bf16"]
    ref = reference(check_config({**fields, "mixed_precision_param": "float32"}))
    assert two_ranks["dp2_g2_bf16"]["losses"] == pytest.approx(ref["losses"], rel=2e-3)


@pytest.mark.parametrize("name", list(FOUR_RANKS))
def test_four_ranks_equal_single_process(four_ranks, name):
    assert_matches(four_ranks[name], FOUR_RANKS[name])


def expert_collectives(result: dict, op: str, efsdp_size: int) -> list[list[int]]:
    """Per step, the byte sizes of ``op`` on the expert (efsdp) process group."""
    return [[b for o, size, b in calls if o == op and size == efsdp_size] for calls in result["collectives"]]


def test_bank_collectives_once_per_group(four_ranks):
    tied, untied = four_ranks["dp4_ep2_g2"], four_ranks["dp4_ep2_g1"]
    microbatches, efsdp = 2, 2  # dp_shard 4 / ep 2
    for steps_tied, steps_untied in zip(expert_collectives(tied, "allgather_base", efsdp), expert_collectives(untied, "allgather_base", efsdp)):
        # Forward + backward: 2 all-gathers per bank per microbatch, against 2 per MoE layer untied.
        assert len(steps_tied) == 2 * TIED_BANKS * microbatches
        assert len(steps_untied) == 2 * MOE_LAYERS * microbatches
        assert sum(steps_tied) * MOE_LAYERS == sum(steps_untied) * TIED_BANKS
    for rs_tied, rs_untied in zip(expert_collectives(tied, "reduce_scatter_base", efsdp), expert_collectives(untied, "reduce_scatter_base", efsdp)):
        assert len(rs_tied) == TIED_BANKS * microbatches
        assert len(rs_untied) == MOE_LAYERS * microbatches
    # Token dispatch is per layer either way: every layer of a group all-to-alls to the same bank.
    a2a = [sum(1 for o, _, _ in calls if o == "all_to_all_single") for calls in tied["collectives"]]
    assert a2a == [sum(1 for o, _, _ in calls if o == "all_to_all_single") for calls in untied["collectives"]]
    assert a2a[0] > 0


def test_each_rank_holds_each_bank_once(four_ranks):
    tied, untied = four_ranks["dp4_ep2_g2"]["expert_memory"], four_ranks["dp4_ep2_g1"]["expert_memory"]
    # Parameters, gradients and AdamW state of routed experts: one copy per bank, not per layer.
    for kind in ("params", "grads", "optimizer"):
        assert tied[kind] * MOE_LAYERS == untied[kind] * TIED_BANKS, kind
    # And each rank holds 1/(ep x efsdp) of every bank: 8 layers x 3 weights x 8 experts x 128 x 64 fp32.
    assert untied["params"] == MOE_LAYERS * 3 * 8 * 128 * 64 * 4 // 4


def test_dcp_checkpoint_holds_each_bank_once(four_ranks):
    dcp = four_ranks["dp4_ep2_g2"]["dcp"]
    assert dcp["identical"]
    expert_keys = sorted(k for k in dcp["keys"] if ".moe.experts." in k)
    owners = (0, 1, 2, 4, 6, 7)
    assert expert_keys == sorted(f"layers.{i}.moe.experts.{w}" for i in owners for w in ("w1", "w2", "w3"))


SHARD_ONCE = Path(__file__).resolve().parents[1] / "benchmarks" / "shard_once.py"
TINY = [
    "--layers", "4", "--experts", "8", "--top-k", "2", "--dim", "64", "--heads", "2", "--ffn", "64",
    "--batch", "1", "--seq", "16", "--anchors", "1", "--groups", "1,2", "--rounds", "3",
]


def test_shard_once_benchmark(tmp_path):
    """benchmarks/shard_once.py at a tiny shape on 2 gloo processes: the trainer's AdamW,
    a tied/untied ratio per round from the same round's steps, and one bank of two
    layers in place of two untied layers (expert bytes and collectives)."""
    out = tmp_path / "rows.jsonl"
    run = subprocess.run(
        [sys.executable, str(SHARD_ONCE), "--nproc", "2", *TINY, "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    untied, tied = (json.loads(line) for line in out.read_text().splitlines())
    assert untied["optimizer_implementation"] == tied["optimizer_implementation"] == "fused"
    assert len(tied["step_times_s"]) == len(untied["step_times_s"]) == tied["rounds"] == 3
    ratios = [t / u for t, u in zip(tied["step_times_s"], untied["step_times_s"])]
    assert tied["step_time_ratio_rounds"] == pytest.approx(ratios)
    assert tied["step_time_ratio"] == pytest.approx(statistics.median(ratios))
    assert tied["step_time_ratio_spread"] == pytest.approx([min(ratios), max(ratios)])
    assert (tied["num_banks"], tied["num_untied_moe_layers"]) == (1, 2)
    assert tied["expert_bytes_ratio"] == tied["expected_expert_bytes_ratio"] == 0.75
    assert (untied["expert_allgathers_per_step"], untied["expert_reduce_scatters_per_step"]) == (8, 4)
    assert (tied["expert_allgathers_per_step"], tied["expert_reduce_scatters_per_step"]) == (6, 3)
    assert 0 < tied["peak_memory_ratio"] < 1


BANK_GRAD_PRECISION = Path(__file__).resolve().parents[1] / "benchmarks" / "bank_grad_precision.py"


def test_bank_grad_precision_benchmark(tmp_path):
    """benchmarks/bank_grad_precision.py at a tiny batch on 2 gloo processes: the untied
    twin reproduces the tied model (the same bf16 loss, fp32 layer gradients that sum
    to the bank's), and the bf16 summation's own error is a bf16 rounding."""
    out = tmp_path / "precision.json"
    args = ["--seeds", "0", "--groups", "1,2", "--after-steps", "0", "--batch", "1", "--seq", "16", "--corpus-tokens", "20000"]
    run = subprocess.run(
        [sys.executable, str(BANK_GRAD_PRECISION), "--nproc", "2", *args, "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    untied, tied = json.loads(out.read_text())["rows"]
    assert tied["check_bf16_loss"] == 0.0
    assert max(tied["check_fp32_sum"].values()) < 1e-5
    assert 1e-5 < min(tied["sum_only"].values()) and max(tied["sum_only"].values()) < 2**-7
    assert len(tied["per_layer"]) == 2 * len(tied["bank"]) == 4  # the debug flavor at G=2, 2+2 anchors: 2 banks
    assert all(0 < e < 1 for e in [*untied["untied"].values(), *tied["bank"].values()])
