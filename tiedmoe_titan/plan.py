"""``tiedmoe-plan RECIPE.toml [--nodes N --gpus-per-node K [--gpu-memory 80GiB]] [--json] [--section.key value ...]``

Prints, without allocating the model (it is built on the meta device), the layer ->
bank map, unique parameters (total, routed-expert, other), active parameters per
token, and the ratio to the same recipe untied (G=1). With ``--nodes`` and
``--gpus-per-node``, also the memory of one rank (parameters, gradients, optimizer
state, activations, peak) for the recipe and for it untied, under the layout the
recipe's degrees give on that many ranks, whether it fits, and what would.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torchtitan.distributed.utils import init_fake_mode

from .config import ArgumentParser, RecipeError, parse_recipe
from .memory import MemoryPlanError, StepShape, estimate, meta_model
from .models.accounting import ParamCounts, count_params
from .models.bank import banks_of
from .parallelize import UnsupportedParallelism, check_parallelism
from .preflight import model_args_of, parallel_dims_of
from .tying import TieConfig, TieConfigError


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
    spec, args = model_args_of(job_config)
    dims = parallel_dims_of(job_config, world_size)
    init_fake_mode(world_size, "fake_backend")
    try:
        with torch.device("meta"):
            model = spec.model_cls(args)
        spec.parallelize_fn(model, dims, job_config)
        expert_ids = {id(q) for bank in banks_of(model) for q in bank.parameters()}
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


# ---- memory per rank ------------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """``80GiB``, ``80GB``, ``81920MiB`` or a plain byte count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise RecipeError(f"--gpu-memory {text!r}: give a size such as 80GiB, 141GB or 81920MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def _layout(dims) -> dict:
    return {"dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard, "ep": dims.ep,
            "efsdp": dims.dp_shard // dims.ep}


def _estimate_row(model, dims, shape: StepShape, gpu_memory: int, job_config) -> dict:
    try:
        check_parallelism(type(model), model.model_args.tie_layout(), dims, job_config)
    except UnsupportedParallelism as e:
        raise RecipeError(str(e)) from None
    memory = estimate(model, dims, shape)
    return {"group_size": model.model_args.tying.group_size, **memory.as_dict(), "fits": memory.total <= gpu_memory}


def _candidates(args, dims, shape: StepShape) -> dict[str, list]:
    """What to try when the recipe does not fit: bigger G, more EP, full AC, smaller micro-batches."""
    moe = args.moe_args
    groups = [g for g in (2, 4, 8) if g > args.tying.group_size]
    eps = [e for e in range(dims.ep + 1, dims.dp_shard + 1) if dims.dp_shard % e == 0 and moe.num_experts % e == 0]
    batches, batch = [], shape.local_batch_size // 2
    while batch >= 1:
        batches.append(batch)
        batch //= 2
    return {
        "group_size": [args.tying.group_size, *groups],
        "ep": [dims.ep, *eps],
        "ac_mode": [shape.ac_mode] + (["full"] if shape.ac_mode != "full" else []),
        "local_batch_size": [shape.local_batch_size, *batches],
    }


def suggestions(spec, args, dims, shape: StepShape, gpu_memory: int, job_config, limit: int = 5) -> list[dict]:
    """Layouts near the recipe that fit, fewest changes first, then smallest peak. Each
    candidate is estimated exactly as the recipe is."""
    options = _candidates(args, dims, shape)
    models = {}
    fitting = []
    for group_size, ep, ac_mode, batch in itertools.product(*options.values()):
        changes = {
            key: value
            for key, value, current in zip(options, (group_size, ep, ac_mode, batch), (o[0] for o in options.values()))
            if value != current
        }
        if not changes:
            continue
        if group_size not in models:
            try:
                tied_args = dataclasses.replace(args, tying=dataclasses.replace(args.tying, group_size=group_size))
                tied_args.tie_layout()
            except TieConfigError:
                models[group_size] = None
            else:
                models[group_size] = meta_model(spec.model_cls, tied_args)
        model = models[group_size]
        if model is None or any(b.num_experts % ep for b in model.model_args.tie_layout().banks):
            continue
        candidate_dims = dataclasses.replace(dims, ep=ep)
        candidate_shape = dataclasses.replace(
            shape, ac_mode=ac_mode, local_batch_size=batch,
            microbatches=shape.microbatches * shape.local_batch_size // batch,
        )
        try:
            row = _estimate_row(model, candidate_dims, candidate_shape, gpu_memory, job_config)
        except RecipeError:  # a layout the parallelize plans refuse
            continue
        if row["fits"]:
            fitting.append({"changes": changes, "total": row["total"], "microbatches": candidate_shape.microbatches})
    fitting.sort(key=lambda c: (len(c["changes"]), c["total"]))
    return fitting[:limit]


def memory_plan(job_config, nodes: int, gpus_per_node: int, gpu_memory: int) -> dict:
    """Per-rank memory of the recipe and of it untied on ``nodes`` x ``gpus_per_node``
    ranks, and, if the recipe does not fit, nearby layouts that do."""
    if nodes < 1 or gpus_per_node < 1:
        raise RecipeError(f"--nodes {nodes} --gpus-per-node {gpus_per_node}: both must be at least 1")
    world_size = nodes * gpus_per_node
    spec, args = model_args_of(job_config)
    dims = parallel_dims_of(job_config, world_size)
    try:
        shape = StepShape.of_job_config(job_config, dims.dp_replicate * dims.dp_shard)
        tied = _estimate_row(meta_model(spec.model_cls, args), dims, shape, gpu_memory, job_config)
        untied_args = dataclasses.replace(args, tying=TieConfig())
        try:
            untied = _estimate_row(meta_model(spec.model_cls, untied_args), dims, shape, gpu_memory, job_config)
        except RecipeError as e:  # e.g. an EP degree that divides expanded banks only
            untied = {"group_size": 1, "error": str(e)}
        suggested = [] if tied["fits"] else suggestions(spec, args, dims, shape, gpu_memory, job_config)
    except MemoryPlanError as e:
        raise RecipeError(str(e)) from None
    return {
        "nodes": nodes,
        "gpus_per_node": gpus_per_node,
        "world_size": world_size,
        "gpu_memory_bytes": gpu_memory,
        "layout": _layout(dims),
        "step": dataclasses.asdict(shape),
        "as_written": tied,
        "untied": untied,
        "suggestions": suggested,
    }


def format_memory_plan(m: dict) -> str:
    step, layout = m["step"], m["layout"]
    ac = step["ac_mode"] + (f" ({step['selective_ac_option']})" if step["ac_mode"] == "selective" else "")
    lines = [
        f"memory per rank on {m['nodes']} nodes x {m['gpus_per_node']} GPUs = {m['world_size']} ranks: "
        + ", ".join(f"{k} {v}" for k, v in layout.items()),
        f"  micro-batch {step['local_batch_size']} x {step['seq_len']} tokens, {step['microbatches']} per step, "
        f"AC {ac}, params {step['param_dtype']} / reduce {step['reduce_dtype']}, "
        f"{step['optimizer']} ({step['optimizer_implementation']})",
        f"{'GiB per rank':<18}{'params':>9}{'grads':>9}{'optimizer':>10}{'activations':>12}{'transient':>10}{'peak':>9}  "
        f"fits {_gib(m['gpu_memory_bytes'])} GiB",
    ]
    for label, row in ((f"as written (G={m['as_written']['group_size']})", m["as_written"]), ("untied (G=1)", m["untied"])):
        if "error" in row:
            lines.append(f"{label:<18}not possible on this layout: {row['error']}")
            continue
        lines.append(
            f"{label:<18}{_gib(row['params']):>9}{_gib(row['grads']):>9}{_gib(row['optimizer']):>10}"
            f"{_gib(row['activations']):>12}{_gib(row['transient']):>10}{_gib(row['total']):>9}  "
            f"{'yes' if row['fits'] else 'NO'}"
        )
    if not m["as_written"]["fits"]:
        over = m["as_written"]["total"] - m["gpu_memory_bytes"]
        lines.append(f"the recipe does NOT fit: {_gib(over)} GiB over per rank.")
        if m["suggestions"]:
            lines.append("these fit (same estimate; change the recipe's keys):")
            names = {"group_size": "tying.group_size", "ep": "parallelism.expert_parallel_degree",
                     "ac_mode": "activation_checkpoint.mode", "local_batch_size": "training.local_batch_size"}
            for c in m["suggestions"]:
                change = ", ".join(f"{names[k]} = {v}" for k, v in c["changes"].items())
                per_step = f"{c['microbatches']} micro-batch{'es' if c['microbatches'] > 1 else ''} per step"
                lines.append(f"  {change}: peak {_gib(c['total'])} GiB ({per_step})")
        else:
            lines.append("nothing near it fits (G up to 8, any EP, full AC, micro-batch down to 1): use more ranks")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="tiedmoe-plan", description=__doc__.split("\n\n")[1])
    parser.add_argument("recipe")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--shard-dry-run", type=int, metavar="WORLD_SIZE",
        help="also shard the model on this many simulated ranks (fake backend) and report one rank's bytes",
    )
    parser.add_argument("--nodes", type=int, help="plan memory per rank on this many nodes (with --gpus-per-node)")
    parser.add_argument("--gpus-per-node", type=int, help="ranks per node")
    parser.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU (default 80GiB)")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        job_config = parse_recipe(args.recipe, overrides)
        p = plan(job_config)
        if args.shard_dry_run is not None:
            if args.shard_dry_run < 1:
                raise RecipeError(f"--shard-dry-run {args.shard_dry_run}: give the number of ranks to simulate (>= 1)")
            p["shard_dry_run"] = shard_dry_run(job_config, args.shard_dry_run)
        if (args.nodes is None) != (args.gpus_per_node is None):
            raise RecipeError("--nodes and --gpus-per-node go together: give both")
        if args.nodes is not None:
            p["memory"] = memory_plan(job_config, args.nodes, args.gpus_per_node, parse_bytes(args.gpu_memory))
    except (RecipeError, UnsupportedParallelism) as e:
        print(f"tiedmoe-plan: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if args.json:
        print(json.dumps(p))
        return
    print(format_plan(p))
    if "shard_dry_run" in p:
        d = p["shard_dry_run"]
        print(
            f"per rank of {d['world_size']} ({d['mesh']}): parameters {_gib(d['per_rank_param_bytes'])} GiB "
            f"(routed experts {_gib(d['per_rank_expert_param_bytes'])} GiB)"
        )
    if "memory" in p:
        print(format_memory_plan(p["memory"]))


if __name__ == "__main__":
    main()
