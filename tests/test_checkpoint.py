"""Checkpoints through tiedmoe-train: exact resume, interrupted saves, mismatched
layouts, non-finite steps."""

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import load_all

RECIPE = "recipes/debug_cpu.toml"
SMALL = [
    "--training.seq_len", "64", "--training.local_batch_size", "2", "--training.global_batch_size", "4",
    "--routing.expert_bias_rate", "0.001", "--metrics.log_freq", "1", "--validation.no-enable",
    "--checkpoint.enable", "--checkpoint.no-last-save-model-only", "--lr_scheduler.warmup_steps", "2",
]


def train(dump, *overrides, check=True):
    out = subprocess.run(
        [sys.executable, "-m", "tiedmoe_titan.train", RECIPE, "--job.dump_folder", str(dump), *SMALL, *overrides],
        capture_output=True, text=True, timeout=600,
    )
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def interrupted_train(dump, at_step: int, *overrides):
    """tiedmoe-train, sent SIGTERM once it has logged ``at_step``: it saves and exits 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tiedmoe_titan.train", RECIPE, "--job.dump_folder", str(dump), *SMALL, *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(rf"step:\s*{at_step}\s", re.sub(r"\x1b\[[0-9;]*m", "", line)):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=600) == 0, "".join(lines)[-3000:]
    return "".join(lines)


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path):
    """G=2, gradient accumulation 2, aux-loss-free expert bias: a run stopped by SIGTERM
    and resumed ends with every tensor (model, optimizer, expert bias) bit for bit equal
    to the uninterrupted run's, and logs the same losses. (Nothing in the resume path
    depends on G; tied G=2 is the case this project adds.)"""
    steps = ["--training.steps", "6", "--checkpoint.interval", "6", "--tying.group_size", "2"]
    straight = train(tmp_path / "straight", *steps)
    first = interrupted_train(tmp_path / "resumed", 2, *steps)
    saved = int(re.search(r"Saved a checkpoint for resumption at step (\d+)", first).group(1))
    assert 2 <= saved < 6
    second = train(tmp_path / "resumed", *steps)
    assert f"Training starts at step {saved + 1}" in second.stdout + second.stderr

    def losses(text):
        return dict(re.findall(r"step:\s*(\d+)\s+loss:\s*([0-9.]+)", re.sub(r"\x1b\[[0-9;]*m", "", text)))

    resumed = {**losses(first), **losses(second.stdout + second.stderr)}
    assert resumed == losses(straight.stdout + straight.stderr)
    a, b = load_all(tmp_path / "straight" / "checkpoint" / "step-6"), load_all(tmp_path / "resumed" / "checkpoint" / "step-6")
    assert a.keys() == b.keys()
    assert any("expert_bias" in k for k in a) and any("exp_avg_sq" in k for k in a) and "rng.rank_0.cpu" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_rng_state_round_trips_through_dcp(tmp_path):
    from tiedmoe_titan.checkpoint import RngState, saved_ranks

    torch.manual_seed(3)
    dcp.save({"rng": RngState(0)}, checkpoint_id=str(tmp_path), no_dist=True)
    expected = torch.rand(4)
    torch.manual_seed(5)
    dcp.load({"rng": RngState(0)}, checkpoint_id=str(tmp_path), no_dist=True)
    assert torch.equal(torch.rand(4), expected)
    assert saved_ranks(str(tmp_path), "rng.rank_") == 1


def test_interrupted_save_is_set_aside_and_previous_checkpoint_resumes(tmp_path):
    train(tmp_path, "--training.steps", "4", "--checkpoint.interval", "2")
    folder = tmp_path / "checkpoint"
    # What a kill during a save leaves: the folder without DCP's metadata (written last).
    os.remove(folder / "step-4" / ".metadata")
    out = train(tmp_path, "--training.steps", "5", "--checkpoint.interval", "1000")
    log = out.stdout + out.stderr
    assert "Checkpoint step-4 is incomplete" in log and "resuming from step-2" in log
    assert "Training starts at step 3" in log
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("step-")) == ["step-2", "step-5"]
    assert any(p.name.startswith("incomplete-4-") for p in folder.iterdir())


def test_kill_9_in_the_middle_of_a_save(tmp_path):
    """A real SIGKILL while DCP writes a checkpoint: the trainer is frozen (SIGSTOP) as
    soon as a step folder exists without its metadata, killed if the save is still
    unfinished (else let go until the next save), and the next start sets the partial
    folder aside and resumes from the previous complete checkpoint."""
    folder = tmp_path / "checkpoint"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tiedmoe_titan.train", RECIPE, "--job.dump_folder", str(tmp_path), *SMALL,
         "--training.steps", "40", "--checkpoint.interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    killed_at = None
    try:
        while killed_at is None and proc.poll() is None:
            for name in os.listdir(folder) if folder.is_dir() else ():
                step = int(name.split("-")[1])
                if step < 2 or (folder / name / ".metadata").exists():
                    continue
                proc.send_signal(signal.SIGSTOP)
                if (folder / name).is_dir() and not (folder / name / ".metadata").exists():
                    proc.kill()
                    killed_at = step
                    break
                proc.send_signal(signal.SIGCONT)
    finally:
        proc.kill()
        proc.wait()
    assert killed_at is not None, "no save was caught in flight"
    out = train(tmp_path, "--training.steps", str(killed_at + 1), "--checkpoint.interval", "1000")
    log = out.stdout + out.stderr
    assert f"Checkpoint step-{killed_at} is incomplete" in log and f"resuming from step-{killed_at - 1}" in log
    assert f"Training starts at step {killed_at}" in log
    assert any(p.name.startswith(f"incomplete-{killed_at}-") for p in folder.iterdir())


def as_old_data_position(step_dir) -> None:
    """Rewrite a checkpoint's data position as tiedmoe_titan saved it before token shards:
    torchtitan's per-rank loader states (dataloader.dp_rank_N, dataloader.world_size)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    state = {k: torch.empty(md.size, dtype=md.properties.dtype) if hasattr(md, "size") else None for k, md in metadata.items()}
    dcp.load(state, checkpoint_id=str(step_dir), no_dist=True)
    state = {k: v for k, v in state.items() if not k.startswith("dataloader.")}
    state.update({"dataloader.dp_rank_0": b"old text-stream position", "dataloader.world_size": 1})
    shutil.rmtree(step_dir)
    dcp.save(state, checkpoint_id=str(step_dir), no_dist=True)


def test_resume_refusals_are_one_clear_line(tmp_path):
    """Another tie layout, or a data position from before token shards: one line, exit 2;
    the old data position can be left out with checkpoint.exclude_from_loading."""
    train(tmp_path, "--training.steps", "2", "--checkpoint.interval", "2")
    out = train(tmp_path, "--training.steps", "4", "--tying.bank_expansion", "2", check=False)
    assert out.returncode == 2
    assert "tiedmoe-train: error: the bank of layers.2 (w1) has 8 experts in step-2, 16 in the recipe" in out.stderr
    out = train(tmp_path, "--training.steps", "4", "--tying.group_size", "3", "--tying.untied_first", "1", "--tying.untied_last", "1", check=False)
    assert out.returncode == 2 and "tie layout" in out.stderr.splitlines()[-1]

    as_old_data_position(tmp_path / "checkpoint" / "step-2")
    out = train(tmp_path, "--training.steps", "3", check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.splitlines()[-1] == (
        "tiedmoe-train: error: step-2 holds per-rank text-stream data positions (tiedmoe_titan before token shards), "
        "which the shard loader cannot continue: pass --checkpoint.exclude_from_loading dataloader to keep the model "
        "and optimizer and read the data from its start"
    )
    out = train(tmp_path, "--training.steps", "3", "--checkpoint.exclude_from_loading", "dataloader")
    assert "Training starts at step 3" in out.stdout + out.stderr


def test_non_finite_loss_stops_without_saving(tmp_path):
    train(tmp_path, "--training.steps", "2", "--checkpoint.interval", "2")
    # The resumed process's cross-entropy is NaN at every step (a recipe cannot ask for
    # that: a NaN loss weight is refused before the run starts).
    nan_loss = (
        "import runpy, sys, torch.nn.functional as F\n"
        "ce = F.cross_entropy\n"
        "F.cross_entropy = lambda *a, **k: ce(*a, **k) * float('nan')\n"
        "sys.argv[0] = 'tiedmoe-train'\n"
        "runpy.run_module('tiedmoe_titan.train', run_name='__main__')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", nan_loss, RECIPE, "--job.dump_folder", str(tmp_path), *SMALL,
         "--training.steps", "8", "--checkpoint.interval", "1", "--nan_guard.max_skipped_steps", "1"],
        capture_output=True, text=True, timeout=600,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 3, log[-2000:]
    assert "step skipped (1 of at most 1)" in log
    assert "non-finite loss or gradient in 2 step(s)" in out.stderr
    # Step 3 was skipped (weights unchanged, saved as step-3); step 4 stopped the run unsaved.
    saved = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert saved == ["step-2", "step-3"]
    before, after = load_all(tmp_path / "checkpoint" / "step-2"), load_all(tmp_path / "checkpoint" / "step-3")
    for key, value in before.items():
        if not key.startswith(("optimizer", "lr_scheduler", "train_state", "rng", "schedule")):
            # Token counts included: the skipped step's counts are dropped, not carried into the next.
            assert torch.equal(value, after[key]), key
            assert not value.is_floating_point() or torch.isfinite(value).all()


def logged_losses(text: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"step:\s*(\d+)\s+loss:\s*([0-9.]+)", re.sub(r"\x1b\[[0-9;]*m", "", text))}


def test_fsdp_run_resumes_bit_identical_and_on_one_process(tmp_path):
    """Under torchrun with dp_shard=2 and EP=2 (tied G=2; FSDP shards the rest): the
    signal reaches one process group, both ranks stop at the same step, and the resumed
    sharded state equals the uninterrupted one bit for bit.

    The uninterrupted run's step-4 checkpoint is then resumed by 1 process (gradient
    accumulation over 4 micro-batches) at the same global batch size: DCP reshards model
    and optimizer, the data position is one global sample count, so both layouts read the
    same samples at every step, and the losses go on as in the uninterrupted run up to the
    order of floating-point sums. (Any other data-parallel size: tests/test_data.py.)"""
    layout = ["--training.global_batch_size", "8", "--training.steps", "8", "--checkpoint.interval", "4"]
    two = ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.expert_parallel_degree", "2"]

    def launch(dump, *overrides, stop_at=None, nproc=2):
        proc = subprocess.Popen(
            ["launch/single_node.sh", RECIPE, "--job.dump_folder", str(dump), *SMALL, *layout, *overrides],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "NPROC": str(nproc)},
        )
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if stop_at and re.search(rf"step:\s*{stop_at}\s", re.sub(r"\x1b\[[0-9;]*m", "", line)):
                proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
        assert proc.wait(timeout=600) == 0, "".join(lines)[-3000:]
        return "".join(lines)

    straight = launch(tmp_path / "straight", *two)
    assert "Training finished" in straight, straight[-3000:]
    first = launch(tmp_path / "resumed", *two, stop_at=2)
    saved = int(re.search(r"Saved a checkpoint for resumption at step (\d+)", first).group(1))
    assert 2 <= saved < 8  # ranks agree a step after the signal: margin for a fast machine
    second = launch(tmp_path / "resumed", *two)
    assert f"Training starts at step {saved + 1}" in second and "Training finished" in second
    a, b = load_all(tmp_path / "straight" / "checkpoint" / "step-8"), load_all(tmp_path / "resumed" / "checkpoint" / "step-8")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    shutil.copytree(tmp_path / "straight" / "checkpoint" / "step-4", tmp_path / "one" / "checkpoint" / "step-4")
    log = launch(tmp_path / "one", "--parallelism.data_parallel_shard_degree", "1", nproc=1)
    assert "Training starts at step 5" in log and "data position" not in log  # nothing to warn about
    resumed, reference = logged_losses(log), logged_losses(straight)
    assert sorted(resumed) == [5, 6, 7, 8] and sorted(reference) == list(range(1, 9))
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], rel=1e-5), (step, resumed, reference)


def test_rerun_and_extension_of_a_finished_run(tmp_path):
    """A finished run rerun says so in one line, exits 0 and writes nothing (also with
    fewer steps). The recipes' final save is a full checkpoint: 4 steps then extended to
    6 equals 6 straight, with the schedule fixed by lr_scheduler.total_steps; without it,
    the changed schedule is said in one line."""
    fixed = ["--lr_scheduler.total_steps", "6", "--checkpoint.interval", "1000"]
    straight = train(tmp_path / "straight", "--training.steps", "6", *fixed)
    train(tmp_path / "extended", "--training.steps", "4", *fixed)
    before = sorted(p.name for p in (tmp_path / "extended" / "checkpoint").iterdir())
    out = train(tmp_path / "extended", "--training.steps", "4", *fixed)
    assert out.stdout.strip().splitlines() == [
        f"tiedmoe-train: {tmp_path}/extended/checkpoint/step-4 is at training.steps = 4: the run is finished, nothing to "
        "train (raise --training.steps to extend it)"
    ]
    out = train(tmp_path / "extended", "--training.steps", "3", *fixed)
    assert "step-4 is past training.steps = 3" in out.stdout
    assert sorted(p.name for p in (tmp_path / "extended" / "checkpoint").iterdir()) == before

    out = train(tmp_path / "extended", "--training.steps", "6", *fixed)
    log = out.stdout + out.stderr
    assert "Training starts at step 5" in log and "LR schedule" not in log
    assert {**logged_losses(log)} == {s: l for s, l in logged_losses(straight.stdout + straight.stderr).items() if s > 4}
    a, b = load_all(tmp_path / "straight" / "checkpoint" / "step-6"), load_all(tmp_path / "extended" / "checkpoint" / "step-6")
    for key in a:
        assert torch.equal(a[key], b[key]), key

    out = train(tmp_path / "extended", "--training.steps", "8", "--checkpoint.interval", "1000")
    assert ("training.steps is 8, the checkpoint was trained toward 6: the LR schedule (warmup clamped to the total, "
            "decay to the last step) now follows 8 steps") in out.stdout + out.stderr


def test_extending_past_a_model_only_final_save_sets_it_aside(tmp_path):
    """With torchtitan's model-only final save, the extension continues from the last
    full checkpoint and never writes into the model-only folder."""
    model_only = ["--checkpoint.interval", "2", "--checkpoint.last-save-model-only"]
    train(tmp_path, "--training.steps", "3", *model_only)
    folder = tmp_path / "checkpoint"
    metadata = (folder / "step-3" / ".metadata").read_bytes()
    out = train(tmp_path, "--training.steps", "4", *model_only)
    log = out.stdout + out.stderr
    assert "Checkpoint step-3 is set aside as" in log and "it holds only the model" in log and "continuing from step-2" in log
    assert "Training starts at step 3" in log
    aside = [p for p in folder.iterdir() if p.name.startswith("model-only-3-")]
    assert len(aside) == 1 and (aside[0] / ".metadata").read_bytes() == metadata
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("step-")) == ["step-2", "step-4"]

    shutil.rmtree(folder / "step-2")  # only the model-only save left
    out = train(tmp_path, "--training.steps", "6", *model_only, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(f"tiedmoe-train: error: {folder}/step-4 holds only the model and there is no full checkpoint")


def test_sigusr1_to_the_launcher_reaches_the_trainers_and_torchrun_waits(tmp_path):
    """torchrun alone dies of SIGUSR1 (exit 138) and leaves its trainers running;
    through tiedmoe-launch both ranks save and everything exits 0."""
    proc = subprocess.Popen(
        ["launch/single_node.sh", RECIPE, "--job.dump_folder", str(tmp_path), *SMALL,
         "--parallelism.data_parallel_shard_degree", "2", "--training.global_batch_size", "8",
         "--training.steps", "40", "--checkpoint.interval", "1000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TIEDMOE_TEST_PREEMPTION_SAVE_DELAY_S": "2"},
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(r"step:\s*2\s", re.sub(r"\x1b\[[0-9;]*m", "", line)):
            proc.send_signal(signal.SIGUSR1)
    log = "".join(lines)
    assert proc.wait(timeout=120) == 0, log[-3000:]
    saved = int(re.search(r"Saved a checkpoint for resumption at step (\d+)", log).group(1))
    assert 2 <= saved < 40
    assert (tmp_path / "checkpoint" / f"step-{saved}" / ".metadata").exists()
    assert saved_ranks_of(tmp_path / "checkpoint" / f"step-{saved}") == 2


def saved_ranks_of(checkpoint_dir) -> int:
    from tiedmoe_titan.checkpoint import saved_ranks

    return saved_ranks(str(checkpoint_dir), "rng.rank_")


def test_seed_checkpoint_is_step_0_and_runs_start_from_its_weights(tmp_path):
    """checkpoint.create_seed_checkpoint saves the initialisation as a complete step-0
    checkpoint and exits 0 without training. Made with debug.seed 1, it is what a run in
    that folder starts from at step 1, although seeded 0: step 1's loss is that of a fresh
    run seeded 1 (it depends on the initial weights alone; the data order does not depend
    on debug.seed). (A run elsewhere reads it through checkpoint.initial_load_path, as it
    reads an import's model: tests/test_hf.py.)"""
    one_step = ["--training.steps", "1", "--checkpoint.interval", "1000"]
    out = train(tmp_path / "seeded", "--checkpoint.create_seed_checkpoint", "--debug.seed", "1", *one_step)
    log = out.stdout + out.stderr
    folder = tmp_path / "seeded" / "checkpoint"
    assert "Training starts" not in log and not logged_losses(log)
    assert [p.name for p in folder.iterdir()] == ["step-0"] and (folder / "step-0" / ".metadata").exists()

    out = train(tmp_path / "fresh", "--debug.seed", "1", *one_step)
    fresh = logged_losses(out.stdout + out.stderr)
    assert list(fresh) == [1]
    out = train(tmp_path / "seeded", *one_step)
    log = out.stdout + out.stderr
    assert f"Loading the checkpoint from {folder}/step-0" in log and "Training starts at step 1" in log
    assert logged_losses(log) == fresh


def test_seed_checkpoint_refusals_are_one_line(tmp_path):
    """One process, checkpointing on, nothing to load, a new checkpoint folder; through
    tiedmoe-train a refusal is one line, exit 2, before anything is written."""
    from tiedmoe_titan.config import RecipeError, parse_recipe
    from tiedmoe_titan.preflight import check_run

    def refusal(*overrides, world_size=1, dump=tmp_path) -> str:
        recipe = parse_recipe(RECIPE, [*SMALL, "--job.dump_folder", str(dump), "--checkpoint.create_seed_checkpoint", *overrides])
        with pytest.raises(RecipeError) as error:
            check_run(recipe, world_size)
        return str(error.value)

    assert refusal(world_size=2).startswith("checkpoint.create_seed_checkpoint runs as 1 process, not 2")
    assert refusal("--checkpoint.initial_load_path", str(tmp_path)).startswith(
        "checkpoint.create_seed_checkpoint saves the recipe's fresh initialisation and loads nothing")
    (tmp_path / "used" / "checkpoint" / "step-3").mkdir(parents=True)
    (tmp_path / "used" / "checkpoint" / "step-3" / ".metadata").touch()
    assert refusal(dump=tmp_path / "used") == (
        f"checkpoint.create_seed_checkpoint: {tmp_path}/used/checkpoint already holds step-3; a seed starts a new "
        "checkpoint folder: choose another job.dump_folder")

    out = train(tmp_path / "off", "--checkpoint.create_seed_checkpoint", "--checkpoint.no-enable", check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "tiedmoe-train: error: checkpoint.create_seed_checkpoint needs checkpoint.enable = true (--checkpoint.enable): "
        "the checkpointer saves the seed"
    ]
    assert not (tmp_path / "off").exists()
