"""Memory planner validation: predicted vs measured bytes per rank of a training step.

    python benchmarks/planner_validation.py [--cases single,dp2] [--out results.json]

Each case is a ``shard_check`` layout (debug flavors, synthetic tokens, AdamW). It is
run for two steps under torchrun (one process, or two gloo processes on CPU / one per
GPU with NCCL); step 1 is measured: parameters, gradients and optimizer state on rank
0 (tensor sizes), and the step's peak tensor memory (torch's ``MemTracker`` on CPU, the
CUDA allocator's peak on GPU; never process RSS). The same layout goes through
``tiedmoe_titan.memory.estimate``; the table shows both and the relative error
(tolerances: 2% for parameters + gradients + optimizer state, 15% for the peak).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

QWEN_TIED = {"group_size": 2, "untied_first": 2, "untied_last": 2}
OLMOE_TIED = {"group_size": 2, "untied_first": 2, "untied_last": 2}
STEP = {"steps": 2, "timing": True, "microbatches": 1, "expert_bias_rate": 0.0}

# name -> (processes, CheckConfig fields)
CASES: dict[str, tuple[int, dict]] = {
    "qwen3_g1": (1, {"family": "qwen3", "tying": {}, "batch": 4, "seq_len": 128}),
    "olmoe_g2_full_ac": (1, {"family": "olmoe", "tying": OLMOE_TIED, "batch": 8, "seq_len": 128, "activation_checkpoint": "full"}),
    "qwen3_dp2_g2": (2, {"family": "qwen3", "tying": QWEN_TIED, "dp_shard": 2, "batch": 4, "seq_len": 128}),
    "qwen3_dp2_ep2_g2": (2, {"family": "qwen3", "tying": QWEN_TIED, "dp_shard": 2, "ep": 2, "batch": 4, "seq_len": 128}),
    "olmoe_dp2_ep2_g1_full_ac": (
        2, {"family": "olmoe", "tying": {}, "dp_shard": 2, "ep": 2, "batch": 8, "seq_len": 128, "activation_checkpoint": "full"},
    ),
    # Few tokens: the optimizer step holds the peak.
    "qwen3_g2_small_batch": (1, {"family": "qwen3", "tying": QWEN_TIED, "batch": 1, "seq_len": 32}),
    # A small vocabulary: the peak is in a block's backward (recompute), not at the loss.
    "olmoe_dp2_g2_full_ac_vocab256": (
        2, {"family": "olmoe", "tying": OLMOE_TIED, "dp_shard": 2, "batch": 8, "seq_len": 128,
            "activation_checkpoint": "full", "model_overrides": {"vocab_size": 256}},
    ),
    "qwen3_dp2_g2_bf16": (2, {"family": "qwen3", "tying": QWEN_TIED, "dp_shard": 2, "batch": 4, "seq_len": 128,
                              "mixed_precision_param": "bfloat16"}),
    # What tests/test_planner_memory.py runs: small, one launch of each size.
    "test_qwen3_g1": (1, {"family": "qwen3", "tying": {}, "batch": 2, "seq_len": 64}),
    "test_qwen3_g2_muon": (1, {"family": "qwen3", "tying": QWEN_TIED, "batch": 2, "seq_len": 64,
                               "optimizer": {"name": "Muon", "muon": {"ns_dtype": "float32"}}}),
    "test_qwen3_dp2_ep2_g2": (2, {"family": "qwen3", "tying": QWEN_TIED, "dp_shard": 2, "ep": 2, "batch": 2, "seq_len": 64}),
    "test_olmoe_dp2_g1_full_ac": (
        2, {"family": "olmoe", "tying": {}, "dp_shard": 2, "batch": 2, "seq_len": 64, "activation_checkpoint": "full"},
    ),
}
TEST_CASES = [name for name in CASES if name.startswith("test_")]
STATIC_TOLERANCE, PEAK_TOLERANCE = 0.0, 0.08  # static: to the byte (tensor sizes)


def check_config(fields: dict):
    from tiedmoe_titan.testing.shard_check import CheckConfig

    return CheckConfig.from_fields({**STEP, **fields})


def measure(nproc: int, cases: dict[str, dict], folder: str) -> dict[str, dict]:
    """Run ``cases`` in one torchrun launch of ``nproc`` processes; rank 0's results."""
    from tiedmoe_titan.testing.shard_check import launch

    configs = {name: {**STEP, **fields} for name, fields in cases.items()}
    return launch(nproc, configs, os.path.join(folder, f"measured_{nproc}.pt"), timeout=None)


def compare(names: list[str], folder: str | None = None) -> list[dict]:
    """Measure the cases (one launch per process count) and put the estimates beside."""
    from tiedmoe_titan.testing.shard_check import estimate_check

    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            return compare(names, tmp)

    if torch.cuda.is_available():  # one process per GPU
        skipped = [n for n in names if CASES[n][0] > torch.cuda.device_count()]
        if skipped:
            print(f"skipped (more processes than GPUs): {', '.join(skipped)}", file=sys.stderr)
        names = [n for n in names if n not in skipped]
    by_nproc: dict[int, dict[str, dict]] = {}
    for name in names:
        nproc, fields = CASES[name]
        by_nproc.setdefault(nproc, {})[name] = fields
    measured = {}
    for nproc, cases in by_nproc.items():
        measured.update(measure(nproc, cases, folder))
    rows = []
    for name in names:
        nproc, fields = CASES[name]
        predicted = estimate_check(check_config(fields), nproc)
        result = measured[name]
        static = sum(result["rank_memory"].values())
        rows.append({
            "case": name,
            "world_size": nproc,
            "predicted_static_bytes": predicted.static,
            "measured_static_bytes": static,
            "static_error": predicted.static / static - 1,
            "predicted_peak_bytes": predicted.total,
            "measured_peak_bytes": result["peak_memory"],
            "peak_error": predicted.total / result["peak_memory"] - 1,
            "predicted": predicted.as_dict(),
            "measured_static": result["rank_memory"],
        })
    return rows


def table(rows: list[dict]) -> str:
    mib, width = 2**20, max(len(r["case"]) for r in rows)
    lines = [f"{'case':<{width}} {'ranks':>5} {'static MiB pred/meas':>21} {'err':>7} {'peak MiB pred/meas':>19} {'err':>7}"]
    for r in rows:
        lines.append(
            f"{r['case']:<{width}} {r['world_size']:>5} "
            f"{r['predicted_static_bytes'] / mib:>10.2f}/{r['measured_static_bytes'] / mib:<10.2f} {r['static_error']:>+7.2%} "
            f"{r['predicted_peak_bytes'] / mib:>9.2f}/{r['measured_peak_bytes'] / mib:<9.2f} {r['peak_error']:>+7.2%}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(n for n in CASES if n not in TEST_CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    p.add_argument("--out", help="also write the rows as JSON lines here")
    a = p.parse_args()
    rows = compare(a.cases.split(","))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{os.cpu_count()} (gloo)"
    print(f"device: {device}, torch {torch.__version__}")
    print(table(rows))
    if a.out:
        with open(a.out, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
