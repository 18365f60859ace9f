"""Checkpoints through tiedmoe-train: exact resume, interrupted saves, mismatched
layouts, non-finite steps."""

import json
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


@pytest.mark.parametrize("group_size", ["1", "2"])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, group_size):
    """G=1 and G=2, gradient accumulation 2, aux-loss-free expert bias: a run stopped by
    SIGTERM and resumed ends with every tensor (model, optimizer, expert bias) bit for
    bit equal to the uninterrupted run's, and logs the same losses."""
    steps = ["--training.steps", "6", "--checkpoint.interval", "6", "--tying.group_size", group_size]
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


def test_resume_with_another_tie_layout_is_one_clear_line(tmp_path):
    train(tmp_path, "--training.steps", "2", "--checkpoint.interval", "2")
    out = train(tmp_path, "--training.steps", "4", "--tying.bank_expansion", "2", check=False)
    assert out.returncode == 2
    assert "tiedmoe-train: error: the bank of layers.2 (w1) has 8 experts in step-2, 16 in the recipe" in out.stderr
    out = train(tmp_path, "--training.steps", "4", "--tying.group_size", "3", "--tying.untied_first", "1", "--tying.untied_last", "1", check=False)
    assert out.returncode == 2 and "tie layout" in out.stderr.splitlines()[-1]


def test_non_finite_loss_stops_without_saving(tmp_path):
    train(tmp_path, "--training.steps", "2", "--checkpoint.interval", "2")
    # A NaN routing-loss weight makes every loss NaN from here on.
    out = train(tmp_path, "--training.steps", "8", "--checkpoint.interval", "1", "--routing.aux_loss_coeff", "nan", "--nan_guard.max_skipped_steps", "1", check=False)
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


@pytest.mark.parametrize("ep", ["1", "2"])
def test_interrupted_and_resumed_fsdp_run_is_bit_identical(tmp_path, ep):
    """The same under torchrun with dp_shard=2, with and without EP=2 (tied G=2): the
    signal reaches one process group, both ranks stop at the same step, and the
    resumed sharded state equals the uninterrupted one bit for bit."""
    layout = ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.expert_parallel_degree", ep,
              "--training.global_batch_size", "8", "--training.steps", "8", "--checkpoint.interval", "8"]

    def launch(dump, stop_at=None):
        proc = subprocess.Popen(
            ["launch/single_node.sh", RECIPE, "--job.dump_folder", str(dump), *SMALL, *layout],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if stop_at and re.search(rf"step:\s*{stop_at}\s", re.sub(r"\x1b\[[0-9;]*m", "", line)):
                proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
        proc.wait(timeout=600)
        return "".join(lines)

    straight = launch(tmp_path / "straight")
    assert "Training finished" in straight, straight[-3000:]
    first = launch(tmp_path / "resumed", stop_at=2)
    saved = int(re.search(r"Saved a checkpoint for resumption at step (\d+)", first).group(1))
    assert 2 <= saved < 8  # ranks agree a step after the signal: margin for a fast machine
    second = launch(tmp_path / "resumed")
    assert f"Training starts at step {saved + 1}" in second and "Training finished" in second
    a, b = load_all(tmp_path / "straight" / "checkpoint" / "step-8"), load_all(tmp_path / "resumed" / "checkpoint" / "step-8")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def repeated_document_corpus(path) -> int:
    """A corpus whose every sample is the same sequence, whatever the rank or position:
    identical documents, ``seq_len + 1`` a multiple of their token count. Returns seq_len."""
    from tiedmoe_titan.tokenizer import DEFAULT_TOKENIZER_PATH, SentencePieceTokenizer

    text = "Return the number of items in a container, or raise an error if it has no length."
    tokens = len(SentencePieceTokenizer(DEFAULT_TOKENIZER_PATH).encode(text, add_bos=True, add_eos=True))
    path.write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(64)))
    return tokens * max(1, round(65 / tokens)) - 1


def logged_losses(text: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"step:\s*(\d+)\s+loss:\s*([0-9.]+)", re.sub(r"\x1b\[[0-9;]*m", "", text))}


def test_resharded_resume_continues_the_loss(tmp_path):
    """Saved by 2 processes (dp_shard=2, EP=2), resumed by 4 (dp_shard=4, EP=1) and by 1:
    DCP reshards model and optimizer, the data position carries over at the same global
    sample count, and the losses go on as in the uninterrupted run (fp tolerance). The
    data is made layout-independent (every sample the same sequence) so the losses of
    different layouts can be compared step by step."""
    corpus = tmp_path / "repeated.jsonl"
    seq_len = repeated_document_corpus(corpus)
    common = ["--training.dataset_path", str(corpus), "--training.seq_len", str(seq_len),
              "--training.global_batch_size", "8", "--training.steps", "8", "--checkpoint.interval", "4",
              "--optimizer.lr", "1e-4"]

    def launch(dump, nproc, *layout):
        out = subprocess.run(
            ["launch/single_node.sh", RECIPE, "--job.dump_folder", str(dump), *SMALL, *common, *layout],
            capture_output=True, text=True, timeout=600, env={**os.environ, "NPROC": str(nproc)},
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout + out.stderr

    straight = logged_losses(launch(tmp_path / "two", 2, "--parallelism.data_parallel_shard_degree", "2",
                                    "--parallelism.expert_parallel_degree", "2"))
    assert sorted(straight) == list(range(1, 9))
    for nproc in (4, 1):
        resumed_dir = tmp_path / f"resumed-{nproc}" / "checkpoint"
        shutil.copytree(tmp_path / "two" / "checkpoint" / "step-4", resumed_dir / "step-4")
        log = launch(tmp_path / f"resumed-{nproc}", nproc, "--parallelism.data_parallel_shard_degree", str(nproc))
        assert "Training starts at step 5" in log
        assert f"data position saved by 2 data-parallel ranks, resumed by {nproc}" in log
        resumed = logged_losses(log)
        assert sorted(resumed) == [5, 6, 7, 8]
        for step, loss in resumed.items():
            assert loss == pytest.approx(straight[step], rel=1e-4), (nproc, step, resumed, straight)


def test_rerun_of_a_finished_run_says_so_in_one_line_and_exits_0(tmp_path):
    train(tmp_path, "--training.steps", "4", "--checkpoint.interval", "2")
    before = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    out = train(tmp_path, "--training.steps", "4", "--checkpoint.interval", "2")
    assert out.stdout.strip().splitlines() == [
        f"tiedmoe-train: {tmp_path}/checkpoint/step-4 is at training.steps = 4: the run is finished, nothing to train "
        "(raise --training.steps to extend it)"
    ]
    out = train(tmp_path, "--training.steps", "3", "--checkpoint.interval", "2")
    assert "step-4 is past training.steps = 3" in out.stdout
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == before


def test_extended_run_continues_exactly_from_its_final_checkpoint(tmp_path):
    """The recipes' final save is a full checkpoint: 4 steps then extended to 6 equals 6
    straight, with the schedule fixed by lr_scheduler.total_steps; without it, the
    changed schedule is said in one line."""
    fixed = ["--lr_scheduler.total_steps", "6", "--checkpoint.interval", "1000"]
    straight = train(tmp_path / "straight", "--training.steps", "6", *fixed)
    train(tmp_path / "extended", "--training.steps", "4", *fixed)
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
