"""``tiedmoe-launch RECIPE.toml [--section.key value ...]``: torchrun on this node.

Picks what a single-node run needs and passes the recipe through to ``tiedmoe-train``:

* processes: ``NPROC`` if set; else one per visible GPU; else (CPU) the world size the
  recipe's parallel degrees ask for (1 if they leave it free);
* rendezvous: ``--standalone`` (a free local port); for several nodes (``NNODES`` > 1,
  e.g. from ``slurm/train.sbatch``) c10d rendezvous at ``RDZV_ENDPOINT`` with
  ``RDZV_ID``;
* logs of local rank 0 only, and on CPU the cores split evenly between the processes
  (the cores this process may run on, e.g. a SLURM allocation, not the whole host).

The recipe gets the trainers' full check (``preflight.check_run``, at the world size this
launch gives) before torchrun starts: a mistake is one line, exit code 2, nothing written.

Preemption signals (SIGTERM, SIGUSR1) must reach the trainers, which stop at the next
step boundary with a full checkpoint, and torchrun must wait for them. torchrun itself
does neither: without SIGUSR1 in its ``--signals-to-handle`` it dies of it at once (exit
138) and leaves its workers behind; with it (or with its default SIGTERM handling) it
forwards the signal, gives the workers ``--shutdown-timeout`` (30 s) to exit, kills
them, and exits 1 even after a clean save. So this launcher stays torchrun's parent:

* torchrun runs with SIGTERM and SIGUSR1 ignored, and handles only SIGINT, SIGHUP and
  SIGQUIT (``TORCHELASTIC_SIGNALS_TO_HANDLE`` and ``PET_SIGNALS_TO_HANDLE``, read by
  torch 2.11 to 2.13), which the launcher passes on to it: it shuts the workers down
  as usual;
* a preemption signal the launcher receives goes to the trainers, torchrun's children
  (each in a session of its own, so no process group reaches them: they are found in
  /proc); they save and exit 0, and torchrun, which only watches them, exits 0 too;
* under SLURM, which signals every process of the step, the trainers get the signal
  directly as well; they act on the first and note the others.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch

from .config import RecipeError, parse_recipe
from .preflight import check_run

USAGE = "usage: tiedmoe-launch RECIPE.toml [--section.key value ...]"

# Stop the trainers at a step boundary with a checkpoint (tiedmoe_titan.train); torchrun ignores them.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# torchrun shuts its workers down on these, as it always does.
TORCHRUN_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def recipe_world_size(job_config) -> int:
    p = job_config.parallelism
    shard = p.data_parallel_shard_degree if p.data_parallel_shard_degree > 0 else 1
    return shard * p.data_parallel_replicate_degree * p.context_parallel_degree * p.tensor_parallel_degree * p.pipeline_parallel_degree


class LaunchError(ValueError):
    """A launch setting that cannot work; one line."""


def _count_from_env(env: dict[str, str], name: str) -> int | None:
    if name not in env:
        return None
    try:
        count = int(env[name])
    except ValueError:
        count = 0
    if count < 1:
        raise LaunchError(f"{name}={env[name]!r}: must be a whole number >= 1")
    return count


def nodes_and_processes(job_config, env: dict[str, str]) -> tuple[int, int]:
    """(nodes, processes per node) of this launch."""
    nnodes = _count_from_env(env, "NNODES") or 1
    nproc = _count_from_env(env, "NPROC")
    if nproc is None:
        nproc = torch.cuda.device_count() if torch.cuda.is_available() else max(recipe_world_size(job_config) // nnodes, 1)
    return nnodes, nproc


def torchrun_command(recipe: str, overrides: list[str], job_config, env: dict[str, str]) -> list[str]:
    nnodes, nproc = nodes_and_processes(job_config, env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--local-ranks-filter", "0"]
    if nnodes > 1:
        cmd += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", env["RDZV_ENDPOINT"], "--rdzv-id", env.get("RDZV_ID", "tiedmoe")]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "tiedmoe_titan.train", recipe, *overrides]


def torchrun_env(cmd: list[str], env: dict[str, str]) -> dict[str, str]:
    env = dict(env)
    handled = ",".join(sig.name for sig in TORCHRUN_SIGNALS)
    env["TORCHELASTIC_SIGNALS_TO_HANDLE"] = env["PET_SIGNALS_TO_HANDLE"] = handled
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in env:
        nproc = int(cmd[cmd.index("--nproc-per-node") + 1])
        env["OMP_NUM_THREADS"] = str(max(len(os.sched_getaffinity(0)) // nproc, 1))
    return env


def worker_pids(torchrun_pid: int) -> list[int]:
    """torchrun's children: the trainers (each in a session of its own, so that no
    process group reaches them all; hence /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            if parent == torchrun_pid:
                pids.append(int(entry))
    return pids


def run_torchrun(cmd: list[str], env: dict[str, str]) -> int:
    """Run torchrun as described in the module docstring; returns its exit code."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # inherited by torchrun (and its workers until they install their own)
    torchrun = subprocess.Popen(cmd, env=env, process_group=0)
    requested: list[int] = []

    def note(signum, frame):
        if not requested:
            print(f"tiedmoe-launch: {signal.Signals(signum).name}: passed to the trainers, which save and stop", flush=True)
        requested.append(signum)

    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, note)
    for sig in TORCHRUN_SIGNALS:
        signal.signal(sig, lambda signum, frame: torchrun.send_signal(signum))
    signalled: set[int] = set()
    while True:
        try:
            return torchrun.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        # Also trainers that start after the signal (torchrun still starting up) get it.
        for pid in set(worker_pids(torchrun.pid)) - signalled if requested else ():
            os.kill(pid, requested[0])
            signalled.add(pid)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        raise SystemExit(USAGE)
    # The trainers' own check, at the world size this launch gives, before torchrun starts.
    try:
        job_config = parse_recipe(argv[0], argv[1:])
        nnodes, nproc = nodes_and_processes(job_config, dict(os.environ))
        check_run(job_config, nnodes * nproc)
    except (RecipeError, LaunchError) as e:
        print(f"tiedmoe-launch: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    cmd = torchrun_command(argv[0], argv[1:], job_config, dict(os.environ))
    print("tiedmoe-launch: " + " ".join(cmd), flush=True)
    code = run_torchrun(cmd, torchrun_env(cmd, dict(os.environ)))
    # A process killed by a signal shows as -N here; a shell shows it as 128 + N.
    raise SystemExit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
