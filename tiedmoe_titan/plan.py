"""``tiedmoe-plan RECIPE.toml [--json] [--section.key value ...]``

Prints, without allocating the model (it is built on the meta device), the layer ->
bank map, unique parameters (total, routed-expert, other), active parameters per
token, and the ratio to the same recipe untied (G=1).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys

import torch

import tiedmoe_titan  # noqa: F401  (registers the train specs)
from torchtitan.protocols.train_spec import get_train_spec

from .config import parse_recipe
from .models.accounting import ParamCounts, count_params
from .tying import TieConfig, TieConfigError


def meta_param_counts(model_cls, model_args) -> ParamCounts:
    with torch.device("meta"):
        return count_params(model_cls(model_args))


def plan(job_config) -> dict:
    spec = get_train_spec(job_config.model.name)
    if job_config.model.flavor not in spec.model_args:
        raise TieConfigError(
            f"model.flavor = {job_config.model.flavor!r} is not a flavor of {job_config.model.name}: "
            f"choose one of {', '.join(spec.model_args)}"
        )
    args = copy.deepcopy(spec.model_args[job_config.model.flavor])
    args.update_from_config(job_config)
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
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        p = plan(parse_recipe(args.recipe, overrides))
    except TieConfigError as e:
        print(f"tiedmoe-plan: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(json.dumps(p) if args.json else format_plan(p))


if __name__ == "__main__":
    main()
