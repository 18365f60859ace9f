"""Train a tied model for a few steps under a parallel layout and report what happened.

Used by the distributed tests and ``benchmarks/shard_once.py``; also a quick check
for a user's own layout. It drives the same pieces as ``tiedmoe-train`` (the family's
model, ``parallelize_tied``, ``build_tied_optimizers``, the trainer's loss
normalisation with routing losses) on synthetic tokens, so runs with different
layouts see exactly the same data:

* the global batch of a step is split into ``pieces = data-parallel ranks x
  microbatches``; rank r runs pieces r*M .. r*M+M-1 as its microbatches;
* every piece's loss is (summed cross-entropy + token-weighted routing loss) divided
  by the global batch's token count, as torchtitan's trainer does;
* ``reference`` runs the same pieces one after another in a single process.

Run under torchrun: ``torchrun --nproc-per-node 4 -m tiedmoe_titan.testing.shard_check
--configs '{"g2": {"dp_shard": 4, "ep": 2, "tying": {"group_size": 2}}}' --out result.pt``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torchtitan.components.loss import cross_entropy_loss
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims

from ..compat import fsdp_units_and_gathered_bytes, process_group_size
from ..config import job_config_class
from ..memory import RankMemory, StepShape, estimate, meta_model
from ..models import FAMILIES
from ..models.bank import ExpertBank, banks_of
from ..models.moe import loss_with_routing
from ..optim import build_tied_optimizers
from ..parallelize import parallelize_tied
from ..tying import TieConfig


@dataclass
class CheckConfig:
    family: str = "qwen3"
    flavor: str = "debug"
    tying: TieConfig = field(default_factory=lambda: TieConfig(group_size=2, untied_first=2, untied_last=2))
    aux_loss_coeff: float = 0.01
    z_loss_coeff: float = 1e-4
    expert_bias_rate: float = 1e-3
    dp_shard: int = 1
    dp_replicate: int = 1
    ep: int = 1
    steps: int = 3
    microbatches: int = 2
    batch: int = 2
    seq_len: int = 32
    lr: float = 1e-3
    optimizer: dict = field(default_factory=dict)  # [optimizer] keys, e.g. {"name": "Muon", "muon": {"ns_dtype": "float32"}}
    seed: int = 0
    activation_checkpoint: str = "none"
    mixed_precision_param: str = "float32"
    compile_backend: str = ""  # e.g. "aot_eager": torch.compile each block with this backend
    model_overrides: dict = field(default_factory=dict)
    timing: bool = False  # measure memory and step time (see ``distributed``) instead of counting every step

    @classmethod
    def from_fields(cls, fields: dict) -> "CheckConfig":
        """The config of ``launch``'s JSON-able fields (``tying`` as a dict; none: untied)."""
        return cls(**{**fields, "tying": TieConfig(**fields.get("tying", {}))})

    @property
    def dp(self) -> int:
        return self.dp_shard * self.dp_replicate


# ---- model and data ----------------------------------------------------------------


def model_args(cfg: CheckConfig):
    args = copy.deepcopy(FAMILIES[cfg.family][1][cfg.flavor])
    args.tying = dataclasses.replace(cfg.tying)
    args.routing = dataclasses.replace(
        args.routing, aux_loss_coeff=cfg.aux_loss_coeff, z_loss_coeff=cfg.z_loss_coeff, expert_bias_rate=cfg.expert_bias_rate
    )
    for key, value in cfg.model_overrides.items():
        current = getattr(args, key)
        # A dict updates a nested config (e.g. {"moe_args": {"num_experts": 64}}).
        setattr(args, key, dataclasses.replace(current, **value) if isinstance(value, dict) else value)
    return args


def initial_state(cfg: CheckConfig) -> dict[str, torch.Tensor]:
    """The full initial weights every run starts from (DTensor init is not reproducible
    across layouts, so runs load these instead of initialising themselves)."""
    model = FAMILIES[cfg.family][0](model_args(cfg))
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        model.init_weights()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def batches(cfg: CheckConfig, world_pieces: int) -> torch.Tensor:
    """Token ids of shape (steps, pieces, batch, seq_len + 1)."""
    vocab = model_args(cfg).vocab_size
    g = torch.Generator().manual_seed(cfg.seed + 1)
    return torch.randint(0, vocab, (cfg.steps, world_pieces, cfg.batch, cfg.seq_len + 1), generator=g)


def job_config(cfg: CheckConfig) -> JobConfig:
    job = job_config_class()()  # torchtitan's, with this package's sections ([optimizer.muon])
    job.parallelism.data_parallel_shard_degree = cfg.dp_shard
    job.parallelism.data_parallel_replicate_degree = cfg.dp_replicate
    job.parallelism.expert_parallel_degree = cfg.ep
    job.training.mixed_precision_param = cfg.mixed_precision_param
    job.training.mixed_precision_reduce = "float32"
    job.activation_checkpoint.mode = cfg.activation_checkpoint
    job.compile.enable = bool(cfg.compile_backend)
    job.compile.components = ["model"]
    job.compile.backend = cfg.compile_backend or "inductor"
    job.optimizer.lr = cfg.lr
    # for-loop AdamW unless cfg.optimizer names an implementation (the trainer's default
    # is torchtitan's "fused"; benchmarks/shard_once.py times with that).
    job.optimizer.implementation = "for-loop"
    for key, value in cfg.optimizer.items():
        current = getattr(job.optimizer, key)
        setattr(job.optimizer, key, dataclasses.replace(current, **value) if isinstance(value, dict) else value)
    job.comm.init_timeout_seconds = 300
    return job


def parallel_dims(cfg: CheckConfig, world_size: int) -> ParallelDims:
    return ParallelDims(
        dp_shard=cfg.dp_shard, dp_replicate=cfg.dp_replicate, cp=1, tp=1, pp=1, ep=cfg.ep, etp=1, world_size=world_size
    )


def local_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# ---- counting collectives ----------------------------------------------------------


COLLECTIVES = ("allgather_base", "reduce_scatter_base", "allreduce", "all_to_all_single", "alltoall_base", "broadcast")


class CollectiveCounter(TorchDispatchMode):
    """Every c10d collective issued while active: op name, process-group size, and the
    bytes of its largest tensor argument (the gathered output of an all-gather, the
    unreduced input of a reduce-scatter: the unit's unsharded size)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional") and func.__name__.split(".")[0].strip("_") in COLLECTIVES:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            nbytes = max(t.numel() * t.element_size() for t in tensors)
            self.calls.append((func.__name__.split(".")[0].strip("_"), process_group_size(args), nbytes))
        return func(*args, **(kwargs or {}))



# ---- one training step -------------------------------------------------------------


def piece_loss(model, tokens: torch.Tensor, global_tokens: int, routing) -> torch.Tensor:
    """One piece's share of the step's loss, with the trainer's own loss functions
    (torchtitan's summed cross-entropy, ``loss_with_routing``)."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    return loss_with_routing(cross_entropy_loss(model(inputs), labels), labels, model, routing) / global_tokens


def run_step(model, optimizers, pieces: torch.Tensor, global_tokens: int) -> float:
    optimizers.zero_grad()
    loss = 0.0
    for piece in pieces:
        piece_l = piece_loss(model, piece, global_tokens, model.model_args.routing)
        piece_l.backward()
        loss += piece_l.item()
    optimizers.step()
    return loss


def full_grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        # The names of the unwrapped model (no activation-checkpoint / compile wrappers).
        name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        g = p.grad
        out[name] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().cpu().clone()
    return out


def expert_unit_bytes(model) -> set[int]:
    """Unsharded byte sizes of the FSDP units that hold routed experts: a collective of
    one of these sizes moves expert weights or gradients (bank units in a tied plan;
    with torchtitan's untied plan without EP, the whole block unit)."""
    sizes = set()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            for units, gathered_bytes in fsdp_units_and_gathered_bytes(module):
                if any(isinstance(sub, ExpertBank) for unit in units for sub in unit.modules()):
                    sizes.add(gathered_bytes)
    return sizes


def _local_bytes(tensors) -> int:
    """Bytes of the tensors as this rank holds them (a DTensor's local shard)."""
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def held_memory(params: list[torch.Tensor], optimizers) -> dict[str, int]:
    """Bytes of ``params``, their gradients and their optimizer state held on this rank
    (scalar state such as step counters left out)."""
    states = [
        value
        for opt in optimizers.optimizers
        for p in params
        for value in opt.state.get(p, {}).values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    ]
    return {
        "params": _local_bytes(params),
        "grads": _local_bytes(p.grad for p in params if p.grad is not None),
        "optimizer": _local_bytes(states),
    }


def expert_memory(model, optimizers) -> dict[str, int]:
    """Routed-expert parameters, gradients and optimizer state held on this rank."""
    held = held_memory([p for bank in banks_of(model) for p in bank.parameters()], optimizers)
    return {**held, "total": sum(held.values())}


def rank_memory(model, optimizers) -> dict[str, int]:
    """All parameters, gradients and optimizer state held on this rank (what
    ``tiedmoe_titan.memory`` predicts)."""
    return held_memory(list(model.parameters()), optimizers)


_references: dict[str, dict] = {}


def reference(cfg: CheckConfig) -> dict:
    """The single-process run: all pieces of each step, one after another.

    It depends on the layout only through the number of data-parallel pieces, so
    layouts that differ in how they shard, checkpoint activations or compile share one
    (computed once per process)."""
    key = repr(dataclasses.replace(
        cfg, dp_shard=cfg.dp, dp_replicate=1, ep=1, activation_checkpoint="none",
        mixed_precision_param="float32", compile_backend="", timing=False,
    ))
    if key not in _references:
        _references[key] = _reference(cfg)
    return _references[key]


def _reference(cfg: CheckConfig) -> dict:
    model = FAMILIES[cfg.family][0](model_args(cfg))
    model.load_state_dict(initial_state(cfg))
    dims = parallel_dims(dataclasses.replace(cfg, dp_shard=1, dp_replicate=1, ep=1), 1)
    optimizers = build_tied_optimizers([model], job_config(cfg).optimizer, dims)
    data = batches(cfg, cfg.dp * cfg.microbatches)
    global_tokens = data[0, :, :, 1:].numel()
    losses, first_grads = [], None
    for step in range(cfg.steps):
        losses.append(run_step(model, optimizers, data[step], global_tokens))
        if first_grads is None:
            first_grads = full_grads(model)
    return {"losses": losses, "grads": first_grads, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def peak_step_memory(model, optimizers, step_fn) -> int:
    """Peak tensor memory (bytes) of one training step on this rank: the device
    allocator's peak on a GPU; on CPU torch's MemTracker, which follows every tensor
    (parameters, gradients, optimizer state, activations, FSDP buffers), not the RSS."""
    device = local_device()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step_fn()
        return torch.cuda.max_memory_allocated(device)
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    # The container's own state is empty: track each optimizer's, or its states are
    # invisible until the step touches them.
    tracker.track_external(model, *optimizers)
    with tracker:
        step_fn()
    return sum(snapshot["Total"] for snapshot in tracker.get_tracker_snapshot("peak").values())


def build(cfg: CheckConfig, state: dict[str, torch.Tensor] | None = None):
    """(model, optimizers, parallel dims) of ``cfg``'s layout on this rank, with the full
    weights ``state`` (default: ``initial_state(cfg)``)."""
    device = local_device()
    dims = parallel_dims(cfg, dist.get_world_size())
    job = job_config(cfg)
    with torch.device("meta"):
        model = FAMILIES[cfg.family][0](model_args(cfg))
    parallelize_tied(model, dims, job)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()  # buffers (rope cache, expert bias); weights come next
    state = initial_state(cfg) if state is None else state
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    return model, build_tied_optimizers([model], job.optimizer, dims), dims


def distributed(cfg: CheckConfig) -> dict:
    """This rank's part of the run under ``cfg``'s layout (torch.distributed initialised).

    Collectives are counted on every step, unless ``cfg.timing``: then step 0 is
    counted, step 1 measures peak memory and the later steps are timed with no
    instrumentation (a dispatch mode slows every op), and ``grads`` is None."""
    steps = stepwise(cfg)
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


def stepwise(cfg: CheckConfig):
    """``distributed`` one step at a time: a generator that yields after each step and
    returns the result, so that a benchmark can interleave the steps of several
    layouts (every rank must advance them in the same order)."""
    device = local_device()
    model, optimizers, dims = build(cfg)

    batch_mesh = dims.get_mesh("batch") if dims.dp_enabled else None
    dp_rank = batch_mesh.get_local_rank() if batch_mesh is not None else 0
    data = batches(cfg, cfg.dp * cfg.microbatches).to(device)
    global_tokens = data[0, :, :, 1:].numel()
    mine = slice(dp_rank * cfg.microbatches, (dp_rank + 1) * cfg.microbatches)

    losses, first_grads, collectives, step_times, peak_memory = [], None, [], [], None
    for step in range(cfg.steps):
        def step_fn():
            return run_step(model, optimizers, data[step, mine], global_tokens)

        # torch.compile refuses to trace under a user dispatch mode: no counts then.
        if not cfg.compile_backend and (not cfg.timing or step == 0):
            with CollectiveCounter() as counter:
                local_loss = step_fn()
            collectives.append(counter.calls)
        elif cfg.timing and step == 1:
            peak_memory = peak_step_memory(model, optimizers, lambda: losses.append(step_fn()))
            local_loss = losses.pop()
        else:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            local_loss = step_fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter() - start)
        total = torch.tensor(local_loss, dtype=torch.float64, device=device)
        if batch_mesh is not None:
            dist.all_reduce(total, group=batch_mesh.get_group())
        losses.append(total.item())
        if first_grads is None and not cfg.timing:  # timing runs keep no full copy of the gradients
            first_grads = full_grads(model)
        yield step
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {
        "losses": losses,
        "grads": first_grads,
        "state": {k: v.detach().clone() for k, v in state.items()},
        "expert_memory": expert_memory(model, optimizers),
        "rank_memory": rank_memory(model, optimizers),
        "expert_unit_bytes": expert_unit_bytes(model),
        "collectives": collectives,
        "step_times": step_times,
        "peak_memory": peak_memory,
        "model": model,
        "optimizers": optimizers,
        "parallel_dims": dims,
    }


def estimate_check(cfg: CheckConfig, world_size: int) -> RankMemory:
    """The planner's per-rank memory estimate for a layout (how the planner is validated)."""
    job = job_config(cfg)
    shape = dataclasses.replace(
        StepShape.of_job_config(job, cfg.dp), local_batch_size=cfg.batch, seq_len=cfg.seq_len, microbatches=cfg.microbatches
    )
    return estimate(meta_model(FAMILIES[cfg.family][0], model_args(cfg)), parallel_dims(cfg, world_size), shape)


def dcp_roundtrip(result: dict, cfg: CheckConfig, directory: str) -> dict:
    """Save the sharded model with DCP, reload it into a freshly sharded model, and
    report the stored keys and whether every local shard came back bit-identical."""
    import torch.distributed.checkpoint as dcp

    model = result["model"]
    saved = get_model_state_dict(model)
    dcp.save(saved, checkpoint_id=directory)
    with torch.device("meta"):
        fresh = FAMILIES[cfg.family][0](model_args(cfg))
    parallelize_tied(fresh, result["parallel_dims"], job_config(cfg))
    fresh.to_empty(device=local_device())
    loaded = get_model_state_dict(fresh)
    dcp.load(loaded, checkpoint_id=directory)
    set_model_state_dict(fresh, loaded)

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    after = get_model_state_dict(fresh)
    identical = all(torch.equal(local(saved[k]), local(after[k])) for k in saved)
    keys = list(dcp.FileSystemReader(directory).read_metadata().state_dict_metadata)
    return {"identical": identical, "keys": keys}


def launch(nproc: int, configs: dict[str, dict], out: str, dcp_dir: str | None = None, timeout: float = 900) -> dict:
    """Run ``configs`` ({name: CheckConfig fields}) in one torchrun launch of ``nproc``
    CPU/GPU processes; rank 0's {name: result}."""
    import json
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        "-m", __name__, "--configs", json.dumps(configs), "--out", out,
    ]
    if dcp_dir:
        cmd += ["--dcp-dir", dcp_dir]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if run.returncode:
        raise RuntimeError(f"torchrun of {list(configs)} on {nproc} processes failed:\n{run.stderr[-4000:]}")
    return torch.load(out, weights_only=False)


def main(argv: list[str] | None = None) -> None:
    """Run several layouts in one launch; rank 0 saves {name: result} to --out."""
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", required=True, help='JSON: {"name": {CheckConfig fields, "tying": {...}}}')
    parser.add_argument("--out", required=True)
    parser.add_argument("--dcp-dir", help="also round-trip the first config through DCP here")
    a = parser.parse_args(argv)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    results = {}
    for i, (name, fields) in enumerate(json.loads(a.configs).items()):
        cfg = CheckConfig.from_fields(fields)
        result = distributed(cfg)
        if a.dcp_dir and i == 0:
            result["dcp"] = dcp_roundtrip(result, cfg, a.dcp_dir)
        results[name] = {k: v for k, v in result.items() if k not in ("model", "optimizers", "parallel_dims")}
    if dist.get_rank() == 0:
        torch.save(results, a.out)
    # Every rank's collectives are done before any tears its process groups down (gloo
    # aborts a rank whose peer leaves while it still has work in flight).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
