"""What the SLURM tests share: whether SLURM can run here, and the settings of a test
cluster that every slurm.conf of theirs holds (tests/test_slurm.py: one node on
localhost; tests/two_hosts.py: two nodes in network namespaces)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

TOOLS = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")


def slurm_missing() -> str | None:
    """Why SLURM cannot run here (None: it can). Only a missing SLURM is a reason to skip."""
    if os.environ.get("TIEDMOE_NO_SLURM") == "1":
        return "TIEDMOE_NO_SLURM=1: SLURM declared unavailable on this machine"
    missing = [b for b in TOOLS if not shutil.which(b)]
    if missing:
        return f"slurm-wlm is not installed ({', '.join(missing)} missing; apt-get install slurm-wlm)"
    return None


def require_slurm(test: str) -> None:
    """Skip ``test`` (saying why) where SLURM is missing; in CI (``CI`` set) fail instead."""
    reason = slurm_missing()
    if reason:
        if os.environ.get("CI") and "TIEDMOE_NO_SLURM" not in reason:
            pytest.fail(f"{reason}: .ci/run must install it")
        print(f"SKIP {test}: {reason}")
        pytest.skip(reason)


def cluster_conf(folder: Path, name: str) -> list[str]:
    """slurm.conf lines of a root-run test cluster whose state, spool, pid and log files
    live in ``folder`` (``%n``: the node's name, for several slurmds). No accounting, no
    cgroups (linuxproc tracks the processes), no authentication; jobs may requeue, and the
    scheduler looks every second."""
    return [
        f"ClusterName={name}",
        "AuthType=auth/none",
        "CredType=cred/none",
        "AuthInfo=cred_expire=5",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "MpiDefault=none",
        "SlurmUser=root",
        "SlurmdUser=root",
        "JobRequeue=1",
        "SchedulerParameters=sched_interval=1,bf_interval=1",
        f"StateSaveLocation={folder}/state",
        f"SlurmdSpoolDir={folder}/spool-%n",
        f"SlurmctldPidFile={folder}/slurmctld.pid",
        f"SlurmdPidFile={folder}/slurmd-%n.pid",
        f"SlurmctldLogFile={folder}/slurmctld.log",
        f"SlurmdLogFile={folder}/slurmd-%n.log",
    ]
