"""bf16 bank gradients: how far a tied bank's gradient is from fp32, against untied experts.

    python benchmarks/bank_grad_precision.py [--nproc 2] [--seeds 0,1,2,3,4,5] [--groups 1,2,4] [--after-steps 0,40]

Under FSDP2 mixed precision (``training.mixed_precision_param = "bfloat16"``,
``mixed_precision_reduce = "float32"``) autograd accumulates the G per-layer
gradients of a bank into the bf16 unsharded parameter's gradient; FSDP casts that sum
to fp32 only for the reduce-scatter. An untied layer's experts never sum. This script
measures what that costs, on N gloo processes (FSDP dp_shard=N, the real
``MixedPrecisionPolicy`` path) with ``recipes/debug_cpu.toml``'s model and batch: the
olmoe debug flavor, 2+2 untied anchors, local batch 8 x 128 tokens of the bundled
corpus per process, routing losses 0.01 / 1e-4, no expert bias.

For every seed (its own initial weights and batch) and every G, one forward and
backward in bf16 and in fp32 from the same weights, either the initial ones or those
after ``--after-steps`` fp32 AdamW steps (lr 3e-3, weight decay 0.1) on the corpus.
Errors are relative norms ||g_bf16 - g_fp32|| / ||g_fp32|| over one bank's (or one
untied layer's) w1, w2, w3 together:

* ``untied``: each MoE layer of the G=1 model (``untied_tied_region``: only the layers
  that the tied models share banks over);
* ``bank``: each shared bank of the tied model (the bf16 sum of G layer gradients);
* ``per_layer``: the same layers' gradients one by one, from the tied model's *twin*:
  the untied model holding the bank's weights in every layer of its group, which
  computes exactly the tied model's per-layer gradients but casts each to fp32 before
  anything is summed;
* ``fp32_sum``: the fp32 sum of those bf16 per-layer gradients (bf16 compute, no bf16
  summation);
* ``sum_only``: the bank's gradient against that fp32 sum, i.e. the error the bf16
  summation adds by itself.

Each is given per bank / layer and ``pooled`` over the tied region (all its banks'
or layers' differences over all their gradients: the relative error of that part of
the model's gradient). ``routing_changed`` is, per MoE layer, the fraction of tokens
whose top-k experts differ between the bf16 and the fp32 forward. ``check_*`` are
consistency checks of the twin: its fp32 per-layer gradients must sum to the tied
model's fp32 bank gradient and its bf16 loss must equal the tied one. Rank 0 prints
one JSON object per (point, seed, G), a summary (median and min-max over seeds and
banks / layers; the pooled bank error over the untied model's pooled error of the
same layers, paired by seed) and writes everything to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys

import torch

EXPERT_WEIGHTS = ("w1", "w2", "w3")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="gloo processes (FSDP dp_shard)")
    p.add_argument("--seeds", default="0,1,2,3,4,5", help="one set of initial weights and batch each")
    p.add_argument("--groups", default="1,2,4", help="tie group sizes; 1 is the untied baseline")
    p.add_argument("--after-steps", default="0,40", help="measure at these fp32 training steps (0: initial weights)")
    p.add_argument("--family", default="olmoe")
    p.add_argument("--flavor", default="debug")
    p.add_argument("--anchors", type=int, default=2, help="untied MoE layers at each end of the tied models")
    p.add_argument("--batch", type=int, default=8, help="sequences per process")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of the fp32 training before measuring")
    p.add_argument("--corpus-tokens", type=int, default=0, help="use only the corpus' first documents, this many tokens (0: all)")
    p.add_argument("--out", help="write the JSON (rows and summary) here")
    return p.parse_args(argv)


# ---- data: the recipe's corpus, cut into windows -----------------------------------


def corpus_tokens(limit: int = 0) -> torch.Tensor:
    """The bundled training corpus as one token stream (its first documents up to
    ``limit`` tokens, if given), each document [bos] + tokens + [eos] as the recipe reads it."""
    from tiedmoe_titan.assets import DEFAULT_TOKENIZER_PATH, DEFAULT_TRAIN_PATH
    from tiedmoe_titan.data.readers import iter_documents
    from tiedmoe_titan.tokenizer import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(DEFAULT_TOKENIZER_PATH)
    ids: list[int] = []
    for document in iter_documents(DEFAULT_TRAIN_PATH):
        ids += tokenizer.encode(document)
        if limit and len(ids) >= limit:
            break
    return torch.tensor(ids, dtype=torch.long)


def windows(tokens: torch.Tensor, count: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random windows of seq + 1 tokens, shape (count, seq + 1)."""
    starts = torch.randint(0, tokens.numel() - seq - 1, (count,), generator=generator)
    return torch.stack([tokens[s : s + seq + 1] for s in starts.tolist()])


# ---- models ------------------------------------------------------------------------


def check_config(a, group_size: int, seed: int, world: int, precision: str = "float32"):
    from tiedmoe_titan.testing.shard_check import CheckConfig
    from tiedmoe_titan.tying import TieConfig

    anchors = a.anchors if group_size > 1 else 0
    return CheckConfig(
        family=a.family, flavor=a.flavor,
        tying=TieConfig(group_size=group_size, untied_first=anchors, untied_last=anchors),
        aux_loss_coeff=0.01, z_loss_coeff=1e-4, expert_bias_rate=0.0,
        dp_shard=world, steps=1, microbatches=1, batch=a.batch, seq_len=a.seq, lr=a.lr, seed=seed,
        mixed_precision_param=precision,
    )


def trained_state(cfg, steps: int, tokens: torch.Tensor, global_batch: int) -> dict[str, torch.Tensor]:
    """Full weights after ``steps`` fp32 AdamW steps in one process (every rank computes
    the same, deterministically): the starting point of the measurement."""
    from tiedmoe_titan.models import FAMILIES
    from tiedmoe_titan.testing.shard_check import initial_state, model_args, piece_loss

    state = initial_state(cfg)
    if steps == 0:
        return state
    model = FAMILIES[cfg.family][0](model_args(cfg))
    model.load_state_dict(state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1)
    generator = torch.Generator().manual_seed(10_000 + cfg.seed)
    for _ in range(steps):
        batch = windows(tokens, global_batch, cfg.seq_len, generator)
        optimizer.zero_grad()
        piece_loss(model, batch, batch[:, 1:].numel(), model.model_args.routing).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def untie(state: dict[str, torch.Tensor], layout) -> dict[str, torch.Tensor]:
    """The G=1 model's weights that equal ``state``'s tied model: every layer of a group
    holds its bank."""
    out = {k: v for k, v in state.items() if ".moe.experts." not in k}
    for layer in layout.moe_layers:
        owner = layout.bank_of(layer).owner
        for w in EXPERT_WEIGHTS:
            out[f"layers.{layer}.moe.experts.{w}"] = state[f"layers.{owner}.moe.experts.{w}"]
    return out


def expert_grads(cfg, state: dict[str, torch.Tensor], batch: torch.Tensor):
    """One forward and backward of ``batch`` (the global batch; this rank runs its rows)
    under FSDP with ``cfg``'s mixed precision: (global loss, {owner layer: its bank's
    full gradient, w1 w2 w3 flattened, fp64}, {MoE layer: this rank's routed experts,
    shape (tokens, top_k), sorted})."""
    import torch.distributed as dist

    from tiedmoe_titan.testing.shard_check import build, full_grads, piece_loss

    model, _, dims = build(cfg, state)
    routes = {}
    for layer_id, block in model.layers.items():
        if getattr(block, "moe_enabled", False):
            top_k = block.moe.router.top_k

            def keep(module, args, logits, layer=int(layer_id), k=top_k):
                routes[layer] = logits.detach().float().topk(k, dim=-1).indices.sort(dim=-1).values

            block.moe.router.gate.register_forward_hook(keep)
    rank = dims.get_mesh("batch").get_local_rank()
    rows = batch.shape[0] // cfg.dp
    loss = piece_loss(model, batch[rank * rows : (rank + 1) * rows], batch[:, 1:].numel(), model.model_args.routing)
    loss.backward()
    total = loss.detach().double()
    dist.all_reduce(total)
    grads = full_grads(model)
    owners = sorted({int(name.split(".")[1]) for name in grads if ".moe.experts." in name})
    return total.item(), {
        owner: torch.cat([grads[f"layers.{owner}.moe.experts.{w}"].double().flatten() for w in EXPERT_WEIGHTS])
        for owner in owners
    }, routes


def routing_changed(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> dict[int, float]:
    """Per MoE layer, the fraction of tokens (all ranks) whose set of experts differs."""
    import torch.distributed as dist

    out = {}
    for layer in sorted(a):
        counts = torch.tensor([(a[layer] != b[layer]).any(dim=-1).sum().item(), a[layer].shape[0]], dtype=torch.float64)
        dist.all_reduce(counts)
        out[layer] = (counts[0] / counts[1]).item()
    return out


def pooled(errors: dict[int, torch.Tensor], refs: dict[int, torch.Tensor]) -> float:
    """||all differences|| / ||all references||: the relative error of those gradients together."""
    return (sum(e.norm() ** 2 for e in errors.values()) / sum(r.norm() ** 2 for r in refs.values())).sqrt().item()


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).norm() / ref.norm()).item()


# ---- one measurement ---------------------------------------------------------------


def measure(a, g: int, seed: int, steps: int, tokens: torch.Tensor, world: int) -> dict:
    from tiedmoe_titan.testing.shard_check import model_args

    cfg = check_config(a, g, seed, world)
    layout = model_args(cfg).tie_layout()
    state = trained_state(cfg, steps, tokens, a.batch * world)
    batch = windows(tokens, a.batch * world, a.seq, torch.Generator().manual_seed(seed))
    loss32, g32, routes32 = expert_grads(cfg, state, batch)
    loss16, g16, routes16 = expert_grads(dataclasses.replace(cfg, mixed_precision_param="bfloat16"), state, batch)
    row = {"after_steps": steps, "seed": seed, "G": g, "loss_fp32": loss32, "loss_bf16": loss16,
           "routing_changed": routing_changed(routes16, routes32)}
    if g == 1:
        tied_region = layout.moe_layers[a.anchors : len(layout.moe_layers) - a.anchors]
        row["untied"] = {layer: rel(g16[layer], g32[layer]) for layer in layout.moe_layers}
        row["untied_tied_region"] = {layer: row["untied"][layer] for layer in tied_region}
        row["pooled"] = {"untied_tied_region": pooled({i: g16[i] - g32[i] for i in tied_region}, {i: g32[i] for i in tied_region})}
        return row
    twin_cfg = check_config(a, 1, seed, world)
    twin_state = untie(state, layout)
    twin_loss16, t16, _ = expert_grads(dataclasses.replace(twin_cfg, mixed_precision_param="bfloat16"), twin_state, batch)
    _, t32, _ = expert_grads(twin_cfg, twin_state, batch)
    row.update(bank={}, per_layer={}, fp32_sum={}, sum_only={}, check_fp32_sum={}, check_bf16_loss=twin_loss16 - loss16)
    shared = [bank for bank in layout.banks if bank.group_size > 1]
    sums16, sums32 = {}, {}
    for bank in shared:
        sums16[bank.owner] = sum(t16[layer] for layer in bank.layers)  # fp64 sum of the bf16 per-layer gradients
        sums32[bank.owner] = sum(t32[layer] for layer in bank.layers)
        row["bank"][bank.owner] = rel(g16[bank.owner], g32[bank.owner])
        row["per_layer"].update({layer: rel(t16[layer], t32[layer]) for layer in bank.layers})
        row["fp32_sum"][bank.owner] = rel(sums16[bank.owner], sums32[bank.owner])
        row["sum_only"][bank.owner] = rel(g16[bank.owner], sums16[bank.owner])
        row["check_fp32_sum"][bank.owner] = rel(g32[bank.owner], sums32[bank.owner])
    layers = [layer for bank in shared for layer in bank.layers]
    row["pooled"] = {
        "bank": pooled({b: g16[b] - g32[b] for b in sums32}, {b: g32[b] for b in sums32}),
        "per_layer": pooled({i: t16[i] - t32[i] for i in layers}, {i: t32[i] for i in layers}),
        "fp32_sum": pooled({b: sums16[b] - sums32[b] for b in sums32}, sums32),
        "sum_only": pooled({b: g16[b] - sums16[b] for b in sums16}, sums16),
    }
    return row


# ---- summary -----------------------------------------------------------------------


KINDS = ("untied", "untied_tied_region", "per_layer", "bank", "fp32_sum", "sum_only")


def spread(values: list[float]) -> dict:
    return {"n": len(values), "median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(rows: list[dict]) -> list[dict]:
    """Per (point, G): each error's median, min and max over seeds and banks / layers
    (``kind``), the same over seeds for the pooled errors of the tied region
    (``pooled kind``), the fraction of tokens routed differently, and the tied model's
    pooled bank error over the untied model's pooled error of the same layers, paired
    by seed."""
    out = []
    for steps in sorted({r["after_steps"] for r in rows}):
        at = [r for r in rows if r["after_steps"] == steps]
        untied = {r["seed"]: r["pooled"]["untied_tied_region"] for r in at if r["G"] == 1}
        for g in sorted({r["G"] for r in at}):
            mine = [r for r in at if r["G"] == g]
            head = {"after_steps": steps, "G": g}
            out.append({**head, "kind": "routing_changed", **spread([e for r in mine for e in r["routing_changed"].values()])})
            for kind in KINDS:
                values = [e for r in mine for e in r.get(kind, {}).values()]
                if values:
                    out.append({**head, "kind": kind, **spread(values)})
            for kind in mine[0]["pooled"]:
                entry = {**head, "kind": f"pooled {kind}", **spread([r["pooled"][kind] for r in mine])}
                if kind == "bank" and untied:
                    ratios = [r["pooled"]["bank"] / untied[r["seed"]] for r in mine if r["seed"] in untied]
                    entry["over_untied"] = spread(ratios)
                out.append(entry)
    return out


def table(summary: list[dict]) -> str:
    lines = [f"{'steps':>5} {'G':>2} {'kind':<24} {'n':>3} {'median':>9} {'min':>9} {'max':>9}  bank / untied (paired)"]
    for s in summary:
        extra = ""
        if "over_untied" in s:
            o = s["over_untied"]
            extra = f"  {o['median']:.2f} ({o['min']:.2f}-{o['max']:.2f})"
        lines.append(
            f"{s['after_steps']:>5} {s['G']:>2} {s['kind']:<24} {s['n']:>3} {s['median']:>9.2e} {s['min']:>9.2e} {s['max']:>9.2e}{extra}"
        )
    return "\n".join(lines)


def worker(a) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    if world < 2:  # FSDP (and so its mixed precision) is applied only when parameters are sharded
        raise SystemExit("bank_grad_precision.py needs --nproc 2 or more")
    tokens = corpus_tokens(a.corpus_tokens)
    rows = []
    for steps in (int(x) for x in a.after_steps.split(",")):
        for seed in (int(x) for x in a.seeds.split(",")):
            for g in (int(x) for x in a.groups.split(",")):
                row = measure(a, g, seed, steps, tokens, world)
                rows.append(row)
                if dist.get_rank() == 0:
                    print(json.dumps(row), flush=True)
    if dist.get_rank() == 0:
        summary = summarise(rows)
        print(table(summary))
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"args": vars(a), "torch": torch.__version__, "world_size": world, "rows": rows, "summary": summary}, f, indent=1)
    dist.barrier()
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.nproc), __file__, *worker_argv(sys.argv[1:])]
    raise SystemExit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
