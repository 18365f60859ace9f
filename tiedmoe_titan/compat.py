"""Every place the project relies on torchtitan 0.2.2's (or torch's) internals.

An upgrade of torchtitan reads this one file. Each seam names what it leans on:

* ``check_torchtitan_version``: the project is written against torchtitan 0.2.2.
* ``recipe_config_manager``, ``merged_job_config_class``: torchtitan's
  ``ConfigManager`` parses the recipe; its private ``_maybe_load_toml`` is replaced
  (the recipe arrives merged, ``extends`` resolved) and ``_validate_config`` (checks of
  HF tokenizer folders) skipped; ``_merge_configs`` adds the project's sections.
* ``build_validator_with_loader``: torchtitan's ``Validator`` builds its loader by
  calling the module-level name ``build_text_validation_dataloader`` (HF datasets
  only); that one name is pointed at the project's loader while it is built.
* ``replaced_clip_grad_norm``: torchtitan's ``Trainer.train_step`` clips gradients
  through the module-level ``torchtitan.distributed.utils.clip_grad_norm_`` right
  before ``optimizers.step()`` and keeps the norm to itself; the NaN guard reads it
  there.
* ``tensorboard_loggers``: ``LoggerContainer._loggers``, where the moe/ histograms go.
* ``SAC_SAVE_OPS``: the ops each torchtitan plan's selective activation
  checkpointing saves (``_op_sac_save_list``).
* ``fsdp_units_and_gathered_bytes``: FSDP2's parameter groups (``_get_fsdp_state``,
  ``FSDPParam._sharded_param_data``), which the shard-once harness reads to recognise
  expert collectives; ``process_group_size`` unboxes the group a c10d op was given.
* ``in_backward``: autograd's current graph task (``torch._C``), to tell an
  activation-checkpointing recompute from a forward.
* ``torch.optim._muon``: torch's Muon constants and LR adjustment, reused per expert.

and the five places torchtitan 0.2.2 assumes a GPU. Each fix below only changes
behaviour in a case that would otherwise fail (or, for the experts, compute in bf16 on
CPU):

1. ``torchtitan.tools.utils`` falls back to ``device_type = "cuda"`` when no
   accelerator exists, and several modules copied that name at import time. We point
   them at ``"cpu"`` and at ``CpuDeviceModule``, which answers the few
   ``torch.cuda``-style calls torchtitan makes (memory numbers come from the process's
   resident set size, the closest CPU analogue).
2. Its MoE router counts tokens per expert with ``torch.histc`` on int64 indices,
   which has no CPU kernel. ``torch.histc`` is wrapped to count integer CPU tensors
   in float32 (exact below 2**24 per bin) and return the input dtype.
3. Its token permutation for expert parallelism (and GPU grouped GEMMs) always
   launches a Triton kernel; torchtitan ships a CPU reference (``use_cpu=True``) that
   we select for CPU tensors.
4. Its grouped-mm experts (``_run_experts_grouped_mm``) cast to bf16, and pad each
   expert's token group to a multiple of 8 rows (GPU GEMM alignment). For CPU tensors
   ``GroupedExperts.forward`` (which ``ExpertBank`` inherits) runs ``torch._grouped_mm``
   in the input's dtype instead (fp32 stays fp32; ``run_experts_grouped_mm_cpu``) on
   the unpadded groups, which CPU grouped GEMMs accept: the for-loop path's
   per-expert GEMMs, one call per weight.
5. FSDP2 reduces gradients with ``PREMUL_SUM`` once torchtitan sets a divide factor,
   which gloo lacks (``adapt_fsdp``).

Every wrapper hands tensors on other devices to torchtitan's own function, so GPU
behaviour is torchtitan's. The ``torch.histc`` and permutation wrappers are
process-wide on purpose: CPU tensors on a GPU host (eval, import, export) need them too.
``enable()`` runs when ``tiedmoe_titan.models`` is imported (anything that builds a
model); it is idempotent. Importing the pure ``tiedmoe_titan.tying`` patches nothing.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import platform
import resource
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _adjust_lr
from torchtitan.components.metrics import LoggerContainer, TensorBoardLogger
from torchtitan.config import ConfigManager
from torchtitan.config import JobConfig as TitanJobConfig
from torchtitan.distributed import utils as dist_utils
from torchtitan.models.deepseek_v3.infra.parallelize import _op_sac_save_list as deepseek_sac_ops
from torchtitan.models.deepseek_v3.model.model import DeepSeekV3Model
from torchtitan.models.qwen3.infra.parallelize import _op_sac_save_list as qwen3_sac_ops
from torchtitan.models.qwen3.model.model import Qwen3Model

TORCHTITAN_VERSION = "0.2.2"


def check_torchtitan_version() -> None:
    installed = importlib.metadata.version("torchtitan")
    if installed != TORCHTITAN_VERSION:
        raise RuntimeError(
            f"torchtitan {installed} is installed, but tiedmoe_titan relies on torchtitan {TORCHTITAN_VERSION}'s "
            f"internals (tiedmoe_titan/compat.py): pip install torchtitan=={TORCHTITAN_VERSION}"
        )


# ---- torchtitan's config manager ------------------------------------------------------


def merged_job_config_class(custom: type) -> type:
    """torchtitan's JobConfig with the sections of ``custom`` merged in, as torchtitan
    does for ``--job.custom_config_module``."""
    return ConfigManager._merge_configs(TitanJobConfig, custom)


def recipe_config_manager(values: dict) -> ConfigManager:
    """torchtitan's ConfigManager parsing the merged recipe ``values`` instead of reading
    one TOML file, without its checks of HF tokenizer folders (the pre-run checks cover
    the project's tokenizers)."""

    class RecipeConfigManager(ConfigManager):
        def _maybe_load_toml(self, args):
            return values

        def _validate_config(self):
            pass

    return RecipeConfigManager()


# ---- torchtitan's validator, metrics and activation checkpointing ---------------------


@contextlib.contextmanager
def _swapped(module: Any, name: str, replacement: Callable[[Callable], Callable]) -> Iterator[None]:
    """``module.name`` is ``replacement(original)`` inside the context."""
    if not hasattr(module, name):
        raise RuntimeError(f"{module.__name__}.{name} not found: update tiedmoe_titan.compat for this torchtitan")
    original = getattr(module, name)
    setattr(module, name, replacement(original))
    try:
        yield
    finally:
        setattr(module, name, original)


def build_validator_with_loader(build_loader: Callable, **validator_args) -> Any:
    """torchtitan's ``build_validator``, whose ``Validator`` builds its loader with
    ``build_loader`` instead of the HF-datasets ``build_text_validation_dataloader``
    (the one module-level name it calls, pointed at ``build_loader`` for the duration
    of the constructor; the Trainer builds its validator once, from one thread)."""
    from torchtitan.components import validate  # imports pipelining: only when a validator is built

    with _swapped(validate, "build_text_validation_dataloader", lambda original: build_loader):
        return validate.build_validator(**validator_args)


def replaced_clip_grad_norm(replacement: Callable[[Callable], Callable]):
    """A context in which torchtitan's trainer clips with ``replacement(original)``
    instead of ``torchtitan.distributed.utils.clip_grad_norm_``."""
    return _swapped(dist_utils, "clip_grad_norm_", replacement)


def tensorboard_loggers(metric_logger: Any) -> list[TensorBoardLogger]:
    """The TensorBoard writers behind torchtitan's metric logger (one, or several in a
    ``LoggerContainer``)."""
    if isinstance(metric_logger, TensorBoardLogger):
        return [metric_logger]
    if isinstance(metric_logger, LoggerContainer):
        return [lg for lg in metric_logger._loggers if isinstance(lg, TensorBoardLogger)]
    return []


# The torchtitan model each family builds on -> the ops its plan's selective activation
# checkpointing saves.
SAC_SAVE_OPS = {Qwen3Model: qwen3_sac_ops, DeepSeekV3Model: deepseek_sac_ops}


# ---- torch internals -------------------------------------------------------------------

# torch's Muon (``torch.optim._muon``), which muon.py applies per expert: the quintic
# Newton-Schulz coefficients, its normalisation epsilon and its LR adjustment by shape.
MUON_NS_COEFFICIENTS = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
MUON_NS_EPS = EPS
muon_adjusted_lr = _adjust_lr


def in_backward() -> bool:
    """True while autograd runs a backward pass, e.g. when activation checkpointing
    recomputes a forward."""
    return torch._C._current_graph_task_id() != -1


def fsdp_units_and_gathered_bytes(module: torch.nn.Module) -> list[tuple[list[torch.nn.Module], int]]:
    """For each FSDP2 parameter group of ``module``: the modules it shards and the bytes
    one all-gather of it moves (its parameters unsharded, in their mixed-precision
    dtype if one is set)."""
    out = []
    for group in module._get_fsdp_state()._fsdp_param_groups:
        shard_bytes = sum(
            p._sharded_param_data.numel() * (p.param_dtype or p._sharded_param_data.dtype).itemsize
            for p in group.fsdp_params
        )
        out.append((list(group.modules), shard_bytes * group.mesh_info.shard_mesh_size))
    return out


def process_group_size(op_args) -> int:
    """The size of the process group a collective op was dispatched with, or -1."""
    for a in op_args:
        if isinstance(a, torch.ScriptObject):  # c10d ops carry the ProcessGroup boxed
            return dist.ProcessGroup.unbox(a).size()
        if isinstance(a, str):  # functional collectives carry the group's name
            return dist.distributed_c10d._resolve_process_group(a).size()
    return -1


# ---- running on CPU --------------------------------------------------------------------

_enabled = False


def has_accelerator() -> bool:
    from torch._utils import _get_available_device_type

    return _get_available_device_type() is not None


class CpuDeviceModule:
    """The subset of the ``torch.cuda`` API that torchtitan calls, for the CPU."""

    @staticmethod
    def get_device_name(device=None) -> str:
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def set_device(device) -> None:
        pass

    @staticmethod
    def synchronize(device=None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        pass  # the kernel's peak RSS cannot be reset; it is a process-lifetime peak

    @staticmethod
    def get_device_properties(device=None):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return SimpleNamespace(total_memory=total, name=CpuDeviceModule.get_device_name())

    @staticmethod
    def memory_stats(device=None) -> dict[str, int]:
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return {
            "active_bytes.all.peak": peak_rss,
            "reserved_bytes.all.peak": peak_rss,
            "num_alloc_retries": 0,
            "num_ooms": 0,
        }

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def is_available() -> bool:
        return True


def _histc_for_cpu_integers(histc):
    @functools.wraps(histc)
    def wrapper(input, *args, **kwargs):
        if input.device.type == "cpu" and not input.is_floating_point():
            return histc(input.float(), *args, **kwargs).to(input.dtype)
        return histc(input, *args, **kwargs)

    return wrapper


def _permute_indices_on_cpu(generate_permute_indices):
    @functools.wraps(generate_permute_indices)
    def wrapper(tokens_per_expert_group, *args, **kwargs):
        if tokens_per_expert_group.device.type == "cpu":
            kwargs["use_cpu"] = True
        return generate_permute_indices(tokens_per_expert_group, *args, **kwargs)

    return wrapper


class _DenseGrad(torch.autograd.Function):
    """The identity, whose backward makes the incoming gradient contiguous: the CPU
    backward of ``torch._grouped_mm`` rejects an expanded (stride-0) or strided
    gradient ("Invalid strides/sizes"), which e.g. ``out.sum().backward()`` produces."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def run_experts_grouped_mm_cpu(w1, w2, w3, x, num_tokens_per_expert) -> torch.Tensor:
    """torchtitan's ``_run_experts_grouped_mm`` computed in the dtype of ``x`` (no bf16
    cast), for CPU tensors. Rows of ``x`` past the last group (expert parallelism's
    padding) give unspecified output rows, as in torchtitan's grouped path; EP's token
    combine drops them."""
    offsets = torch.cumsum(num_tokens_per_expert, dim=0, dtype=torch.int32)
    w1, w2, w3 = (w.to(x.dtype).transpose(-2, -1) for w in (w1, w2, w3))
    h = F.silu(torch._grouped_mm(x, w1, offs=offsets)) * torch._grouped_mm(x, w3, offs=offsets)
    return _DenseGrad.apply(torch._grouped_mm(h, w2, offs=offsets))


def _grouped_experts_on_cpu(forward):
    """``GroupedExperts.forward`` that, on the grouped-mm path with CPU tensors, runs
    ``run_experts_grouped_mm_cpu`` eagerly on the tokens as they come: no bf16 cast and
    no padding of the expert groups (CPU grouped GEMMs need no row alignment; expert
    parallelism's dispatch pads on its own). torchtitan's ``apply_compile`` never
    compiles the experts module (only ``_run_experts_grouped_mm``, whose fake kernel
    takes bf16 only), so this path stays eager under ``torch.compile`` as well."""

    @functools.wraps(forward)
    def wrapper(self, x, num_tokens_per_expert):
        if not (self.use_grouped_mm and x.device.type == "cpu"):
            return forward(self, x, num_tokens_per_expert)
        weights = (w.to_local() if isinstance(w, DTensor) else w for w in (self.w1, self.w2, self.w3))
        return run_experts_grouped_mm_cpu(*weights, x, num_tokens_per_expert)

    return wrapper


def enable() -> None:
    global _enabled
    if _enabled:
        return
    _enabled = True
    check_torchtitan_version()

    torch.histc = _histc_for_cpu_integers(torch.histc)

    import torchtitan.models.moe.utils as moe_utils

    moe_utils.generate_permute_indices = _permute_indices_on_cpu(moe_utils.generate_permute_indices)

    from torchtitan.models.moe.moe import GroupedExperts  # ExpertBank inherits its forward

    GroupedExperts.forward = _grouped_experts_on_cpu(GroupedExperts.forward)

    if has_accelerator():
        return
    import torchtitan.components.metrics as metrics
    import torchtitan.distributed.parallel_dims as parallel_dims
    import torchtitan.distributed.utils as dist_utils
    import torchtitan.tools.profiling as profiling
    import torchtitan.tools.utils as tools_utils

    for module in (tools_utils, metrics, dist_utils, parallel_dims, profiling):
        if hasattr(module, "device_type"):
            module.device_type = "cpu"
        if hasattr(module, "device_module"):
            module.device_module = CpuDeviceModule


def adapt_fsdp(model: torch.nn.Module) -> None:
    """gloo has no PREMUL_SUM, which FSDP2 uses for a gradient divide factor (torchtitan
    sets 1.0): on CPU reduce with a plain SUM and divide afterwards (by 1, a no-op)."""
    if has_accelerator():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
