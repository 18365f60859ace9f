"""The torchtitan / torch seams (tiedmoe_titan.compat): process-wide CPU wrappers that
leave accelerator tensors to the original functions, compile without graph breaks,
and are installed only by what builds models."""

import subprocess
import sys
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tiedmoe_titan import compat


class Recorder:
    """Stands in for a torchtitan / torch function: records what reaches it."""

    def __init__(self, result=None):
        self.calls = []
        self.result = result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result if self.result is not None else args[0]


def cuda_tensor(*shape, dtype=torch.int64):
    """A CUDA-typed tensor without a GPU (a fake tensor: shape, dtype and device only)."""
    return torch.empty(*shape, dtype=dtype, device="cuda")


def test_cuda_inputs_reach_the_original_functions_unchanged():
    with FakeTensorMode(allow_non_fake_inputs=True):
        original = Recorder()
        indices = cuda_tensor(16)
        compat._histc_for_cpu_integers(original)(indices, bins=8, min=0, max=8)
        assert len(original.calls) == 1
        (args, kwargs) = original.calls[0]
        assert args[0] is indices and kwargs == {"bins": 8, "min": 0, "max": 8}

        original = Recorder()
        counts = cuda_tensor(4, dtype=torch.int32)
        compat._permute_indices_on_cpu(original)(counts, 2, 1, 64, 8)
        assert original.calls == [((counts, 2, 1, 64, 8), {})]  # no use_cpu added

        original = Recorder(result="torchtitan's forward")
        experts = types.SimpleNamespace(use_grouped_mm=True)
        x, tokens_per_expert = cuda_tensor(8, 4, dtype=torch.bfloat16), cuda_tensor(2)
        assert compat._grouped_experts_on_cpu(original)(experts, x, tokens_per_expert) == "torchtitan's forward"
        assert original.calls == [((experts, x, tokens_per_expert), {})]


def test_cpu_inputs_take_the_cpu_paths():
    compat.enable()
    original = Recorder()
    counts = torch.tensor([1, 2], dtype=torch.int32)
    compat._permute_indices_on_cpu(original)(counts, 2, 1, 64, 8)
    assert original.calls[0][1] == {"use_cpu": True}
    indices = torch.tensor([0, 3, 3, 1])
    histogram = compat._histc_for_cpu_integers(torch.histc.__wrapped__)(indices, bins=4, min=0, max=4)
    assert histogram.dtype == torch.int64 and histogram.tolist() == [1, 1, 0, 2]


def test_wrappers_compile_without_graph_breaks():
    """fullgraph=True fails on any graph break: the process-wide wrappers must trace."""
    compat.enable()
    permute = compat._permute_indices_on_cpu(lambda counts, *args, use_cpu=False: counts.cumsum(0) + int(use_cpu))

    @torch.compile(fullgraph=True, backend="eager")
    def route(indices, counts):
        return torch.histc(indices, bins=8, min=0, max=8), permute(counts, 2, 1)

    histogram, permuted = route(torch.tensor([0, 1, 1, 7]), torch.tensor([1, 2]))
    assert histogram.tolist() == [1, 2, 0, 0, 0, 0, 0, 1] and permuted.tolist() == [2, 4]


def test_importing_tying_patches_nothing():
    """tying.py is pure Python: importing it (and so the package) loads neither
    torchtitan nor the wrappers; building models does."""
    probe = (
        "import sys, torch; histc = torch.histc\n"
        "import tiedmoe_titan.tying\n"
        "assert torch.histc is histc and 'torchtitan' not in sys.modules, 'patched'\n"
        "import tiedmoe_titan.models\n"
        "assert torch.histc is not histc, 'not patched'\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_another_torchtitan_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(compat.importlib.metadata, "version", lambda name: "0.3.0")
    with pytest.raises(RuntimeError, match=r"torchtitan 0.3.0 is installed, .* pip install torchtitan==0.2.2"):
        compat.check_torchtitan_version()
