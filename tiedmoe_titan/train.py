"""``tiedmoe-train RECIPE.toml [--section.key value ...]``: train with torchtitan's Trainer.

The trainer is torchtitan's, with two additions: the routers' auxiliary losses join
the training loss (torchtitan 0.2.2's loss function only sees logits and labels), and
preemption signals (SIGTERM, SIGUSR1) stop the run at the next step boundary on all
ranks together with a full checkpoint; under SLURM rank 0 then requeues the job, and
the requeued job resumes from that checkpoint (torchtitan loads the latest one).

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
import signal
import socket
import subprocess
import sys
import warnings

import torch
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.tools.logging import init_logger, logger
from torchtitan.train import Trainer

import tiedmoe_titan  # noqa: F401  (CPU support, train specs)

from .checkpoint import (
    CheckpointMismatch,
    NonFiniteGuard,
    NonFiniteTraining,
    RngState,
    check_compatible,
    complete_steps,
    saved_ranks,
    set_aside_incomplete,
)
from .config import RecipeError, check_run, parse_recipe, write_resolved_recipe
from .models.moe import model_routing_loss

USAGE = "usage: tiedmoe-train RECIPE.toml [--section.key value ...]"


# SLURM sends SIGUSR1 ahead of a preemption or time limit (slurm/train.sbatch), a
# scheduler or a user SIGTERM.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TiedMoETrainer(Trainer):
    def __init__(self, job_config):
        super().__init__(job_config)
        self.cross_entropy_fn = self.loss_fn
        self.loss_fn = self.loss_with_routing
        self.stop_signal: int | None = None
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._request_stop)
        self.nonfinite_guard = NonFiniteGuard(self.optimizers, self.model_parts, job_config.nan_guard.max_skipped_steps)
        if job_config.checkpoint.enable:
            self.checkpointer.states[RngState.KEY] = RngState(torch.distributed.get_rank())
            self._check_checkpoints()

    def _check_checkpoints(self) -> None:
        """Set interrupted saves aside and make sure the checkpoint to resume from fits
        the recipe's model, before torchtitan's loader touches it."""
        folder = self.checkpointer.folder
        if torch.distributed.get_rank() == 0:
            set_aside_incomplete(folder)
        torch.distributed.barrier()
        steps = complete_steps(folder)
        load_step = self.job_config.checkpoint.load_step
        step = steps[-1] if load_step == -1 and steps else load_step
        if step > 0 and os.path.isdir(os.path.join(folder, f"step-{step}")):
            checkpoint_dir = os.path.join(folder, f"step-{step}")
            check_compatible(checkpoint_dir, self.checkpointer.states["model"].state_dict())
            data_ranks = saved_ranks(checkpoint_dir, "dataloader.dp_rank_")
            if data_ranks and "dataloader" not in self.job_config.checkpoint.exclude_from_loading:
                try:
                    self.dataloader.resume_from_ranks(data_ranks)
                except ValueError as e:
                    raise CheckpointMismatch(f"step-{step}: {e}") from None
            rng_ranks, world = saved_ranks(checkpoint_dir, f"{RngState.KEY}.rank_"), torch.distributed.get_world_size()
            if rng_ranks != world:
                logger.info(f"step-{step} holds the RNG states of {rng_ranks} ranks, this run has {world}: not restored")
                self.checkpointer.exclude_from_loading = [*self.checkpointer.exclude_from_loading, RngState.KEY]

    def forward_backward_step(self, **kwargs) -> torch.Tensor:
        loss = super().forward_backward_step(**kwargs)
        self.nonfinite_guard.observe_loss(loss)
        return loss

    def _request_stop(self, signum, frame) -> None:
        # Only a flag: the step (or a checkpoint save) under way runs to completion, and
        # a second signal changes nothing.
        if self.stop_signal is None:
            self.stop_signal = signum
            logger.warning(f"{signal.Signals(signum).name}: stopping at the next step boundary with a checkpoint")

    def _all_ranks_stop(self) -> bool:
        """Whether any rank was signalled; every rank learns it at the same step."""
        flag = torch.tensor([0 if self.stop_signal is None else 1], device=self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def should_continue_training(self) -> bool:
        if self.step < self.job_config.training.steps and self._all_ranks_stop():
            self._save_for_resume()
            return False
        return super().should_continue_training()

    def _save_for_resume(self) -> None:
        """Save the full state (torchtitan's last-step save keeps only the model by
        default), then ask SLURM to requeue the job, which resumes from it."""
        if not self.job_config.checkpoint.enable:
            logger.warning("checkpoint.enable = false: stopping without a checkpoint, the run cannot resume")
        else:
            self.checkpointer.last_save_model_only = False
            self.checkpointer.save(self.step, last_step=True)
            logger.info(f"Saved a checkpoint for resumption at step {self.step}")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if torch.distributed.get_rank() == 0 and os.environ.get("SLURM_JOB_ID") and os.environ.get("TIEDMOE_REQUEUE", "1") == "1":
            job = os.environ["SLURM_JOB_ID"]
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            logger.info(f"scontrol requeue {job}: {'done' if done.returncode == 0 else done.stderr.strip()}")

    def loss_with_routing(self, pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss_sum = self.cross_entropy_fn(pred, labels)
        routing = self.model_args.routing
        (model,) = self.model_parts
        routing_loss = model_routing_loss(model, routing.aux_loss_coeff, routing.z_loss_coeff)
        if routing_loss is None:
            return loss_sum
        # The trainer divides by the global valid-token count: weight by this microbatch's share.
        weighted = routing_loss * (labels != IGNORE_INDEX).sum()
        return loss_sum + (weighted - weighted.detach())


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
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        raise SystemExit(USAGE)
    _single_process_env()
    # torchdata's loader calls an API torch deprecated; nothing a user can act on.
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
    try:
        job_config = parse_recipe(argv[0], argv[1:])
        check_run(job_config, int(os.environ["WORLD_SIZE"]))
    except RecipeError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"tiedmoe-train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    init_logger()
    if os.environ.get("RANK", "0") == "0":
        path = write_resolved_recipe(job_config, job_config.job.dump_folder)
        logger.info(f"Seed {job_config.debug.seed}; resolved recipe saved to {path}")
    trainer = None
    try:
        trainer = TiedMoETrainer(job_config)
        trainer.train()
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


if __name__ == "__main__":
    main()
