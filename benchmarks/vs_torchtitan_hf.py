"""The project's untied model (G=1) against torchtitan's own MoE model and Hugging Face
transformers' ``OlmoeForCausalLM``, same shape, one training step each, in one process.

    python benchmarks/vs_torchtitan_hf.py [--dim 256 --layers 8 --experts 16 --top-k 4 ...] [--reps 5] [--with-for-loop]

* project: ``TiedOlmoeModel`` (family olmoe, tying.group_size = 1), loss = cross-entropy
  + the routing losses tiedmoe-train adds (aux 0.01, z 1e-4);
* torchtitan: torchtitan 0.2.2's ``Qwen3Model`` with the same args. torchtitan has no
  OLMoE model; its qwen3 MoE with OLMoE's routing (softmax, raw top-k scores, no shared
  expert) is the same network except that QK-norm is per head (OLMoE normalises the full
  q / k width), the closest comparable. Loss = cross-entropy (torchtitan 0.2.2's trainer
  adds no routing loss);
* hf: ``OlmoeForCausalLM`` from the project model's Hugging Face config
  (``tiedmoe_titan.hf.hf_config``), with ``output_router_logits``: loss = cross-entropy +
  0.01 x its load-balancing loss, as in the paper's reference code.

With ``--with-for-loop`` also

* project_for_loop: the project model with torchtitan's for-loop expert path
  (``use_grouped_mm = False``), the CPU path before ``tiedmoe_titan.compat`` ran grouped
  GEMMs in fp32: the speed-up of the grouped path, measured side by side.

All train with ``torch.optim.AdamW`` (torch's defaults for the device, lr 1e-3,
weight decay 0.1) on the same random tokens; fp32 on CPU (the project and torchtitan
models run their experts as fp32 grouped GEMMs there, ``tiedmoe_titan.compat``), bf16
autocast on a GPU.

Peak memory: one step of each model alone (the others not built yet): torch's
``MemTracker`` on CPU (every tensor of the step, not RSS), the CUDA allocator's peak
on a GPU (``shard_check.peak_step_memory``). Speed: ``--reps`` rounds, each timing one
step of every model in turn (order rotated per round), after one warm-up step each;
tokens/s = tokens per step / median step time. On a GPU also model TFLOP/s and MFU
(6 x active non-embedding parameters + attention, as torchtitan counts, against the
device's bf16 peak).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import tiedmoe_titan.models  # noqa: F401  (CPU support: histc, token permutation, fp32 grouped experts)
from tiedmoe_titan.models import FAMILIES, model_routing_loss
from tiedmoe_titan.models.accounting import count_params, flops_per_token
from tiedmoe_titan.testing.shard_check import local_device, peak_step_memory
from tiedmoe_titan.tying import TieConfig

MODELS = ("project", "torchtitan", "hf")
LR, WEIGHT_DECAY, AUX_COEFF, Z_COEFF = 1e-3, 0.1, 0.01, 1e-4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--ffn", type=int, default=128, help="expert FFN width")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=5, help="timed steps per model")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 keeps a shared CPU from stalling parallel ops")
    p.add_argument("--with-for-loop", action="store_true",
                   help="also time the project model on torchtitan's for-loop expert path (project_for_loop)")
    p.add_argument("--out", help="also write the result as JSON here")
    return p.parse_args(argv)


def project_args(a):
    args = copy.deepcopy(FAMILIES["olmoe"][1]["debug"])  # flavors are shared objects
    args.dim, args.n_layers, args.n_heads, args.n_kv_heads = a.dim, a.layers, a.heads, a.heads
    args.head_dim, args.vocab_size, args.max_seq_len, args.moe_inter_dim = a.dim // a.heads, a.vocab, a.seq, a.ffn
    args.moe_args = dataclasses.replace(args.moe_args, num_experts=a.experts, top_k=a.top_k)
    args.tying = TieConfig()
    args.routing = dataclasses.replace(args.routing, aux_loss_coeff=AUX_COEFF, z_loss_coeff=Z_COEFF, expert_bias_rate=0.0)
    return args


def build(name: str, args, device: torch.device):
    """(model, loss function of (model, tokens)) on ``device``, initialised from seed 0."""
    torch.manual_seed(0)
    if name == "project_for_loop":
        args = copy.deepcopy(args)
        args.moe_args = dataclasses.replace(args.moe_args, use_grouped_mm=False)
        name = "project"
    if name == "project":
        model = FAMILIES["olmoe"][0](args)
        with torch.no_grad():
            model.init_weights()

        def loss_fn(m, tokens):
            ce = F.cross_entropy(m(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten())
            return ce + model_routing_loss(m, AUX_COEFF, Z_COEFF)
    elif name == "torchtitan":
        from torchtitan.models.qwen3.model.args import Qwen3ModelArgs
        from torchtitan.models.qwen3.model.model import Qwen3Model

        fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(Qwen3ModelArgs) if f.init and f.name != "_enforced"}
        model = Qwen3Model(Qwen3ModelArgs(**fields))
        with torch.no_grad():
            model.init_weights()

        def loss_fn(m, tokens):
            return F.cross_entropy(m(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten())
    else:
        from transformers import OlmoeForCausalLM

        from tiedmoe_titan.hf.hf_config import hf_config

        config = hf_config("olmoe", args, args.tie_layout(), banks_once=False)
        config.output_router_logits = True
        model = OlmoeForCausalLM(config)

        def loss_fn(m, tokens):
            out = m(input_ids=tokens[:, :-1])
            ce = F.cross_entropy(out.logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            return ce + AUX_COEFF * out.aux_loss
    model = model.to(device).train()
    return model, loss_fn


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def make_step(model, loss_fn, tokens, device):
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            loss = loss_fn(model, tokens)
        loss.backward()
        optimizer.step()
        return loss.item()

    return optimizer, step


def timed(step, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = local_device()
    args = project_args(a)
    models = MODELS + (("project_for_loop",) if a.with_for_loop else ())
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=torch.Generator().manual_seed(1)).to(device)
    tokens_per_step = a.batch * a.seq
    print(f"shape: dim {a.dim}, {a.layers} layers, {a.heads} heads, {a.experts} experts top-{a.top_k}, expert FFN {a.ffn}, "
          f"vocab {a.vocab}; batch {a.batch} x {a.seq} tokens; device {device}", flush=True)

    peaks, first_loss = {}, {}
    for name in models:  # memory: each model alone
        model, loss_fn = build(name, args, device)
        optimizer, step = make_step(model, loss_fn, tokens, device)
        first_loss[name] = step()  # warm-up; creates the optimizer state
        peaks[name] = peak_step_memory(model, [optimizer], step)
        print(f"{name}: first loss {first_loss[name]:.4f}, peak step memory {peaks[name] / 2**20:.1f} MiB", flush=True)
        del model, optimizer, step
        gc.collect()

    steps, times = {}, {name: [] for name in models}
    for name in models:
        model, loss_fn = build(name, args, device)
        steps[name] = (model, *make_step(model, loss_fn, tokens, device))
        steps[name][2]()  # warm-up
    for rep in range(a.reps):
        order = models[rep % len(models):] + models[:rep % len(models)]
        for name in order:
            times[name].append(timed(steps[name][2], device))
        print(f"round {rep + 1}/{a.reps}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in models), flush=True)

    counts = count_params(steps["project"][0])
    flops = flops_per_token(counts, args.n_layers, args.n_heads, 2 * args.head_dim, a.seq)
    peak_flops = None
    if device.type == "cuda":
        from torchtitan.tools.utils import get_peak_flops

        peak_flops = get_peak_flops(torch.cuda.get_device_name(device))
    rows = {}
    for name in models:
        median = statistics.median(times[name])
        tps = tokens_per_step / median
        rows[name] = {
            "step_s_median": median, "step_s_min": min(times[name]), "step_s_max": max(times[name]),
            "tokens_per_s": tps, "peak_memory_bytes": peaks[name], "first_loss": first_loss[name],
            "params": sum(p.numel() for p in steps[name][0].parameters()),
            "model_tflops": tps * flops / 1e12,
            "mfu": tps * flops / peak_flops if peak_flops else None,
        }
    for name in models[1:]:
        rows[name]["project_tokens_per_s_ratio"] = rows["project"]["tokens_per_s"] / rows[name]["tokens_per_s"]
        rows[name]["project_peak_memory_ratio"] = rows["project"]["peak_memory_bytes"] / rows[name]["peak_memory_bytes"]
    hf_impl = getattr(steps["hf"][0].config, "_experts_implementation", None)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"\ndevice: {device_name}, torch {torch.__version__}; HF experts implementation: {hf_impl}")
    print("| model | params | step s (median, min-max) | tokens/s | peak MiB | project / it: tokens/s | project / it: peak memory |"
          + (" MFU |" if peak_flops else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if peak_flops else ""))
    for name, r in rows.items():
        ratios = (f"{r['project_tokens_per_s_ratio']:.3f} | {r['project_peak_memory_ratio']:.3f}" if name != "project" else "1 | 1")
        print(f"| {name} | {r['params'] / 1e6:.2f}M | {r['step_s_median']:.3f} ({r['step_s_min']:.3f}-{r['step_s_max']:.3f}) "
              f"| {r['tokens_per_s']:.0f} | {r['peak_memory_bytes'] / 2**20:.1f} | {ratios} |"
              + (f" {r['mfu']:.1%} |" if peak_flops else ""))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": device_name, "torch": torch.__version__, "hf_experts_implementation": hf_impl,
                       "shape": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
