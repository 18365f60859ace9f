"""``tiedmoe-train RECIPE.toml [--section.key value ...]``: train with torchtitan's Trainer.

The trainer is torchtitan's, with these additions:

* the routers' auxiliary losses join the training loss (torchtitan 0.2.2's loss
  function only sees logits and labels);
* preemption signals (SIGTERM, SIGUSR1) stop the run at the same step boundary on all
  ranks with a full checkpoint (``tiedmoe_titan.preemption``); under SLURM rank 0 then
  requeues the job once the save is complete, and the requeued job resumes from it;
* a run whose checkpoint folder already holds its last step says so and exits 0 (a
  rerun, or a requeue that lands after the end); a run with more ``training.steps``
  continues from the last full checkpoint (``checkpoint.plan_resume``);
* a step with a non-finite loss or gradient is skipped (``checkpoint.NonFiniteGuard``);
* ``checkpoint.create_seed_checkpoint`` saves step 0 and exits without training, as in
  torchtitan's own main (``TiedMoETrainer.save_seed_checkpoint``).

How the routing loss scales. torchtitan divides each microbatch's summed
cross-entropy by the number of valid tokens in the whole global batch (all
microbatches, all data-parallel ranks) and sums gradients over ranks. The routing
loss of a microbatch (aux_loss_coeff x mean-over-layers load-balancing loss +
z_loss_coeff x mean-over-layers z-loss, computed from that microbatch's routing on
that rank) is weighted by its share of those tokens. The step therefore optimises
the token-weighted mean over microbatches and ranks of the routing loss, which is the
plain mean when microbatches are equally full, whatever the gradient-accumulation
steps or data-parallel degree. The reported loss stays the cross-entropy alone
(the routing loss contributes its gradient, not its value), so perplexities compare
across recipes; routing losses are logged under ``moe/``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import warnings
from datetime import timedelta

import torch
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools.logging import init_logger, logger
from torchtitan.train import Trainer

from . import spec  # noqa: F401  (registers the train specs torchtitan's Trainer looks up)
from .checkpoint import (
    CheckpointMismatch,
    NonFiniteGuard,
    NonFiniteTraining,
    RngState,
    ScheduleState,
    check_compatible,
    finished_run,
    plan_resume,
    saved_ranks,
    set_aside,
    set_aside_incomplete,
)
from .config import RecipeError, parse_recipe, write_resolved_recipe
from .models.moe import loss_with_routing
from .preemption import StopAgreement, StopRequest
from .preflight import check_run

USAGE = "usage: tiedmoe-train RECIPE.toml [--section.key value ...]"

# Installed first thing in main(), so that a signal during start-up is not lost.
STOP_REQUEST = StopRequest()
# Test hooks. Hold the run after it has trained this step until a preemption signal
# arrives (at most HOLD_LIMIT_S; a run resumed from this step does not hold), so that a
# test's signal lands mid-run however fast the machine trains; and wait this many seconds
# before the preemption save (a save slower than SLURM's KillWait).
HOLD_AT_STEP_ENV = "TIEDMOE_TEST_HOLD_AT_STEP"
HOLD_LIMIT_S = 300
SAVE_DELAY_ENV = "TIEDMOE_TEST_PREEMPTION_SAVE_DELAY_S"


class TiedMoETrainer(Trainer):
    def __init__(self, job_config):
        super().__init__(job_config)
        self.cross_entropy_fn = self.loss_fn
        self.loss_fn = self.loss_with_routing
        STOP_REQUEST.install()
        self.stop_agreement = StopAgreement(STOP_REQUEST, self.device)
        self.nonfinite_guard = NonFiniteGuard(self.optimizers, self.model_parts, job_config.nan_guard.max_skipped_steps)
        self.resume_step = 0
        self.stopped_for_resume = False
        if job_config.checkpoint.enable:
            self.checkpointer.states[RngState.KEY] = RngState(torch.distributed.get_rank())
            self.checkpointer.states[ScheduleState.KEY] = ScheduleState(
                job_config.training.steps, job_config.lr_scheduler.total_steps
            )
            self._check_checkpoints()

    def _check_checkpoints(self) -> None:
        """Set interrupted saves and step folders this run would write into aside, and make
        sure the checkpoint to resume from fits the recipe's model, before torchtitan's
        loader touches it."""
        folder = self.checkpointer.folder
        rank0 = torch.distributed.get_rank() == 0
        if rank0:
            set_aside_incomplete(folder)
        torch.distributed.barrier()
        plan = plan_resume(folder, self.job_config.checkpoint.load_step)
        if rank0:
            for name, prefix, why in plan.set_aside:
                target = set_aside(folder, name, prefix)
                logger.warning(f"Checkpoint {name} is set aside as {target}: {why}; continuing from step-{plan.step}")
        torch.distributed.barrier()
        step = self.resume_step = plan.step
        checkpoint_dir = os.path.join(folder, f"step-{step}")
        if not os.path.isdir(checkpoint_dir):
            return
        check_compatible(checkpoint_dir, self.checkpointer.states["model"].state_dict())
        if step == 0:
            return  # a seed checkpoint: torchtitan loads step 0 as the model alone
        if not saved_ranks(checkpoint_dir, f"{ScheduleState.KEY}."):
            self.checkpointer.exclude_from_loading = [*self.checkpointer.exclude_from_loading, ScheduleState.KEY]
        if saved_ranks(checkpoint_dir, "dataloader.dp_rank_") and "dataloader" not in self.job_config.checkpoint.exclude_from_loading:
            raise CheckpointMismatch(
                f"step-{step} holds per-rank text-stream data positions (tiedmoe_titan before token shards), which the "
                "shard loader cannot continue: pass --checkpoint.exclude_from_loading dataloader to keep the model and "
                "optimizer and read the data from its start"
            )
        rng_ranks, world = saved_ranks(checkpoint_dir, f"{RngState.KEY}.rank_"), torch.distributed.get_world_size()
        if rng_ranks != world:
            logger.info(f"step-{step} holds the RNG states of {rng_ranks} ranks, this run has {world}: not restored")
            self.checkpointer.exclude_from_loading = [*self.checkpointer.exclude_from_loading, RngState.KEY]

    def save_seed_checkpoint(self) -> None:
        """Save step 0 instead of training (``checkpoint.create_seed_checkpoint``, which
        ``config.check_run`` allows from one process into a new checkpoint folder). In full and
        in DCP, whatever ``last_save_model_only`` / ``last_save_in_hf`` say about the end of
        training: a model-only save would be cast to ``export_dtype``, and ``plan_resume`` sets
        a model-only checkpoint aside as nothing to continue from. A run in this folder loads
        the model alone from step 0 (torchtitan's rule for seeds) and starts at step 1."""
        self.checkpointer.last_save_model_only = False
        self.checkpointer.last_save_in_hf = False
        self.checkpointer.save(curr_step=0, last_step=True)
        logger.info(f"Created the seed checkpoint {os.path.join(self.checkpointer.folder, 'step-0')}")

    def forward_backward_step(self, **kwargs) -> torch.Tensor:
        loss = super().forward_backward_step(**kwargs)
        self.nonfinite_guard.observe_loss(loss)
        return loss

    def train_step(self, data_iterator) -> None:
        with self.nonfinite_guard.watching_clip():
            super().train_step(data_iterator)
        # torchtitan lowers the collective timeout to comm.train_timeout_seconds after
        # step 1 only; a resumed run would keep the start-up timeout, and a dead peer
        # would hang it that long.
        if self.step > 1 and self.step == self.resume_step + 1:
            dist_utils.set_pg_timeouts(
                timeout=timedelta(seconds=self.job_config.comm.train_timeout_seconds), parallel_dims=self.parallel_dims
            )

    def should_continue_training(self) -> bool:
        if self.step > self.resume_step and self.step == int(os.environ.get(HOLD_AT_STEP_ENV, "-1")):
            logger.info(f"Holding after step {self.step} until a preemption signal ({HOLD_AT_STEP_ENV})")
            deadline = time.monotonic() + HOLD_LIMIT_S
            while STOP_REQUEST.signal is None and time.monotonic() < deadline:
                time.sleep(0.1)
        if self.step < self.job_config.training.steps and self.stop_agreement.any_rank_stopped():
            self._save_for_resume()
            return False
        return super().should_continue_training()

    def _save_for_resume(self) -> None:
        """Save the full state (whatever ``last_save_model_only`` says). Saving is
        synchronous and every rank has finished it after the barrier; ``main`` then
        requeues the job (``requeue_slurm_job``)."""
        if not self.job_config.checkpoint.enable:
            logger.warning("checkpoint.enable = false: stopping without a checkpoint, the run cannot resume")
        elif self.step == self.resume_step:
            logger.info(f"Stopped before training a step: step-{self.step} is already saved" if self.step else
                        "Stopped before training a step: nothing to save")
        else:
            begin = time.monotonic()
            time.sleep(float(os.environ.get(SAVE_DELAY_ENV, "0")))
            self.checkpointer.last_save_model_only = False
            self.checkpointer.save(self.step, last_step=True)
            logger.info(f"Saved a checkpoint for resumption at step {self.step} ({time.monotonic() - begin:.1f} s)")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        self.stopped_for_resume = True

    def loss_with_routing(self, pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        (model,) = self.model_parts
        return loss_with_routing(self.cross_entropy_fn(pred, labels), labels, model, self.model_args.routing)


def requeue_slurm_job() -> None:
    """Have SLURM requeue this job, which then resumes from the checkpoint just saved.
    Called by rank 0 as its last act, after every rank has saved. A requeue cancels
    the running job (SIGTERM, then SIGKILL after SLURM's KillWait), so under
    ``slurm/train.sbatch`` the trainer only leaves a marker file and the batch script
    requeues once every process of the step has exited; elsewhere it requeues here."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or os.environ.get("TIEDMOE_REQUEUE", "1") != "1":
        return
    marker = os.environ.get("TIEDMOE_REQUEUE_MARKER")
    if marker:
        with open(marker, "w") as f:
            f.write(f"{job}\n")
        print(f"tiedmoe-train: saved for resumption: {marker} asks the batch script to requeue job {job}", flush=True)
        return
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    print(f"tiedmoe-train: scontrol requeue {job}: {'done' if done.returncode == 0 else done.stderr.strip()}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """Outside torchrun, run as a world of one on this machine."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def main(argv: list[str] | None = None) -> None:
    STOP_REQUEST.install()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        raise SystemExit(USAGE)
    _single_process_env()
    # torchdata's loader calls an API torch deprecated; nothing a user can act on.
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
    init_logger()
    try:
        job_config = parse_recipe(argv[0], argv[1:])
        check_run(job_config, int(os.environ["WORLD_SIZE"]))
    except RecipeError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"tiedmoe-train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    checkpoint = job_config.checkpoint
    finished = checkpoint.enable and checkpoint.load_step == -1 and finished_run(
        os.path.join(job_config.job.dump_folder, checkpoint.folder), job_config.training.steps
    )
    if finished:
        if os.environ.get("RANK", "0") == "0":
            print(f"tiedmoe-train: {finished}", flush=True)
        return
    if os.environ.get("RANK", "0") == "0":
        path = write_resolved_recipe(job_config, job_config.job.dump_folder)
        logger.info(f"Seed {job_config.debug.seed}; resolved recipe saved to {path}")
    trainer = None
    requeue = False
    try:
        trainer = TiedMoETrainer(job_config)
        if checkpoint.create_seed_checkpoint:
            trainer.save_seed_checkpoint()
            return
        trainer.train()
        trainer.stop_agreement.close()
        requeue = trainer.stopped_for_resume and os.environ.get("RANK", "0") == "0"
    except (CheckpointMismatch, NonFiniteTraining) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"tiedmoe-train: error: {e}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, CheckpointMismatch) else 3) from None
    finally:
        if trainer is not None:
            trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    logger.info("Training finished")
    if requeue:
        requeue_slurm_job()


if __name__ == "__main__":
    main()
