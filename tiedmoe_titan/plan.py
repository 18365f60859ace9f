"""``tiedmoe-plan RECIPE.toml [--json] [--section.key value ...]``

Prints, without allocating the model (it is built on the meta device), the layer ->
bank map, unique parameters (total, routed-expert, other), active parameters per
token, and the ratio to the same recipe untied (G=1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

import tiedmoe_titan  # noqa: F401  (registers the train specs)

from .config import RecipeError, model_args_of, parallel_dims_of, parse_recipe
from .models.accounting import ParamCounts, count_params
from .parallelize import UnsupportedParallelism
from .tying import TieConfig


def meta_param_counts(model_cls, model_args) -> ParamCounts:
    with torch.device("meta"):
        return count_params(model_cls(model_args))


def plan(job_config) -> dict:
    spec, args = model_args_of(job_config)
    layout = args.tie_layout()
    tied = meta_param_counts(spec.model_cls, args)
    untied_args = dataclasses.replace(args, tying=TieConfig())
    untied = meta_param_counts(spec.model_cls, untied_args)
    return {
        "model": job_config.model.name,
        "flavor": job_config.model.flavor,
        "tying": dataclasses.asdict(layout.config),
        "num_moe_layers": len(layout.moe_layers),
        "num_banks": layout.num_banks,
        "num_shared_banks": layout.num_shared_banks,
        "banks": [{"index": b.index, "layers": list(b.layers), "num_experts": b.num_experts} for b in layout.banks],
        "total_params": tied.total,
        "expert_params": tied.expert,
        "other_params": tied.other,
        "active_params": tied.active,
        "untied_total_params": untied.total,
        "untied_expert_params": untied.expert,
        "untied_active_params": untied.active,
        "untied_to_tied_ratio": untied.total / tied.total,
    }


def shard_dry_run(job_config, world_size: int) -> dict:
    """Build the model on the meta device, shard it with the project's parallelize
    function on ``world_size`` simulated ranks (torchtitan's fake communication
    backend: collectives are no-ops) and report what one rank holds. Nothing the size
    of the model is allocated."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torchtitan.distributed.utils import init_fake_mode

    from .models.bank import ExpertBank

    spec, args = model_args_of(job_config)
    dims = parallel_dims_of(job_config, world_size)
    init_fake_mode(world_size, "fake_backend")
    try:
        with torch.device("meta"):
            model = spec.model_cls(args)
        spec.parallelize_fn(model, dims, job_config)
        expert_ids = {id(q) for m in model.modules() if isinstance(m, ExpertBank) for q in m.parameters()}
        per_rank = {"expert": 0, "other": 0}
        for param in model.parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            per_rank["expert" if id(param) in expert_ids else "other"] += local.numel() * local.element_size()
    finally:
        dist.destroy_process_group()
    return {
        "world_size": world_size,
        "mesh": {"dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard, "ep": dims.ep, "tp": dims.tp},
        "per_rank_expert_param_bytes": per_rank["expert"],
        "per_rank_other_param_bytes": per_rank["other"],
        "per_rank_param_bytes": per_rank["expert"] + per_rank["other"],
    }


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def format_plan(p: dict) -> str:
    lines = [f"{p['model']} / {p['flavor']}: {p['num_moe_layers']} MoE layers, {p['num_banks']} banks"]
    for b in p["banks"]:
        layers = ",".join(map(str, b["layers"]))
        shared = f"shared by {len(b['layers'])}" if len(b["layers"]) > 1 else "untied"
        lines.append(f"  bank {b['index']:>2}: layers [{layers}]  {b['num_experts']} experts ({shared})")
    lines += [
        f"unique parameters : {p['total_params']:>16,} ({_human(p['total_params'])})",
        f"  routed experts  : {p['expert_params']:>16,} ({_human(p['expert_params'])})",
        f"  other           : {p['other_params']:>16,} ({_human(p['other_params'])})",
        f"active per token  : {p['active_params']:>16,} ({_human(p['active_params'])})",
        f"untied (G=1)      : {p['untied_total_params']:>16,} ({_human(p['untied_total_params'])}), "
        f"{p['untied_to_tied_ratio']:.3f}x this recipe",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tiedmoe-plan", description=__doc__.split("\n\n")[1])
    parser.add_argument("recipe")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--shard-dry-run", type=int, metavar="WORLD_SIZE",
        help="also shard the model on this many simulated ranks (fake backend) and report one rank's bytes",
    )
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        job_config = parse_recipe(args.recipe, overrides)
        p = plan(job_config)
        if args.shard_dry_run:
            p["shard_dry_run"] = shard_dry_run(job_config, args.shard_dry_run)
    except (RecipeError, UnsupportedParallelism) as e:
        print(f"tiedmoe-plan: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if args.json:
        print(json.dumps(p))
        return
    print(format_plan(p))
    if args.shard_dry_run:
        d = p["shard_dry_run"]
        print(
            f"per rank of {d['world_size']} ({d['mesh']}): parameters {_human(d['per_rank_param_bytes'])}B "
            f"(routed experts {_human(d['per_rank_expert_param_bytes'])}B)"
        )


if __name__ == "__main__":
    main()
