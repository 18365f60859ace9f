"""One run on a lent GPU: the project's checks that need one, inside a fixed time.

    bash benchmarks/gpu_check.sh                       # on the GPU machine: installs .whl/, runs this
    python benchmarks/gpu_check.py --out DIR [--profile gpu|smoke] [--parts all|none|NAME,...]
                                   [--budget-s 480] [--dry-run]

A lent GPU comes once, for minutes, without network, so everything runs from one
command and no part may stop the others: each part runs its commands in their own
process group under a time limit (clipped to what is left of ``--budget-s``); a part
that fails or runs out of time records its error and the next one starts.
``DIR/gpu_check.json`` is rewritten after every part, so a kill still leaves the
finished ones; ``DIR/gpu_check.log`` gets the output of every command (its last
512 KiB). A summary table is printed at the end.

Parts, in the order they run (letters as in the request that asked for them):

* env: device, versions (torch, triton, torchtitan, ...), where each module imports from;
* debug_g1, debug_g2, debug_g4 (a): ``recipes/debug_cpu.toml`` trained by tiedmoe-train
  in bf16 with torch.compile at G = 1, 2, 4: first / last loss, tokens/s after warm-up,
  peak reserved memory (torchtitan's log line);
* vs_torchtitan_hf (b): ``benchmarks/vs_torchtitan_hf.py`` on a GPU-sized shape;
* planner (d): ``benchmarks/planner_validation.py`` on its single-GPU cases, the
  planner's estimate against ``torch.cuda.max_memory_allocated``;
* data (issue 14): ``benchmarks/data_scale.py --part shards`` on the machine's own disk:
  loader construction, resident memory above baseline, shuffled samples/s cold and warm
  on synthetic uint16 shards, and the debug recipe's need;
* qwen3_1b_g2 (c): a Qwen3-MoE-style model (1.54B unique parameters, 2.55B untied) tied
  at G=2, bf16, compiled; tokens/s after warm-up and MFU with the project's FLOP count
  (``models/accounting.py``) against the H200's dense bf16 peak, 989 TFLOP/s (NVIDIA's
  datasheet; torchtitan uses the same figure); the planner's estimate beside.

``--profile smoke`` runs the same parts with tiny shapes, few steps and the aot_eager
compile backend, to test this driver on a CPU before the one GPU run. ``--dry-run``
writes the JSON skeleton (every part's commands, status "dry-run") and runs nothing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = 1
H200_BF16_DENSE_FLOPS = 989e12  # NVIDIA H200 datasheet, dense (no sparsity) BF16 Tensor Core peak
LOG_TAIL_BYTES = 512 * 2**10
MIN_PART_S = 15  # a part with less of the budget left is skipped, not started
KILL_GRACE_S = 5


# ---- what each profile runs --------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    debug_steps: int
    debug_log_freq: int
    compile_backend: str
    vs_args: tuple[str, ...]  # benchmarks/vs_torchtitan_hf.py shape and repetitions
    planner_cases: str
    qwen3_shape: dict  # overrides of the qwen3 "regular" flavor's args
    qwen3_steps: int
    qwen3_log_freq: int
    qwen3_batch: int
    qwen3_seq_len: int
    data_tokens: int  # synthetic shard tokens of benchmarks/data_scale.py
    limits_s: dict  # part name -> time limit, seconds
    budget_s: float  # all parts together


QWEN3_1B = {
    "dim": 1024, "n_layers": 24, "n_heads": 16, "n_kv_heads": 4, "head_dim": 64, "vocab_size": 32768,
    "max_seq_len": 2048, "hidden_dim": 3072, "moe_inter_dim": 512, "moe_args": {"num_experts": 64, "top_k": 8},
}

PROFILES = {
    # One H200, 8 minutes in all (a device call may run 10): compile costs 30-90 s on first
    # use, so few steps.
    "gpu": Profile(
        debug_steps=30, debug_log_freq=10, compile_backend="inductor",
        vs_args=("--dim", "1024", "--layers", "8", "--heads", "16", "--experts", "32", "--top-k", "4", "--ffn", "512",
                 "--vocab", "32768", "--batch", "8", "--seq", "1024", "--reps", "5"),
        planner_cases="qwen3_g1,olmoe_g2_full_ac,qwen3_g2_small_batch",
        qwen3_shape=QWEN3_1B, qwen3_steps=20, qwen3_log_freq=5, qwen3_batch=4, qwen3_seq_len=2048,
        data_tokens=500_000_000,
        limits_s={"env": 60, "debug_g1": 100, "debug_g2": 70, "debug_g4": 70, "vs_torchtitan_hf": 100,
                  "planner": 80, "data": 150, "qwen3_1b_g2": 150},
        budget_s=480,
    ),
    # A CPU test of the driver: the same parts and flags, tiny shapes (the vocabulary
    # stays 2048, the bundled tokenizer's).
    "smoke": Profile(
        debug_steps=2, debug_log_freq=1, compile_backend="aot_eager",
        vs_args=("--dim", "64", "--layers", "2", "--heads", "2", "--experts", "4", "--top-k", "2", "--ffn", "32",
                 "--vocab", "256", "--batch", "2", "--seq", "32", "--reps", "2", "--threads", "1"),
        planner_cases="test_qwen3_g1",
        qwen3_shape={"dim": 64, "n_layers": 6, "n_heads": 2, "n_kv_heads": 1, "head_dim": 32, "vocab_size": 2048,
                     "max_seq_len": 64, "hidden_dim": 128, "moe_inter_dim": 32, "moe_args": {"num_experts": 8, "top_k": 2}},
        qwen3_steps=2, qwen3_log_freq=1, qwen3_batch=2, qwen3_seq_len=32,
        data_tokens=2_000_000,
        limits_s={"env": 120, "debug_g1": 240, "debug_g2": 240, "debug_g4": 240, "vs_torchtitan_hf": 120,
                  "planner": 240, "data": 120, "qwen3_1b_g2": 300},
        budget_s=1500,
    ),
}


# ---- parts ---------------------------------------------------------------------------


@dataclass
class Part:
    name: str
    what: str
    commands: list[list[str]]  # run in order; the first that fails ends the part
    parse: Callable[[list[str]], dict]  # outputs of the commands that ran -> result
    figures: Callable[[dict], str]  # result -> one line of the summary table


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


STEP_LINE = re.compile(
    r"step:\s*(?P<step>\d+)\s+loss:\s*(?P<loss>\S+)\s+grad_norm:\s*\S+\s+memory:\s*(?P<mem>[0-9.]+)GiB"
    r"\((?P<mem_pct>[0-9.]+)%\)\s+tps:\s*(?P<tps>[0-9,]+)\s+tflops:\s*(?P<tflops>[0-9,.]+)\s+mfu:\s*(?P<mfu>[0-9.]+)%"
)


def train_log(text: str, log_freq: int) -> dict:
    """torchtitan's per-log-step lines of a training output. Throughput counts only the
    logs after the first full interval (step 1 and the interval after it hold the
    compiles); reserved memory is the peak over all logs (each covers its interval)."""
    rows = [
        {"step": int(m["step"]), "loss": float(m["loss"]), "reserved_gib": float(m["mem"]),
         "tps": int(m["tps"].replace(",", "")), "tflops": float(m["tflops"].replace(",", "")), "mfu_pct": float(m["mfu"])}
        for m in STEP_LINE.finditer(strip_ansi(text))
    ]
    if not rows:
        raise ValueError("no training step was logged")
    warm = [r for r in rows if r["step"] > log_freq] or rows[-1:]
    return {
        "steps_logged": [r["step"] for r in rows],
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
        "tokens_per_s": statistics.median(r["tps"] for r in warm),
        "throughput_steps": [r["step"] for r in warm],
        "tflops_torchtitan": statistics.median(r["tflops"] for r in warm),
        "mfu_pct_torchtitan": statistics.median(r["mfu_pct"] for r in warm),
        "peak_reserved_gib": max(r["reserved_gib"] for r in rows),
        "log": rows,
    }


def last_json(text: str) -> dict:
    """The last line of ``text`` that is a JSON object (what a command printed last)."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def env_part() -> Part:
    def figures(r: dict) -> str:
        device = r["device"].get("name") or "no CUDA device"
        return f"{device}; torch {r['versions']['torch']}, triton {r['versions']['triton']}, torchtitan {r['versions']['torchtitan']}"

    return Part("env", "device, versions, imports", [python(__file__, "probe", "env")],
                lambda outputs: last_json(outputs[0]), figures)


def debug_part(profile: Profile, work: str, group_size: int) -> Part:
    cmd = python(
        "-m", "tiedmoe_titan.train", "recipes/debug_cpu.toml",
        "--job.dump_folder", os.path.join(work, f"debug_g{group_size}"),
        "--tying.group_size", str(group_size),
        "--training.steps", str(profile.debug_steps), "--metrics.log_freq", str(profile.debug_log_freq),
        "--validation.no-enable",
        "--training.mixed_precision_param", "bfloat16",
        "--compile.enable", "--compile.backend", profile.compile_backend,
    )

    def figures(r: dict) -> str:
        return (f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}, {r['tokens_per_s']:,.0f} tok/s, "
                f"{r['peak_reserved_gib']:.2f} GiB reserved")

    return Part(f"debug_g{group_size}", f"(a) debug recipe, G={group_size}, bf16, compiled", [cmd],
                lambda outputs: train_log(outputs[0], profile.debug_log_freq), figures)


def vs_part(profile: Profile, work: str) -> Part:
    out = os.path.join(work, "vs_torchtitan_hf.json")

    def parse(outputs: list[str]) -> dict:
        with open(out) as f:
            return json.load(f)

    def figures(r: dict) -> str:
        rows = r["rows"]
        tps = "/".join(f"{rows[n]['tokens_per_s']:,.0f}" for n in rows)
        mib = "/".join(f"{rows[n]['peak_memory_bytes'] / 2**20:,.0f}" for n in rows)
        return f"{'/'.join(rows)}: {tps} tok/s, {mib} MiB peak"

    return Part("vs_torchtitan_hf", "(b) project G=1 vs torchtitan vs transformers",
                [python("benchmarks/vs_torchtitan_hf.py", *profile.vs_args, "--out", out)], parse, figures)


def planner_part(profile: Profile, work: str) -> Part:
    out = os.path.join(work, "planner.jsonl")

    def parse(outputs: list[str]) -> dict:
        with open(out) as f:
            return {"rows": [json.loads(line) for line in f if line.strip()]}

    def figures(r: dict) -> str:
        return ", ".join(f"{row['case']} peak {row['peak_error']:+.1%}" for row in r["rows"])

    return Part("planner", "(d) planner estimate vs measured peak",
                [python("benchmarks/planner_validation.py", "--cases", profile.planner_cases, "--out", out)],
                parse, figures)


def data_part(profile: Profile, work: str) -> Part:
    cmd = python("benchmarks/data_scale.py", "--part", "shards", "--tokens", str(profile.data_tokens),
                 "--small-tokens", str(min(10_000_000, profile.data_tokens // 2)), "--shard-tokens", str(1 << 26),
                 "--batches", "200", "--long-batches", "1000", "--shards-dir", os.path.join(work, "shards"), "--json")

    def parse(outputs: list[str]) -> dict:
        return last_json(outputs[0])["shards"]

    def figures(r: dict) -> str:
        large = r["large"]
        cold, warm = large["train_cold"], large["train_warm"]
        return (f"{large['tokens'] / 1e9:.1f}B tokens: built in {cold['build_s'] * 1e3:.0f} ms, RSS +{cold['after_longer_mib']['rss']} MiB "
                f"after {cold['batches_read_longer']} batches; {cold['samples_per_s']:,.0f} / {warm['samples_per_s']:,.0f} "
                f"samples/s cold / warm (seq {r['seq_len']} x {r['batch']})")

    return Part("data", "token-shard loader on this machine's disk", [cmd], parse, figures)


QWEN3_RECIPE = "recipes/qwen3/regular_g2.toml"  # G=2 with 2 + 2 untied anchors


def qwen3_part(profile: Profile, work: str) -> Part:
    flavor = os.path.join(work, "qwen3_1b.json")
    overrides = [
        "--model.flavor", flavor,
        "--training.steps", str(profile.qwen3_steps), "--metrics.log_freq", str(profile.qwen3_log_freq),
        "--training.local_batch_size", str(profile.qwen3_batch), "--training.seq_len", str(profile.qwen3_seq_len),
        "--lr_scheduler.warmup_steps", "2", "--activation_checkpoint.mode", "none",
        "--checkpoint.no-enable", "--validation.no-enable",
        "--compile.enable", "--compile.backend", profile.compile_backend,
    ]
    commands = [
        python(__file__, "probe", "flavor", "--shape", json.dumps(profile.qwen3_shape), "--recipe", QWEN3_RECIPE,
               "--seq-len", str(profile.qwen3_seq_len), "--out", flavor),
        python("-m", "tiedmoe_titan.plan", QWEN3_RECIPE, *overrides,
               "--nodes", "1", "--gpus-per-node", "1", "--gpu-memory", "140GiB", "--json"),
        python("-m", "tiedmoe_titan.train", QWEN3_RECIPE, "--job.dump_folder", os.path.join(work, "qwen3_1b_g2"),
               *overrides),
    ]

    def parse(outputs: list[str]) -> dict:
        counts = last_json(outputs[0])
        plan = last_json(outputs[1])
        run = train_log(outputs[2], profile.qwen3_log_freq)
        return {
            "shape": profile.qwen3_shape,
            "total_params": plan["total_params"], "untied_total_params": plan["untied_total_params"],
            "active_params": plan["active_params"], "flops_per_token": counts["flops_per_token"],
            "mfu": run["tokens_per_s"] * counts["flops_per_token"] / H200_BF16_DENSE_FLOPS,
            "peak_flops": H200_BF16_DENSE_FLOPS,
            "planned_peak_gib": plan["memory"]["as_written"]["total"] / 2**30,
            **run,
        }

    def figures(r: dict) -> str:
        return (f"{r['total_params'] / 1e9:.2f}B params, {r['tokens_per_s']:,.0f} tok/s, MFU {r['mfu']:.1%}, "
                f"{r['peak_reserved_gib']:.1f} GiB reserved (planned {r['planned_peak_gib']:.1f})")

    return Part("qwen3_1b_g2", "(c) Qwen3-MoE-style flavor file, G=2, bf16, compiled", commands, parse, figures)


def all_parts(profile: Profile, work: str) -> list[Part]:
    return [
        env_part(),
        *(debug_part(profile, work, g) for g in (1, 2, 4)),
        vs_part(profile, work),
        planner_part(profile, work),
        data_part(profile, work),
        qwen3_part(profile, work),
    ]


PART_NAMES = [p.name for p in all_parts(PROFILES["gpu"], "")]


# ---- running -------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """Children import the project from the repository and never reach for a network."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    if REPO not in path.split(os.pathsep):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (path, REPO) if p)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.setdefault("TIEDMOE_DATA_CACHE", os.path.join(tempfile.gettempdir(), "tiedmoe_gpu_check_data_cache"))
    return env


def run_command(cmd: list[str], output_path: str, timeout: float) -> int | None:
    """Exit code, or None if it ran past ``timeout`` (then its whole process group,
    torchrun's workers included, gets SIGTERM and, after a grace period, SIGKILL)."""
    with open(output_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout, 0))
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=KILL_GRACE_S)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
            proc.wait()
            return None


def tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else "[...]\n" + text[-limit:]


def run_part(part: Part, limit: float, work: str, log) -> dict:
    record = new_record(part, limit)
    start = time.monotonic()
    outputs = []
    record["status"] = "ok"
    for i, cmd in enumerate(part.commands):
        output_path = os.path.join(work, f"{part.name}.{i}.out")
        log.write(f"\n===== {part.name} [{i + 1}/{len(part.commands)}]: {shlex.join(cmd)}\n")
        log.flush()
        rc = run_command(cmd, output_path, start + limit - time.monotonic())
        with open(output_path, errors="replace") as f:
            outputs.append(f.read())
        log.write(tail(outputs[-1], LOG_TAIL_BYTES) + f"\n===== {part.name} [{i + 1}]: exit {rc} after "
                  f"{time.monotonic() - start:.1f} s\n")
        log.flush()
        if rc is None:
            record["status"], record["error"] = "timeout", f"command {i + 1} ran past the part's {limit:.0f} s"
            break
        if rc != 0:
            record["status"] = "failed"
            text = strip_ansi(outputs[-1]).strip()
            last = text.splitlines()[-1] if text else "(no output)"
            record["error"] = f"command {i + 1} exited {rc}: {last}\n{tail(text, 3000)}"
            break
    try:
        # Also after a failure or timeout: the steps that did run are worth keeping.
        record["result"] = part.parse(outputs)
    except Exception as e:  # noqa: BLE001  (any parse failure is recorded, never raised)
        if record["status"] == "ok":
            record["status"], record["error"] = "failed", f"reading the output: {type(e).__name__}: {e}"
    record["wall_s"] = round(time.monotonic() - start, 1)
    return record


def new_record(part: Part, limit: float | None) -> dict:
    return {"what": part.what, "status": None, "time_limit_s": limit, "wall_s": None,
            "commands": [shlex.join(c) for c in part.commands], "result": None, "figures": None, "error": None}


def write_json(path: str, doc: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def summary(doc: dict) -> str:
    """One line per part: status, wall time, its figures and the first line of its error."""
    rows = [("part", "status", "wall s", "figures")]
    for name, r in doc["parts"].items():
        figures = " | ".join(x for x in (r["figures"], (r["error"] or "").split("\n")[0][:160]) if x)
        rows.append((name, r["status"], "" if r["wall_s"] is None else f"{r['wall_s']:.1f}", figures))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in rows)


def check(a) -> dict:
    """Run the selected parts (or only lay them out, with --dry-run); the final document."""
    profile = PROFILES[a.profile]
    budget = a.budget_s or profile.budget_s
    os.makedirs(a.out, exist_ok=True)
    work = a.work or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(work, exist_ok=True)
    parts = [p for p in all_parts(profile, work) if p.name in a.parts]
    doc = {
        "schema": SCHEMA, "profile": a.profile, "dry_run": a.dry_run, "budget_s": budget,
        "peak_flops_h200_bf16_dense": H200_BF16_DENSE_FLOPS, "work_dir": work,
        "started": datetime.datetime.now().isoformat(timespec="seconds"), "finished": None, "total_wall_s": None,
        "parts": {p.name: new_record(p, profile.limits_s[p.name]) for p in parts},
    }
    json_path = os.path.join(a.out, "gpu_check.json")
    start = time.monotonic()
    deadline = start + budget
    with open(os.path.join(a.out, "gpu_check.log"), "a") as log:
        for part in parts:
            record = doc["parts"][part.name]
            left = deadline - time.monotonic()
            if a.dry_run:
                record["status"] = "dry-run"
            elif left < MIN_PART_S:
                record["status"], record["error"] = "skipped", f"not started: {left:.0f} s of the budget left"
            else:
                print(f"[{time.monotonic() - start:6.1f} s] {part.name}: {part.what} ...", flush=True)
                limit = round(min(profile.limits_s[part.name], left), 1)
                record = doc["parts"][part.name] = run_part(part, limit, work, log)
                if record["result"] is not None:
                    try:
                        record["figures"] = part.figures(record["result"])
                    except (KeyError, TypeError, ValueError) as e:
                        record["figures"] = f"(no figures: {type(e).__name__}: {e})"
                print(f"[{time.monotonic() - start:6.1f} s] {part.name}: {record['status']}", flush=True)
            write_json(json_path, doc)
    doc["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    doc["total_wall_s"] = round(time.monotonic() - start, 1)
    write_json(json_path, doc)
    return doc


def parse_parts(text: str) -> list[str]:
    if text == "all":
        return list(PART_NAMES)
    if text == "none":
        return []
    names = text.split(",")
    unknown = [n for n in names if n not in PART_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown part {unknown[0]!r}: choose from {', '.join(PART_NAMES)}, all, none")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, "outputs", "gpu_check"),
                   help="where gpu_check.json and gpu_check.log go (default: $OUT)")
    p.add_argument("--work", help="scratch folder for training outputs (default: a new temporary folder)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="gpu")
    p.add_argument("--parts", type=parse_parts, default="all", help=f"all, none, or some of: {', '.join(PART_NAMES)}")
    p.add_argument("--budget-s", type=float, help="seconds for all parts together (default: the profile's)")
    p.add_argument("--dry-run", action="store_true", help="write the JSON skeleton with every command; run nothing")
    return p.parse_args(argv)


# ---- probes: run as subprocesses by the parts above -------------------------------------


def probe_env() -> dict:
    """Versions, device and where each module imports from (the carried wheels should
    come from the install target, the project from the repository)."""
    import importlib
    import importlib.metadata
    import platform

    versions = {}
    for dist in ("torch", "triton", "torchtitan", "torchdata", "datasets", "transformers", "tokenizers",
                 "huggingface_hub", "fsspec", "pyarrow", "numpy", "tyro", "typeguard", "typing_extensions"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    imports = {}
    for module in ("datasets", "torchdata.stateful_dataloader", "tyro", "torchtitan.train", "transformers",
                   "tiedmoe_titan.train", "tiedmoe_titan.hf.hf_config"):
        try:
            imports[module] = importlib.import_module(module).__file__
        except Exception as e:  # noqa: BLE001  (what failed to import is the finding)
            imports[module] = f"error: {type(e).__name__}: {e}"
    import torch

    device = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device.update(name=torch.cuda.get_device_name(0), count=torch.cuda.device_count(),
                      capability=list(torch.cuda.get_device_capability(0)), total_memory_bytes=props.total_memory,
                      multiprocessors=props.multi_processor_count)
    return {"python": platform.python_version(), "torch": torch.__version__, "versions": versions,
            "imports": imports, "device": device, "cpus": os.cpu_count()}


def probe_flavor(shape: dict, recipe: str, seq_len: int, out: str) -> dict:
    """Write the qwen3 flavor file of ``shape`` and count the recipe's tied model (meta
    device): parameters and FLOPs per token as tiedmoe-train's MFU counts them."""
    import torch

    import tiedmoe_titan.spec  # noqa: F401  (train specs)
    from tiedmoe_titan.config import parse_recipe
    from tiedmoe_titan.preflight import model_args_of
    from tiedmoe_titan.models.flavor_file import write_flavor_file
    from tiedmoe_titan.models import FAMILIES
    from tiedmoe_titan.models.accounting import count_params, flops_per_token

    args = copy.deepcopy(FAMILIES["qwen3"][1]["regular"])
    for key, value in shape.items():
        setattr(args, key, dataclasses.replace(getattr(args, key), **value) if isinstance(value, dict) else value)
    write_flavor_file(args, out)
    spec, args = model_args_of(parse_recipe(recipe, ["--model.flavor", out, "--training.seq_len", str(seq_len)]))
    with torch.device("meta"):
        counts = count_params(spec.model_cls(args))
    flops = flops_per_token(counts, args.n_layers, args.n_heads, args.attention_flops_head_dims(), seq_len)
    return {"flavor_file": out, "tying": dataclasses.asdict(args.tying), "params": counts.as_dict(),
            "flops_per_token": flops}


def probe_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="gpu_check.py probe")
    sub = p.add_subparsers(dest="probe", required=True)
    sub.add_parser("env")
    flavor = sub.add_parser("flavor")
    flavor.add_argument("--shape", required=True, help="JSON: overrides of the qwen3 regular flavor")
    flavor.add_argument("--recipe", required=True)
    flavor.add_argument("--seq-len", type=int, required=True)
    flavor.add_argument("--out", required=True)
    a = p.parse_args(argv)
    result = probe_env() if a.probe == "env" else probe_flavor(json.loads(a.shape), a.recipe, a.seq_len, a.out)
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["probe"]:
        probe_main(argv[1:])
        return
    a = parse_args(argv)
    doc = check(a)
    print(f"\n{summary(doc)}\n\n{os.path.join(os.path.abspath(a.out), 'gpu_check.json')}: {doc['total_wall_s']} s in all")


if __name__ == "__main__":
    main()
