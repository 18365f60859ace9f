"""Shard-once benchmark: the same model untied (G=1) and tied (G=2, G=4) in one run.

    python benchmarks/shard_once.py [--nproc 2] [--groups 1,2,4] [--rounds 6]

On CPU it launches N gloo processes (FSDP dp_shard=N); with a GPU, one process per
visible GPU on NCCL. Every variant trains the same tokens from its own initial weights
with AdamW in the implementation the trainer builds (torchtitan's default, "fused";
``--optimizer-impl``), one microbatch per step. The processes build every variant and
hold them all: each variant runs step 0 (collectives counted) and step 1 (memory
tracked), then the timed steps are interleaved, one step of each variant per round,
the order rotated every round (G1,G2,G4 / G2,G4,G1 / G4,G1,G2 / ...), so that load
from other jobs falls on all variants alike. Rank 0 prints one JSON object per
variant, then a table:

* expert_bytes_per_rank: routed-expert parameters + gradients + AdamW state on one rank
  (tensor sizes, after step 1), untied_expert_bytes_per_rank the same for G=1;
* peak_memory_ratio: peak tensor memory of a step, tied / untied (torch's MemTracker
  on CPU, the CUDA allocator's peak on GPU; never process RSS);
* step_time_ratio: the median over rounds of (tied step time / untied step time in
  the same round), step_time_ratio_spread its (min, max), step_time_ratio_rounds every
  round's ratio; step_time_median_s / step_time_spread_s the variant's own steps;
* expert_allgathers_per_step / expert_reduce_scatters_per_step: collectives that move
  routed-expert weights / gradients, counted at the process-group level on step 0.

The default shape is the OLMoE-style layout scaled down: 16 layers, 64 experts top-8,
2+2 untied anchors, dim 256, expert FFN 256, micro-batch 2 x 256 tokens. Holding all
three variants takes about 4 GiB per process at that shape (expert parameters,
gradients and AdamW state: G=1 1.5 GiB, G=2 0.94, G=4 0.66; plus one step's
activations and the runtime).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=0, help="processes (default: 2 on CPU, one per GPU)")
    p.add_argument("--groups", default="1,2,4", help="tie group sizes to compare; 1 is the untied baseline")
    p.add_argument("--family", default="olmoe")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--anchors", type=int, default=2, help="untied MoE layers at each end for tied variants")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds, one step of every variant each (after step 0: collectives, step 1: memory)")
    p.add_argument("--optimizer-impl", default=None, choices=["for-loop", "foreach", "fused"],
                   help="AdamW implementation (default: torchtitan's, what tiedmoe-train builds for a recipe that sets none)")
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--out", help="also write the JSON lines here")
    return p.parse_args(argv)


def optimizer_implementation(a) -> str:
    from torchtitan.config import Optimizer

    return a.optimizer_impl or Optimizer().implementation


def check_config(a, group_size: int, world: int):
    from tiedmoe_titan.testing.shard_check import CheckConfig
    from tiedmoe_titan.tying import TieConfig

    anchors = a.anchors if group_size > 1 else 0
    return CheckConfig(
        family=a.family,
        tying=TieConfig(group_size=group_size, untied_first=anchors, untied_last=anchors),
        dp_shard=world, ep=a.ep, steps=2 + a.rounds, microbatches=1, batch=a.batch, seq_len=a.seq, timing=True,
        expert_bias_rate=0.0, optimizer={"implementation": optimizer_implementation(a)},
        model_overrides={
            "n_layers": a.layers, "dim": a.dim, "n_heads": a.heads, "n_kv_heads": a.heads, "head_dim": a.dim // a.heads,
            "moe_inter_dim": a.ffn, "max_seq_len": a.seq,
            "moe_args": {"num_experts": a.experts, "top_k": a.top_k},
        },
    )


def rotations(groups: list[int], rounds: int) -> list[list[int]]:
    """The order of the variants in each timed round: rotated by one every round."""
    return [groups[r % len(groups):] + groups[: r % len(groups)] for r in range(rounds)]


def release_freed_memory() -> None:
    """Return the C heap's free pages to the system. glibc keeps what building a model
    freed (1.6 GiB per process for G=1 at the default shape: the full initial weights),
    which all variants held at once cannot afford; tensor sizes are not affected."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_variants(a) -> list[dict]:
    import torch.distributed as dist

    from tiedmoe_titan.testing.shard_check import model_args, stepwise

    world = dist.get_world_size()
    groups = [int(x) for x in a.groups.split(",")]
    cfgs = {g: check_config(a, g, world) for g in groups}
    runs = {g: stepwise(cfg) for g, cfg in cfgs.items()}
    for g in groups:  # build; step 0 (collectives) and step 1 (memory) of each in turn
        next(runs[g])
        next(runs[g])
        release_freed_memory()
    for order in rotations(groups, a.rounds):
        for g in order:
            next(runs[g])
    rows = []
    for g in groups:
        try:
            next(runs[g])
            raise AssertionError(f"G={g} has steps left")
        except StopIteration as end:
            result = end.value
        layout = model_args(cfgs[g]).tie_layout()
        (calls,) = result["collectives"]
        expert_sizes = result["expert_unit_bytes"]
        rows.append({
            "G": g,
            "num_moe_layers": len(layout.moe_layers),
            "num_banks": layout.num_shared_banks,
            "num_untied_moe_layers": layout.num_unshared_moe_layers,
            "expert_bytes_per_rank": result["expert_memory"]["total"],
            "peak_memory_bytes": result["peak_memory"],
            "step_times": result["step_times"],
            "expert_allgathers_per_step": sum(1 for op, _, b in calls if op == "allgather_base" and b in expert_sizes),
            "expert_reduce_scatters_per_step": sum(1 for op, _, b in calls if op == "reduce_scatter_base" and b in expert_sizes),
            "losses": result["losses"],
        })
        del result
    return rows


def summarise(rows: list[dict], device: str, world: int, optimizer: str) -> list[dict]:
    base = next(r for r in rows if r["G"] == 1)
    out = []
    for r in rows:
        times, base_times = r["step_times"], base["step_times"]
        ratios = [t / b for t, b in zip(times, base_times)]  # paired: the same round
        out.append({
            "G": r["G"],
            "num_moe_layers": r["num_moe_layers"],
            "num_banks": r["num_banks"],
            "num_untied_moe_layers": r["num_untied_moe_layers"],
            "expert_bytes_per_rank": r["expert_bytes_per_rank"],
            "untied_expert_bytes_per_rank": base["expert_bytes_per_rank"],
            "expected_expert_bytes_ratio": (r["num_banks"] + r["num_untied_moe_layers"]) / r["num_moe_layers"],
            "expert_bytes_ratio": r["expert_bytes_per_rank"] / base["expert_bytes_per_rank"],
            "peak_memory_bytes": r["peak_memory_bytes"],
            "peak_memory_ratio": r["peak_memory_bytes"] / base["peak_memory_bytes"],
            "step_times_s": times,  # round by round
            "step_time_median_s": statistics.median(times),
            "step_time_spread_s": [min(times), max(times)],
            "step_time_ratio": statistics.median(ratios),
            "step_time_ratio_spread": [min(ratios), max(ratios)],
            "step_time_ratio_rounds": ratios,
            "expert_allgathers_per_step": r["expert_allgathers_per_step"],
            "expert_reduce_scatters_per_step": r["expert_reduce_scatters_per_step"],
            "final_loss": r["losses"][-1],
            "device": device,
            "world_size": world,
            "optimizer_implementation": optimizer,
            "rounds": len(times),
            "torch": torch.__version__,
        })
    return out


def table(rows: list[dict]) -> str:
    head = (
        f"{'G':>2} {'banks':>5} {'untied':>6} {'expert MiB/rank':>15} {'ratio':>6} {'(expect)':>8} {'peak MiB':>9} "
        f"{'peak ratio':>10} {'step s':>7} {'time ratio (min-max)':>20} {'exp AG':>6} {'exp RS':>6}"
    )
    lines = [head]
    for r in rows:
        low, high = r["step_time_ratio_spread"]
        ratio = f"{r['step_time_ratio']:.3f} ({low:.3f}-{high:.3f})"
        lines.append(
            f"{r['G']:>2} {r['num_banks']:>5} {r['num_untied_moe_layers']:>6} {r['expert_bytes_per_rank'] / 2**20:>15.1f} "
            f"{r['expert_bytes_ratio']:>6.3f} {r['expected_expert_bytes_ratio']:>8.3f} {r['peak_memory_bytes'] / 2**20:>9.1f} "
            f"{r['peak_memory_ratio']:>10.3f} {r['step_time_median_s']:>7.3f} {ratio:>20} "
            f"{r['expert_allgathers_per_step']:>6} {r['expert_reduce_scatters_per_step']:>6}"
        )
    return "\n".join(lines)


def worker(a) -> None:
    import torch.distributed as dist

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rows = run_variants(a)
    if dist.get_rank() == 0:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{os.cpu_count()} (gloo)"
        summary = summarise(rows, device, dist.get_world_size(), optimizer_implementation(a))
        lines = [json.dumps(r) for r in summary]
        print("\n".join(lines))
        print(table(summary))
        if a.out:
            with open(a.out, "w") as f:
                f.write("\n".join(lines) + "\n")
    dist.destroy_process_group()


def worker_argv(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc``, which torchrun would read as its own ``--nproc-per-node``
    (it refuses the abbreviation as ambiguous); the workers do not need it."""
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            out.append(arg)
    return out


def main() -> None:
    a = parse_args()
    if "RANK" in os.environ:
        worker(a)
        return
    nproc = a.nproc or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), __file__, *worker_argv(sys.argv[1:])]
    raise SystemExit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
