"""Everything needed to run torchtitan 0.2.2 on a machine without an accelerator.

torchtitan 0.2.2 assumes a GPU in five places. Each fix below only changes behaviour
in a case that would otherwise fail, and all of them live here:

1. ``torchtitan.tools.utils`` falls back to ``device_type = "cuda"`` when no
   accelerator exists, and several modules copied that name at import time. We point
   them at ``"cpu"`` and at ``CpuDeviceModule``, which answers the few
   ``torch.cuda``-style calls torchtitan makes (memory numbers come from the process's
   resident set size, the closest CPU analogue).
2. Its MoE router counts tokens per expert with ``torch.histc`` on int64 indices,
   which has no CPU kernel. ``torch.histc`` is wrapped to count integer CPU tensors
   in float32 (exact below 2**24 per bin) and return the input dtype.
3. Its token permutation for grouped GEMMs and expert parallelism always launches a
   Triton kernel; torchtitan ships a CPU reference (``use_cpu=True``) that we select
   for CPU tensors.
4. The grouped-mm expert path casts to bf16; on CPU families use the fp32 for-loop
   path (``use_grouped_mm = False``, see ``adapt_moe_args``).
5. FSDP2 reduces gradients with ``PREMUL_SUM`` once torchtitan sets a divide factor,
   which gloo lacks (``adapt_fsdp``).

``enable()`` runs when ``tiedmoe_titan`` is imported; it is idempotent.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import resource
from types import SimpleNamespace

import torch

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


def enable() -> None:
    global _enabled
    if _enabled:
        return
    _enabled = True

    torch.histc = _histc_for_cpu_integers(torch.histc)

    import torchtitan.models.moe.utils as moe_utils

    moe_utils.generate_permute_indices = _permute_indices_on_cpu(moe_utils.generate_permute_indices)

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


def adapt_moe_args(moe_args):
    """MoE settings that work on the device we run on (fp32 for-loop experts on CPU)."""
    if not has_accelerator() and moe_args.use_grouped_mm:
        return dataclasses.replace(moe_args, use_grouped_mm=False)
    return moe_args


def adapt_fsdp(model: torch.nn.Module) -> None:
    """gloo has no PREMUL_SUM, which FSDP2 uses for a gradient divide factor (torchtitan
    sets 1.0): on CPU reduce with a plain SUM and divide afterwards (by 1, a no-op)."""
    if has_accelerator():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
