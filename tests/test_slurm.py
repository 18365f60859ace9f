"""slurm/train.sbatch on a real single-node SLURM (slurmctld + slurmd on localhost).

The job trains the debug recipe on CPU; mid-run the test sends the preemption signal
to the batch shell (`scancel --signal=USR1 --batch`), as `--signal=B:USR1@...` would.
The job must save a checkpoint, requeue itself, resume from that checkpoint and finish
with the state of an uninterrupted run. The save is made slower than SLURM's KillWait
(a test-only delay): a torchrun that died of the signal, or exited before its trainers,
would end the step and get the save killed. The job holds after step 3 until the signal
comes (a test hook): a machine that trains faster than the signal travels would
otherwise finish first.

Needs Debian's slurm-wlm (`.ci/run` installs it). Set TIEDMOE_NO_SLURM=1 to skip where
SLURM cannot run; the skip prints why.
"""

import os
import re
import socket
import subprocess
import time

import pytest
import torch
from conftest import load_all
from slurm_cluster import cluster_conf, require_slurm

RECIPE = "recipes/debug_cpu.toml"
KILL_WAIT_S = 5  # > the seconds a trainer takes to exit after it requeued the job
SAVE_DELAY_S = 2 * KILL_WAIT_S


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    require_slurm("test_slurm")
    d = tmp_path_factory.mktemp("slurm")
    (d / "state").mkdir()
    cpus = os.cpu_count() or 2
    conf = d / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                *cluster_conf(d, "tiedmoe"),
                "SlurmctldHost=localhost",
                f"SlurmctldPort={free_port()}",
                f"SlurmdPort={free_port()}",
                "ReturnToService=2",
                f"KillWait={KILL_WAIT_S}",
                "JobCompType=jobcomp/filetxt",
                f"JobCompLoc={d}/jobcomp.txt",
                f"NodeName=localhost CPUs={cpus} State=UNKNOWN",
                "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
            ]
        )
        + "\n"
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [
        subprocess.Popen(["slurmctld", "-D", "-i"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT),
        subprocess.Popen(["slurmd", "-D", "-N", "localhost"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT),
    ]
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "idle*"):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"SLURM did not come up: {(d / 'slurmctld.log').read_text()[-2000:]}")
        yield env, d
    finally:
        for p in daemons:
            p.terminate()
        for p in daemons:
            p.wait(timeout=30)


def job_field(env, job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else ""


def wait_for(predicate, timeout: float, what: str, log=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    tail = f"; the job's output ends:\n{log.read_text()[-3000:]}" if log and log.exists() else ""
    pytest.fail(f"timed out waiting for {what}{tail}")


def losses(text: str) -> dict[int, str]:
    return {int(step): loss for step, loss in re.findall(r"step:\s*(\d+)\s+loss:\s*([0-9.]+)", text)}


def test_preempted_job_saves_slower_than_killwait_requeues_and_resumes_exactly(slurm, tmp_path):
    env, d = slurm
    log = tmp_path / "job.out"
    steps = 10
    overrides = [
        "--training.steps", str(steps), "--training.seq_len", "64", "--training.local_batch_size", "4",
        "--metrics.log_freq", "1", "--validation.no-enable", "--checkpoint.enable", "--checkpoint.interval", "1000",
    ]
    # One thread each: the two runs share the 2 cores without spinning on each other's.
    env = {**env, "OMP_NUM_THREADS": "1"}
    straight = subprocess.Popen(
        ["python3", "-m", "tiedmoe_titan.train", RECIPE, "--job.dump_folder", str(tmp_path / "straight"), *overrides],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    hooks = {"TIEDMOE_TEST_HOLD_AT_STEP": "3", "TIEDMOE_TEST_PREEMPTION_SAVE_DELAY_S": str(SAVE_DELAY_S)}
    submit = subprocess.run(
        ["sbatch", "--parsable", f"--output={log}", "--nodes=1", "slurm/train.sbatch", RECIPE,
         "--job.dump_folder", str(tmp_path / "run"), *overrides],
        env={**env, **hooks}, capture_output=True, text=True, check=True,
    )
    job = submit.stdout.strip().split(";")[0]

    def holding():
        return log.exists() and "Holding after step 3" in log.read_text()

    wait_for(holding, 180, "the job to train 3 steps", log)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    wait_for(lambda: job_field(env, job, "Restarts") not in ("", "0"), 180, "the job to requeue", log)
    wait_for(lambda: job_field(env, job, "JobState") == "COMPLETED", 300, "the requeued job to finish", log)
    straight_log = straight.communicate(timeout=300)[0]
    assert straight.returncode == 0, straight_log[-3000:]

    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text())
    saved = re.search(r"Saved a checkpoint for resumption at step (\d+) \(([0-9.]+) s\)", text)
    assert saved, text[-3000:]
    step, save_s = int(saved.group(1)), float(saved.group(2))
    print(f"preemption save took {save_s:.1f} s (KillWait {KILL_WAIT_S} s) at step {step}")
    assert step == 3 and save_s > KILL_WAIT_S
    assert "the trainers saved for resumption: scontrol requeue" in text and "restart 1" in text
    assert f"Loading the checkpoint from {tmp_path}/run/checkpoint/step-{step}" in text
    assert f"Training starts at step {step + 1}" in text
    assert losses(text) == losses(re.sub(r"\x1b\[[0-9;]*m", "", straight_log))
    a, b = load_all(tmp_path / "straight" / "checkpoint" / f"step-{steps}"), load_all(tmp_path / "run" / "checkpoint" / f"step-{steps}")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # What accounting shows (sacct reads the same states): the preempted run REQUEUED, then COMPLETED 0:0.
    assert job_field(env, job, "ExitCode") == "0:0"
    runs = re.findall(rf"JobId={job} .*?JobState=(\S+).*?DerivedExitCode=(\S+) ExitCode=(\S+)", (d / "jobcomp.txt").read_text())
    print(f"jobcomp records of job {job} (state, derived exit code, exit code): {runs}")
    assert runs[-1] == ("COMPLETED", "0:0", "0:0")
