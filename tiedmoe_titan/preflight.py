"""Pre-run checks: everything a recipe must satisfy before anything is built or written.

``config.py`` turns a recipe into a job config (keys, types, each key's domain);
here the recipe meets the world it will run in: the model family and flavor
(``model_args_of``), the parallel degrees against the number of processes
(``parallel_dims_of``), what the tied plan supports, the batch arithmetic, the dump
folder, the data, tokenizer and initial checkpoint (``check_run``). Each failure is
one ``RecipeError`` line.
"""

import copy
import os

from torch._dynamo import list_backends
from torchtitan.distributed import ParallelDims
from torchtitan.protocols.train_spec import get_train_spec

from .checkpoint import DCP_METADATA, complete_steps, tokenizer_mismatch
from .config import RecipeError
from .data import check_data, resolve_dataset_files
from .models import FAMILIES
from .parallelize import UnsupportedParallelism, check_parallelism
from .spec import SPEC_PREFIX
from .tokenizer import load_tokenizer
from .tying import TieConfigError


def family_names() -> str:
    return ", ".join(SPEC_PREFIX + family for family in FAMILIES)


def model_args_of(job_config):
    """The recipe's model args (a private copy of the flavor, updated from the recipe)."""
    name, flavor = job_config.model.name, job_config.model.flavor
    if not name.startswith(SPEC_PREFIX):
        raise RecipeError(f"model.name = {name!r}: tiedmoe-train builds the families {family_names()}")
    try:
        spec = get_train_spec(name)
    except ValueError:
        raise RecipeError(f"model.name = {name!r} is not a registered family: use one of {family_names()}") from None
    if flavor not in spec.model_args:
        raise RecipeError(f"model.flavor = {flavor!r} is not a flavor of {name}: choose one of {', '.join(spec.model_args)}")
    args = copy.deepcopy(spec.model_args[flavor])
    try:
        args.update_from_config(job_config)
    except TieConfigError as e:
        raise RecipeError(str(e)) from None
    return spec, args


def parallel_dims_of(job_config, world_size: int):
    """torchtitan's ParallelDims for the recipe, after checking the degrees factor ``world_size``."""
    p = job_config.parallelism
    degrees = {
        "data_parallel_replicate_degree": p.data_parallel_replicate_degree,
        "context_parallel_degree": p.context_parallel_degree,
        "tensor_parallel_degree": p.tensor_parallel_degree,
        "pipeline_parallel_degree": p.pipeline_parallel_degree,
        "expert_parallel_degree": p.expert_parallel_degree,
        "expert_tensor_parallel_degree": p.expert_tensor_parallel_degree,
    }
    for key, degree in degrees.items():
        if degree < 1:
            raise RecipeError(f"parallelism.{key} = {degree}: must be >= 1")
    others = p.data_parallel_replicate_degree * p.context_parallel_degree * p.tensor_parallel_degree * p.pipeline_parallel_degree
    dp_shard = p.data_parallel_shard_degree
    if dp_shard == -1:
        if world_size % others:
            raise RecipeError(
                f"world size {world_size} is not a multiple of dp_replicate x cp x tp x pp = {others}: "
                "change the parallelism degrees or the number of processes"
            )
        dp_shard = world_size // others
    elif dp_shard < 1 or dp_shard * others != world_size:
        raise RecipeError(
            f"parallelism degrees dp_shard {dp_shard} x dp_replicate x cp x tp x pp {others} = {dp_shard * others} "
            f"but the world size is {world_size}: set parallelism.data_parallel_shard_degree = -1 or launch "
            f"{max(dp_shard, 1) * others} processes"
        )
    ep, etp = p.expert_parallel_degree, p.expert_tensor_parallel_degree
    if (dp_shard * p.context_parallel_degree * p.tensor_parallel_degree) % (ep * etp):
        raise RecipeError(
            f"parallelism.expert_parallel_degree = {ep} (x etp {etp}) must divide dp_shard x cp x tp = "
            f"{dp_shard * p.context_parallel_degree * p.tensor_parallel_degree}: expert parallelism is carved out of them"
        )
    return ParallelDims(
        dp_shard=dp_shard, dp_replicate=p.data_parallel_replicate_degree, cp=p.context_parallel_degree,
        tp=p.tensor_parallel_degree, pp=p.pipeline_parallel_degree, ep=ep, etp=etp, world_size=world_size,
    )


def check_run(job_config, world_size: int) -> None:
    """Everything that must hold before ``tiedmoe-train`` builds anything."""
    spec, args = model_args_of(job_config)
    if job_config.checkpoint.create_seed_checkpoint:
        check_seed_checkpoint(job_config, world_size)
    dims = parallel_dims_of(job_config, world_size)
    check_dump_folder(job_config.job.dump_folder)
    for name in ("training", "validation"):
        loader = getattr(job_config, name).dataloader
        if loader.prefetch_factor is not None and loader.num_workers == 0:
            raise RecipeError(
                f"{name}.dataloader.prefetch_factor = {loader.prefetch_factor} needs loader workers: "
                f"set {name}.dataloader.num_workers >= 1 or leave prefetch_factor unset"
            )
    if job_config.compile.enable:
        if job_config.compile.backend not in list_backends(exclude_tags=()):
            raise RecipeError(
                f"compile.backend = {job_config.compile.backend!r} is not a torch.compile backend: "
                f"use one of {', '.join(list_backends())}"
            )
    try:
        check_parallelism(spec.model_cls, args.tie_layout(), dims, job_config)
    except UnsupportedParallelism as e:
        raise RecipeError(str(e)) from None
    training = job_config.training
    dp = dims.dp_replicate * dims.dp_shard
    if training.global_batch_size > 0 and training.global_batch_size % (training.local_batch_size * dp):
        raise RecipeError(
            f"training.global_batch_size = {training.global_batch_size} is not a multiple of local_batch_size "
            f"{training.local_batch_size} x data-parallel ranks {dp}: gradient accumulation needs a whole number of microbatches"
        )
    try:
        resolve_dataset_files(training.dataset_path, "training.dataset_path")
        if job_config.validation.enable:
            resolve_dataset_files(job_config.validation.dataset_path, "validation.dataset_path")
        tokenizer = load_tokenizer(job_config.model.hf_assets_path)
    except (ValueError, FileNotFoundError) as e:
        raise RecipeError(str(e)) from None
    vocab = tokenizer.get_vocab_size()
    if vocab > args.vocab_size:
        raise RecipeError(
            f"model.hf_assets_path: the tokenizer has {vocab} tokens, more than the {args.vocab_size} of "
            f"{job_config.model.name} / {job_config.model.flavor}: use a matching tokenizer or flavor"
        )
    initial = job_config.checkpoint.initial_load_path
    if initial:
        check_initial_checkpoint(initial, job_config.checkpoint.initial_load_in_hf)
        if mismatch := tokenizer_mismatch(initial, tokenizer):
            raise RecipeError(mismatch)
    try:  # opens the data as the loaders will (text inputs: tokenized once into the cache)
        check_data(job_config, tokenizer, dp)
    except (ValueError, FileNotFoundError) as e:
        raise RecipeError(str(e)) from None


def check_seed_checkpoint(job_config, world_size: int) -> None:
    """``checkpoint.create_seed_checkpoint`` saves the recipe's initial weights as step 0 of
    a new checkpoint folder, from one process (unsharded, as torchtitan requires), and
    loads nothing."""
    key = "checkpoint.create_seed_checkpoint"
    checkpoint = job_config.checkpoint
    if world_size != 1:
        raise RecipeError(
            f"{key} runs as 1 process, not {world_size}: the seed is saved unsharded and any layout loads it; "
            "run tiedmoe-train without torchrun (or NPROC=1)"
        )
    if not checkpoint.enable:
        raise RecipeError(f"{key} needs checkpoint.enable = true (--checkpoint.enable): the checkpointer saves the seed")
    if checkpoint.initial_load_path or checkpoint.initial_load_in_hf:
        raise RecipeError(
            f"{key} saves the recipe's fresh initialisation and loads nothing: drop checkpoint.initial_load_path / "
            "initial_load_in_hf (a training run loads those weights itself)"
        )
    folder = os.path.join(job_config.job.dump_folder, checkpoint.folder)
    if steps := complete_steps(folder):
        raise RecipeError(
            f"{key}: {folder} already holds step-{steps[-1]}; a seed starts a new checkpoint folder: choose another job.dump_folder"
        )


def check_dump_folder(folder: str) -> None:
    """The outputs folder is a folder, or can be made one (nothing is created here)."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise RecipeError(f"job.dump_folder = {folder!r}: {path} is a file, not a folder: choose another dump folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise RecipeError(f"job.dump_folder = {folder!r}: {path} is not writable: choose another dump folder")


def check_initial_checkpoint(path: str, in_hf: bool) -> None:
    """``checkpoint.initial_load_path`` is a complete DCP checkpoint (or, with
    ``initial_load_in_hf``, a folder)."""
    key = f"checkpoint.initial_load_path = {path!r}"
    if not os.path.isdir(path):
        raise RecipeError(f"{key}: no such folder")
    if not in_hf and not os.path.isfile(os.path.join(path, DCP_METADATA)):
        raise RecipeError(
            f"{key}: not a complete DCP checkpoint (no {DCP_METADATA}): point it at a step-N folder or at "
            "tiedmoe-import's OUTDIR/model"
        )
