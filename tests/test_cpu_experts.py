"""Routed experts on CPU: torch._grouped_mm in the input's dtype on the unpadded expert
groups (tiedmoe_titan.compat, seam 4), against torchtitan's fp32 for-loop path."""

import dataclasses

import pytest
import torch
import torchtitan.models.moe.utils as moe_utils
from conftest import ce_loss, flavor_args, tokens
from torchtitan.models.moe import moe as tt_moe
from torchtitan.models.moe.moe import GroupedExperts
from torchtitan.models.qwen3.model.model import Qwen3Model

from tiedmoe_titan.models import FAMILIES

# The grouped path runs the for-loop's GEMMs (same operands, one call per weight); only
# elementwise SiLU / product kernels see the groups as one buffer instead of one per
# expert, which can move a vectorised tail by an ulp when the expert width is not a
# multiple of the SIMD width (40 here; the debug flavors' 64 came out bit-equal on an
# AVX-512 machine). Measured worst cases at width 40 (native, ATEN_CPU_CAPABILITY=avx2 /
# default, MKL_ENABLE_INSTRUCTIONS=SSE4_2): logits 1e-6 abs, gradients 2e-9 abs.
LOGITS_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-5, atol=1e-7)


def bank(num_experts=4, dim=32, hidden=40, use_grouped_mm=True, seed=0) -> GroupedExperts:
    experts = GroupedExperts(dim, hidden, num_experts, use_grouped_mm)
    torch.manual_seed(seed)
    with torch.no_grad():
        experts.init_weights(0.1)
    return experts


def run(experts: GroupedExperts, x, counts, grad=None):
    x = x.clone().requires_grad_()
    out = experts(x, counts)
    out.backward(torch.ones_like(out) if grad is None else grad)
    return out.detach(), {"x": x.grad, **{n: p.grad for n, p in experts.named_parameters()}}


@pytest.mark.parametrize("counts", [[3, 0, 7, 5], [0, 0, 9, 0], [1, 2, 1, 1]], ids=["one_empty", "one_used", "small"])
def test_grouped_experts_on_cpu_stay_fp32_and_match_the_for_loop(counts):
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 32, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    fast_out, fast_grads = run(bank(use_grouped_mm=True), x, counts, grad)
    loop_out, loop_grads = run(bank(use_grouped_mm=False), x, counts, grad)
    assert fast_out.dtype == torch.float32
    torch.testing.assert_close(fast_out, loop_out, **LOGITS_TOL)
    for name, g in loop_grads.items():
        torch.testing.assert_close(fast_grads[name], g, **GRAD_TOL, msg=name)


def test_bf16_inputs_stay_bf16():
    experts = bank().to(torch.bfloat16)
    counts = torch.tensor([2, 3, 0, 1])
    out = experts(torch.randn(6, 32, dtype=torch.bfloat16), counts)
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("loss", ["sum", "strided"])
def test_grouped_experts_take_expanded_or_strided_gradients(loss):
    # torch._grouped_mm's CPU backward rejects a stride-0 (out.sum()) or strided gradient
    # with "Invalid strides/sizes"; the experts hand it a contiguous one.
    experts, counts = bank(), torch.tensor([3, 0, 4, 5])
    x = torch.randn(12, 32, requires_grad=True)
    out = experts(x, counts)
    if loss == "sum":
        out.sum().backward()
    else:
        out.backward(torch.ones(12, 64)[:, ::2])
    _, reference = run(bank(use_grouped_mm=False), x.detach(), counts)
    torch.testing.assert_close(x.grad, reference["x"], **GRAD_TOL)
    torch.testing.assert_close(experts.w1.grad, reference["w1"], **GRAD_TOL)


def test_built_models_run_cpu_experts_as_unpadded_fp32_grouped_gemms(monkeypatch):
    operand_dtypes = []
    grouped_mm = torch._grouped_mm

    def recording_grouped_mm(a, b, **kwargs):
        operand_dtypes.append((a.dtype, b.dtype))
        return grouped_mm(a, b, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("CPU experts should neither loop over experts nor pad their groups")

    monkeypatch.setattr(torch, "_grouped_mm", recording_grouped_mm)
    monkeypatch.setattr(tt_moe, "_run_experts_for_loop", refuse)
    monkeypatch.setattr(moe_utils, "_permute", refuse)
    for family in ("olmoe", "deepseek"):
        model = FAMILIES[family][0](flavor_args(family))
        with torch.no_grad():
            model.init_weights()
        x = tokens()
        ce_loss(model(x), x).backward()
    assert operand_dtypes and set(operand_dtypes) == {(torch.float32, torch.float32)}


def test_other_devices_keep_torchtitans_bf16_grouped_path(monkeypatch):
    operand_dtypes = []
    grouped_mm = torch._grouped_mm

    def recording_grouped_mm(a, b, **kwargs):
        operand_dtypes.append((a.device.type, a.dtype))
        return grouped_mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", recording_grouped_mm)
    monkeypatch.setattr(tt_moe, "indices_padding_wrapper", lambda run: run)  # its Triton kernel needs a GPU
    experts = GroupedExperts(32, 40, 4, use_grouped_mm=True).to("meta")
    out = experts(torch.empty(8, 32, device="meta"), torch.empty(4, dtype=torch.int64, device="meta"))
    assert out.dtype == torch.float32 and operand_dtypes == [("meta", torch.bfloat16)] * 3


def test_grouped_model_matches_torchtitans_for_loop_model():
    """The project's G=1 model on the CPU grouped path against torchtitan's own model on
    its fp32 for-loop path, at an expert width where the two are not bit-equal."""
    from test_models import torchtitan_qwen3

    args = flavor_args("qwen3")
    args.moe_inter_dim = 40
    ours = FAMILIES["qwen3"][0](args)
    plain_args = flavor_args("qwen3")
    plain_args.moe_inter_dim = 40
    plain_args.moe_args = dataclasses.replace(plain_args.moe_args, use_grouped_mm=False)
    theirs: Qwen3Model = torchtitan_qwen3(plain_args)
    for model in (ours, theirs):
        torch.manual_seed(3)
        with torch.no_grad():
            model.init_weights()
    x = tokens()
    ours_logits, theirs_logits = ours(x), theirs(x)
    torch.testing.assert_close(ours_logits, theirs_logits, **LOGITS_TOL)
    ce_loss(ours_logits, x).backward()
    ce_loss(theirs_logits, x).backward()
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_params[name].grad, **GRAD_TOL, msg=name)
