"""``tiedmoe-eval CHECKPOINT --data PATH``: held-out loss and perplexity of a checkpoint.

CHECKPOINT is a step folder written by tiedmoe-train, or its checkpoint folder (the
latest complete step); the model comes from the ``recipe.resolved.toml`` of that run
(or ``--recipe``), the tokenizer and sequence length from the same recipe unless given.
``--data`` takes what ``training.dataset_path`` takes (``.txt`` / ``.jsonl`` /
``.parquet`` globs, comma-separated). The data is read once, packed into windows of
``seq_len + 1`` tokens exactly as in training, and every window is scored: the loss
is the mean next-token cross-entropy over all predicted tokens (the tail shorter than
one window is left out), in nats; perplexity is its exponential.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .config import ArgumentParser, RecipeError, parse_recipe
from .data import open_sources, resolve_dataset_files
from .preflight import model_args_of
from .saved_checkpoints import ProjectModel, find_recipe, find_step, read_model_state, single_process
from .spec import SPEC_PREFIX
from .tokenizer import load_tokenizer

PROG = "tiedmoe-eval"
PROGRESS_EVERY_S = 10.0  # a progress line at most this often


@dataclass
class EvalResult:
    checkpoint: str  # the step folder evaluated
    recipe: str
    data: str
    loss: float  # mean cross-entropy per predicted token, nats
    perplexity: float
    tokens: int  # predicted tokens scored
    windows: int  # sequences of seq_len + 1 tokens
    seq_len: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def load_model(checkpoint: str, recipe: str | None = None) -> tuple[torch.nn.Module, str, str, object]:
    """The model of a project checkpoint, in eval mode on the CPU, in the saved dtype.

    Returns (model, step folder, recipe path, the recipe's job config)."""
    step_dir = find_step(checkpoint)
    recipe = recipe or find_recipe(step_dir)
    job_config = parse_recipe(recipe)
    spec, args = model_args_of(job_config)
    project_model = ProjectModel(job_config.model.name.removeprefix(SPEC_PREFIX), args, spec.model_cls)
    state = read_model_state(step_dir, project_model, recipe)
    model = spec.model_cls(args)  # non-persistent buffers (the RoPE cache) are built here
    model.load_state_dict(state)
    dtype = state["tok_embeddings.weight"].dtype
    return model.to(dtype).eval(), step_dir, recipe, job_config


def evaluate(
    checkpoint: str,
    data: str,
    recipe: str | None = None,
    tokenizer_path: str | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    progress: Callable[[str], None] = print,
) -> EvalResult:
    """Mean next-token loss and perplexity of ``checkpoint`` over every window of ``data``."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    resolve_dataset_files(data, "--data")  # a wrong path fails before the model is read
    model, step_dir, recipe, job_config = load_model(checkpoint, recipe)
    seq_len = seq_len or job_config.training.seq_len
    if seq_len > model.model_args.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's max_seq_len {model.model_args.max_seq_len} (its RoPE cache)")
    tokenizer = load_tokenizer(tokenizer_path or job_config.model.hf_assets_path, "--tokenizer" if tokenizer_path else "model.hf_assets_path")
    progress(f"model of {recipe} from {step_dir}; tokenizer {tokenizer.model_path}; seq_len {seq_len}")
    sources = open_sources(data, tokenizer, "--data", log=progress)
    width = seq_len + 1
    windows = sum(source.shards.num_tokens // width for source in sources)
    if windows == 0:
        raise ValueError(f"--data {data}: fewer tokens than one window of seq_len + 1 = {width}")
    progress(f"{windows} windows of {width} tokens from {len(sources)} source(s)")
    loader = _windows(sources, width, batch_size)
    loss_sum, scored, done, start, last_report = 0.0, 0, 0, time.perf_counter(), time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            inputs, labels = batch[:, :-1], batch[:, 1:]
            logits = model(inputs)
            loss_sum += F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum").item()
            scored += labels.numel()
            done += len(labels)
            if time.perf_counter() - last_report >= PROGRESS_EVERY_S:
                last_report = time.perf_counter()
                progress(f"{done}/{windows} windows, running loss {loss_sum / scored:.4f}")
    loss = loss_sum / scored
    return EvalResult(step_dir, recipe, data, loss, math.exp(loss), scored, done, seq_len, time.perf_counter() - start)


def _windows(sources, width: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Every window of every source, in order, ``batch_size`` at a time."""
    batch = []
    for source in sources:
        for j in range(source.shards.num_tokens // width):
            batch.append(torch.from_numpy(source.shards.read(j * width, width)))
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []
    if batch:
        yield torch.stack(batch)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a step-N folder written by tiedmoe-train, or its checkpoint folder (latest step)")
    parser.add_argument("--data", required=True, help="held-out data: .txt / .jsonl / .parquet globs or token-shard folders, comma-separated")
    parser.add_argument("--recipe", help="the run's recipe (default: recipe.resolved.toml above CHECKPOINT)")
    parser.add_argument("--tokenizer", help="SentencePiece .model or Hugging Face tokenizer folder (default: the recipe's model.hf_assets_path)")
    parser.add_argument("--seq-len", type=int, help="tokens per window (default: the recipe's training.seq_len)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def progress(message: str) -> None:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    try:
        with single_process():
            result = evaluate(
                options.checkpoint, options.data, options.recipe, options.tokenizer, options.seq_len, options.batch_size, progress
            )
    except (RecipeError, ValueError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if options.json:
        print(json.dumps(result.as_dict()))
    else:
        print(f"loss {result.loss:.4f} nats/token  perplexity {result.perplexity:.2f}  ({result.tokens} tokens, {result.checkpoint})")


if __name__ == "__main__":
    main()
