"""Routing statistics of TiedMoE and the metrics processor that logs them under moe/."""

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import build_model, flavor_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_optim import single_process_dims
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torchtitan.config import JobConfig

from tiedmoe_titan.metrics import TiedMetricsProcessor, build_tied_metrics_processor, usage_overlap
from tiedmoe_titan.models import FAMILIES
from tiedmoe_titan.models.moe import ROUTING_STATS, tied_moe_layers
from tiedmoe_titan.tying import TieConfig

# qwen3 debug: 8 MoE layers, 8 experts, top-2. Banks: 0:(0) 1:(1) 2:(2,3) 3:(4,5) 4:(6) 5:(7).
TIED_2 = TieConfig(group_size=2, untied_first=2, untied_last=2)
TIED_BANKS = {2: (2, 3), 3: (4, 5)}
BATCH, SEQ, TOP_K, EXPERTS = 2, 32, 2, 8


def tokens(seed=1):
    return torch.randint(0, 2048, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def world_of_one(tmp_path):
    """torchtitan's metric logger asks torch.distributed for the rank."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def processor(tmp_path: Path, model) -> TiedMetricsProcessor:
    job_config = JobConfig()
    job_config.job.dump_folder = str(tmp_path)
    job_config.metrics.enable_tensorboard = True
    job_config.metrics.disable_color_printing = True
    p = build_tied_metrics_processor(job_config, single_process_dims(), model.model_args)
    p.model_parts = [model]  # as the trainer does
    p.num_flops_per_token = 1  # what the trainer sets before the first log
    return p


def log_step(p: TiedMetricsProcessor, step: int) -> None:
    p.data_loading_times.append(0.0)
    p.ntokens_since_last_log = BATCH * SEQ
    p.log(step, global_avg_loss=3.0, global_max_loss=3.5, grad_norm=1.0, extra_metrics={"lr": 1e-3})


def events(tmp_path: Path) -> EventAccumulator:
    (run,) = (tmp_path / "tb").iterdir()  # {dump_folder}/{save_tb_folder}/{datetime}
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def scalar(acc: EventAccumulator, tag: str, step: int) -> float:
    (event,) = [e for e in acc.Scalars(tag) if e.step == step]
    return event.value


def histogram(acc: EventAccumulator, tag: str, step: int):
    (event,) = [e for e in acc.Histograms(tag) if e.step == step]
    return event.histogram_value


def keep_router_logits(model) -> dict[int, list[torch.Tensor]]:
    kept = {m.layer_id: [] for m in tied_moe_layers(model)}
    for m in tied_moe_layers(model):
        m.router.gate.register_forward_hook(lambda mod, inp, out, i=m.layer_id: kept[i].append(out.detach()))
    return kept


def test_logged_statistics_match_the_routing(tmp_path, world_of_one):
    model = build_model("qwen3", TIED_2, expert_bias_rate=1e-3)
    layers = tied_moe_layers(model)
    with torch.no_grad():
        layers[2].expert_bias.copy_(torch.arange(EXPERTS, dtype=torch.float32) * 1e-3)
    logits = keep_router_logits(model)
    p = processor(tmp_path, model)

    lb, z = {m.layer_id: [] for m in layers}, {m.layer_id: [] for m in layers}
    for seed in (1, 2):  # two microbatches of one step
        model(tokens(seed)).float().square().mean().backward()
        for m in layers:
            lb[m.layer_id].append(m.routing_losses[0].item())
            z[m.layer_id].append(m.routing_losses[1].item())
    counts = {m.layer_id: m.tokens_per_expert.clone() for m in layers}  # torchtitan's own count
    for m in layers:
        # Per layer, tokens per expert sum to tokens x top_k.
        assert m.stats_tokens_per_expert.sum().item() == 2 * BATCH * SEQ * TOP_K
        torch.testing.assert_close(m.stats_tokens_per_expert, counts[m.layer_id])
        assert m.stats_routing[ROUTING_STATS.index("tokens")].item() == 2 * BATCH * SEQ
    log_step(p, 1)
    p.close()

    acc = events(tmp_path)
    for tag in ("loss_metrics/global_avg_loss", "grad_norm", "throughput(tps)", "mfu(%)", "memory/max_reserved(GiB)"):
        assert tag in acc.Tags()["scalars"], tag  # torchtitan's tags are unchanged
    assert scalar(acc, "loss_metrics/global_avg_loss", 1) == pytest.approx(3.0)

    aux = []
    for m in layers:
        i = m.layer_id
        h = histogram(acc, f"moe/layer_{i}/tokens_per_expert", 1)
        assert h.num == 2 * BATCH * SEQ * TOP_K
        assert sum(h.bucket) == pytest.approx(1.0)
        torch.testing.assert_close(torch.tensor(h.bucket, dtype=torch.float64) * h.num, counts[i].double())
        c = counts[i]
        assert scalar(acc, f"moe/layer_{i}/load_imbalance", 1) == pytest.approx((c.max() / c.mean()).item(), rel=1e-6)
        probs = F.softmax(torch.cat(logits[i]).float(), dim=-1)
        entropy = -(probs * probs.log()).sum(-1).mean().item()
        assert scalar(acc, f"moe/layer_{i}/router_entropy", 1) == pytest.approx(entropy, rel=1e-5)
        assert 0 < entropy <= math.log(EXPERTS)
        assert scalar(acc, f"moe/layer_{i}/aux_loss", 1) == pytest.approx(sum(lb[i]) / 2, rel=1e-6)
        assert scalar(acc, f"moe/layer_{i}/z_loss", 1) == pytest.approx(sum(z[i]) / 2, rel=1e-6)
        aux.append(sum(lb[i]) / 2)
        expected_norm = m.expert_bias.norm().item()
        assert scalar(acc, f"moe/layer_{i}/expert_bias_norm", 1) == pytest.approx(expected_norm, abs=1e-7)
    assert scalar(acc, "moe/layer_2/expert_bias_norm", 1) > 0
    assert scalar(acc, "moe/aux_loss", 1) == pytest.approx(sum(aux) / len(aux), rel=1e-6)
    assert "moe/z_loss" in acc.Tags()["scalars"]

    overlaps = {t for t in acc.Tags()["scalars"] if t.endswith("/usage_overlap")}
    assert overlaps == {f"moe/bank_{b}/usage_overlap" for b in TIED_BANKS}  # tied banks only
    for b, (a, c) in TIED_BANKS.items():
        assert scalar(acc, f"moe/bank_{b}/usage_overlap", 1) == pytest.approx(usage_overlap(counts[a], counts[c]), rel=1e-6)

    for m in layers:  # reset after logging
        assert m.stats_tokens_per_expert.abs().sum() == 0 and m.stats_routing.abs().sum() == 0


def test_log_steps_cover_the_forwards_since_the_previous_one(tmp_path, world_of_one):
    model = build_model("olmoe", TIED_2)
    p = processor(tmp_path, model)
    model(tokens(1))
    log_step(p, 1)
    for seed in (2, 3, 4):
        model(tokens(seed))
    log_step(p, 10)
    p.close()
    acc = events(tmp_path)
    for step, forwards in ((1, 1), (10, 3)):
        assert histogram(acc, "moe/layer_0/tokens_per_expert", step).num == forwards * BATCH * SEQ * TOP_K


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_uniform_routing(tmp_path, world_of_one, score_func):
    """Forced round-robin routing balances the load exactly; equal router logits make
    the routing distribution uniform."""
    args = flavor_args("qwen3", tying=TIED_2)
    args.moe_args._debug_force_load_balance = True
    args.moe_args.score_func = score_func
    model = FAMILIES["qwen3"][0](args)
    with torch.no_grad():
        model.init_weights()
        for m in tied_moe_layers(model):
            m.router.gate.weight.zero_()
    p = processor(tmp_path, model)
    model(tokens())
    log_step(p, 1)
    p.close()
    acc = events(tmp_path)
    for m in tied_moe_layers(model):
        i = m.layer_id
        assert scalar(acc, f"moe/layer_{i}/load_imbalance", 1) == pytest.approx(1.0, abs=1e-6)
        assert scalar(acc, f"moe/layer_{i}/router_entropy", 1) == pytest.approx(math.log(EXPERTS), rel=1e-6)
        assert scalar(acc, f"moe/layer_{i}/aux_loss", 1) == pytest.approx(1.0, abs=1e-6)
        assert histogram(acc, f"moe/layer_{i}/tokens_per_expert", 1).bucket == pytest.approx([1 / EXPERTS] * EXPERTS)
    for b in TIED_BANKS:
        assert scalar(acc, f"moe/bank_{b}/usage_overlap", 1) == pytest.approx(1.0, abs=1e-6)


def test_usage_overlap():
    p = torch.tensor([5.0, 1.0, 0.0, 2.0])
    assert usage_overlap(p, p) == pytest.approx(1.0)  # maximal for identical loads
    assert usage_overlap(p, 3 * p) == pytest.approx(1.0)  # counts or shares alike
    assert usage_overlap(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(0.0, abs=1e-12)
    q = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert usage_overlap(p, q) == pytest.approx(usage_overlap(q, p))
    assert 0 < usage_overlap(p, q) < 1
    # 1 - JSD in bits: m = (0.75, 0.25), JSD = H(m) - (H(p) + H(q)) / 2 = 0.811278 - 0.5.
    h_m = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert usage_overlap(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])) == pytest.approx(1 - (h_m - 0.5))


@pytest.mark.parametrize("early_stop", [False, True])  # torchtitan's default: False, a full recompute
def test_activation_checkpointing_does_not_count_twice(early_stop):
    plain = build_model("qwen3", TIED_2, seed=4)
    checkpointed = build_model("qwen3", TIED_2, seed=4)
    for layer_id, block in checkpointed.layers.named_children():
        checkpointed.layers.register_module(layer_id, checkpoint_wrapper(block, early_stop=early_stop))
    for model in (plain, checkpointed):
        model(tokens()).float().square().mean().backward()
    for a, b in zip(tied_moe_layers(plain), tied_moe_layers(checkpointed)):
        assert a.stats_routing[ROUTING_STATS.index("forwards")].item() == 1
        torch.testing.assert_close(b.stats_tokens_per_expert, a.stats_tokens_per_expert)
        torch.testing.assert_close(b.stats_routing, a.stats_routing)
        # torchtitan's own count does see the recompute.
        torch.testing.assert_close(b.tokens_per_expert, 2 * b.stats_tokens_per_expert)


def test_eval_forwards_are_not_counted_and_init_resets():
    model = build_model("olmoe", TIED_2)
    model.eval()
    model(tokens())
    model.train()
    assert all(m.stats_routing.abs().sum() == 0 for m in tied_moe_layers(model))
    model(tokens())
    assert all(m.stats_routing.abs().sum() > 0 for m in tied_moe_layers(model))
    with torch.no_grad():
        model.init_weights()
    assert all(m.stats_routing.abs().sum() == 0 for m in tied_moe_layers(model))
    assert all(m.stats_tokens_per_expert.abs().sum() == 0 for m in tied_moe_layers(model))
    assert not any("stats_" in k for k in model.state_dict())  # never saved


def test_statistics_are_reduced_with_one_all_reduce(tmp_path, world_of_one, monkeypatch):
    """Two data-parallel ranks that routed the same tokens: counts double, means do not."""
    model = build_model("qwen3", TIED_2)
    p = processor(tmp_path, model)
    calls = []

    def all_reduce(tensor, group=None):
        calls.append(tensor.shape)
        tensor.mul_(2)  # the other rank holds the same statistics

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(p, "_loss_mesh", lambda: type("Mesh", (), {"get_group": lambda self: None})())
    model(tokens())
    local = {m.layer_id: (m.stats_tokens_per_expert.clone(), m.stats_routing.clone()) for m in tied_moe_layers(model)}
    log_step(p, 1)
    p.close()
    assert len(calls) == 1
    acc = events(tmp_path)
    for i, (counts, routing) in local.items():
        h = histogram(acc, f"moe/layer_{i}/tokens_per_expert", 1)
        assert h.num == 2 * BATCH * SEQ * TOP_K
        aux = routing[ROUTING_STATS.index("lb_sum")] / routing[ROUTING_STATS.index("forwards")]
        assert scalar(acc, f"moe/layer_{i}/aux_loss", 1) == pytest.approx(aux.item(), rel=1e-6)
