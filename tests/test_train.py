"""tiedmoe-train on the embedded default recipe, through torchtitan's trainer, on CPU."""

import re
import subprocess
import sys

RECIPE = "recipes/debug_cpu.toml"
LOSS = re.compile(r"step:\s*(\d+)\s.*?loss:\s*([0-9.]+)")


def run_train(tmp_path, *overrides):
    cmd = [
        sys.executable, "-m", "tiedmoe_titan.train", RECIPE,
        "--job.dump_folder", str(tmp_path), "--metrics.log_freq", "1", "--validation.no-enable",
        *overrides,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def test_debug_recipe_trains_and_loss_falls(tmp_path):
    log = run_train(
        tmp_path, "--training.steps", "16", "--training.seq_len", "64", "--training.local_batch_size", "4",
        "--lr_scheduler.warmup_steps", "2",
    )
    losses = [float(v) for _, v in LOSS.findall(re.sub(r"\x1b\[[0-9;]*m", "", log))]
    assert len(losses) == 16
    assert all(l == l and l < 20 for l in losses)  # finite
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5


def test_launcher_runs_two_processes_with_fsdp_and_expert_parallel(tmp_path):
    """launch/single_node.sh on CPU: the recipe's degrees ask for 2 processes."""
    cmd = [
        "launch/single_node.sh", RECIPE, "--job.dump_folder", str(tmp_path),
        "--parallelism.data_parallel_shard_degree", "2", "--parallelism.expert_parallel_degree", "2",
        "--training.steps", "8", "--training.seq_len", "64", "--training.local_batch_size", "4",
        "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1", "--validation.no-enable",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    log = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)
    assert "--nproc-per-node 2" in log
    losses = [float(v) for _, v in LOSS.findall(log)]
    assert len(losses) == 8  # logs of local rank 0 only
    assert losses[-1] < losses[0]
    assert (tmp_path / "recipe.resolved.toml").exists()


def test_a_step_adds_one_async_collective_and_one_host_read_to_torchtitans(tmp_path):
    """Per training step, with dp_shard=2: the stop flag's all-reduce is asynchronous
    and read a step later from host memory (no sync of its own), and the non-finite
    guard reads the gradient norm clipping computed (no collective of its own). That is
    one c10d op and one ``.item()`` more than torchtitan's own trainer, nothing else."""
    import json
    import os

    counts = {}
    for which in ("ours", "torchtitan"):
        out = tmp_path / f"{which}.json"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "tests/count_syncs.py", which, str(out), RECIPE, "--job.dump_folder", str(tmp_path / which),
            "--parallelism.data_parallel_shard_degree", "2", "--training.steps", "4", "--training.seq_len", "64",
            "--training.local_batch_size", "2", "--metrics.log_freq", "1000", "--validation.no-enable",
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr[-3000:]
        counts[which] = json.loads(out.read_text())
    for step in ("2", "3"):  # step 1 logs metrics; step 4 is the last (no stop check after it)
        ours, theirs = counts["ours"][step], counts["torchtitan"][step]
        extra = {op: ours.get(op, 0) - theirs.get(op, 0) for op in ours.keys() | theirs.keys()}
        assert {op: n for op, n in extra.items() if n} == {"c10d.allreduce_.default": 1, "aten._local_scalar_dense.default": 1}, (ours, theirs)
