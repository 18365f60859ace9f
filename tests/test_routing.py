"""Routing losses per layer over shared banks, and how the trainer adds them."""

import types

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from tiedmoe_titan.models import model_routing_loss, routing_losses
from tiedmoe_titan.models.moe import tied_moe_layers
from tiedmoe_titan.train import TiedMoETrainer
from tiedmoe_titan.tying import TieConfig

TIED_2 = TieConfig(group_size=2, untied_first=2, untied_last=2)


def tokens(batch=2, seq=32, seed=1):
    return torch.randint(0, 2048, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_losses_equal_direct_computation():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    top_k = 2
    chosen = logits.topk(top_k, dim=-1).indices
    counts = torch.bincount(chosen.flatten(), minlength=4)
    lb, z = routing_losses(logits, counts, top_k, "softmax")
    probs = [[torch.exp(l) / sum(torch.exp(x) for x in row) for l in row] for row in logits]
    expected_lb = 4 * sum(
        (counts[i].item() / (6 * top_k)) * (sum(p[i] for p in probs) / 6) for i in range(4)
    )
    expected_z = sum(torch.log(sum(torch.exp(x) for x in row)) ** 2 for row in logits) / 6
    assert lb.item() == pytest.approx(float(expected_lb), rel=1e-6)
    assert z.item() == pytest.approx(float(expected_z), rel=1e-6)


def test_balance_loss_is_one_when_balanced_and_grows_as_routing_collapses():
    """1.0 is the loss of a uniform router with a uniform load; a router that sends
    every token to the same top-k experts scores E / k (here 4)."""
    num_tokens, num_experts, top_k = 64, 8, 2
    balanced = torch.full((num_experts,), num_tokens * top_k // num_experts)
    lb, _ = routing_losses(torch.zeros(num_tokens, num_experts), balanced, top_k, "softmax")
    assert lb.item() == pytest.approx(1.0, abs=1e-6)
    losses = []
    for margin in (0.5, 2.0, 30.0):  # experts 0 and 1 preferred by this logit margin
        logits = torch.zeros(num_tokens, num_experts)
        logits[:, :2] = margin
        counts = torch.bincount(logits.topk(top_k, dim=-1).indices.flatten(), minlength=num_experts)
        losses.append(routing_losses(logits, counts, top_k, "softmax")[0].item())
    assert 1.0 < losses[0] < losses[1] < losses[2]
    assert losses[2] == pytest.approx(num_experts / top_k, rel=1e-6)


@pytest.mark.parametrize(("family", "tying"), [("qwen3", TIED_2), ("deepseek", TieConfig(group_size=2, untied_first=1))])
def test_each_layer_of_a_group_balances_its_own_router_and_load(family, tying):
    """Layers sharing a bank report losses from their own router logits and their own
    routed counts, not the bank's or a neighbour's."""
    model = build_model(family, tying)
    layers = tied_moe_layers(model)
    seen = {}
    for layer in layers:
        def record(module, inputs, output, layer=layer):
            seen[layer.layer_id] = (output.detach().clone(), layer.tokens_per_expert.clone())

        layer.router.gate.register_forward_hook(record)
    before = {layer.layer_id: layer.tokens_per_expert.clone() for layer in layers}
    model(tokens())
    reported = {}
    for layer in layers:
        logits, _ = seen[layer.layer_id]
        counts = layer.tokens_per_expert - before[layer.layer_id]
        assert counts.sum().item() == logits.shape[0] * layer.router.top_k
        lb, z = routing_losses(logits, counts, layer.router.top_k, layer.score_func)
        assert torch.equal(layer.routing_losses[0].detach(), lb) and torch.equal(layer.routing_losses[1].detach(), z)
        reported[layer.layer_id] = lb.item()
    for a, b in zip(layers, layers[1:]):
        if a.experts is b.experts:  # same bank, different routers: different balance
            assert reported[a.layer_id] != reported[b.layer_id]


def test_model_loss_is_the_mean_over_layers_and_is_consumed():
    model = build_model("olmoe", TIED_2)
    model(tokens())
    per_layer = [m.routing_losses for m in tied_moe_layers(model)]
    expected = 0.01 * torch.stack([lb for lb, _ in per_layer]).mean() + 1e-4 * torch.stack([z for _, z in per_layer]).mean()
    torch.testing.assert_close(model_routing_loss(model, 0.01, 1e-4), expected)
    assert model_routing_loss(model, 0.01, 1e-4) is None  # consumed: never added twice


def fake_trainer(model):
    """The pieces of TiedMoETrainer its loss uses."""
    t = types.SimpleNamespace(model_parts=[model], model_args=model.model_args)
    t.cross_entropy_fn = lambda pred, labels: F.cross_entropy(pred.flatten(0, 1), labels.flatten(), reduction="sum")
    return t


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_trainer_loss_under_gradient_accumulation():
    """Two microbatches, torchtitan's normalisation (sum / global tokens): the gradient is
    that of mean CE + the mean over microbatches of the routing loss; the value is CE."""
    model = build_model("qwen3", TIED_2, aux_loss_coeff=0.1, z_loss_coeff=0.01)
    trainer = fake_trainer(model)
    microbatches = [tokens(seed=s) for s in (1, 2)]
    global_tokens = sum(x[:, 1:].numel() for x in microbatches)

    for x in microbatches:
        loss = TiedMoETrainer.loss_with_routing(trainer, model(x[:, :-1]), x[:, 1:]) / global_tokens
        ce = trainer.cross_entropy_fn(model(x[:, :-1]), x[:, 1:]) / global_tokens
        model_routing_loss(model, 0, 0)  # drop the second forward's losses
        torch.testing.assert_close(loss, ce)  # the value is the cross-entropy alone
        loss.backward()
    got = grads(model)

    model.zero_grad()
    for x in microbatches:
        ce = trainer.cross_entropy_fn(model(x[:, :-1]), x[:, 1:]) / global_tokens
        (ce + model_routing_loss(model, 0.1, 0.01) / len(microbatches)).backward()
    expected = grads(model)
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-8, msg=name)
    router = "layers.3.moe.router.gate.weight"
    assert got[router].abs().sum() > 0


def test_activation_checkpointing_keeps_routing_gradients():
    plain = build_model("qwen3", TIED_2, seed=4)
    checkpointed = build_model("qwen3", TIED_2, seed=4)
    for layer_id, block in checkpointed.layers.named_children():
        checkpointed.layers.register_module(layer_id, checkpoint_wrapper(block))
    x = tokens()
    for model in (plain, checkpointed):
        logits = model(x)
        (logits.float().square().mean() + model_routing_loss(model, 0.1, 0.01)).backward()
        # The recompute in backward does not overwrite what the forward stored.
        assert all(m.routing_losses is None for m in tied_moe_layers(model))
    expected = grads(plain)
    for name, grad in grads(checkpointed).items():
        torch.testing.assert_close(grad, expected[name.replace("._checkpoint_wrapped_module", "")], rtol=1e-5, atol=1e-8)
