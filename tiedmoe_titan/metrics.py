"""Metrics: torchtitan's ``MetricsProcessor`` plus routing statistics under ``moe/``.

Everything torchtitan logs (``loss_metrics/global_avg_loss``, ``grad_norm``,
``throughput(tps)``, ``mfu(%)``, ``memory/...``; on CPU the memory numbers are the
process's peak RSS, see ``tiedmoe_titan.compat``) keeps its tag and its place,
``{dump_folder}/{save_tb_folder}/{YYYYmmdd-HHMM}/`` on the metrics rank. On every log
step ``TiedMetricsProcessor`` adds, from the statistics every ``TiedMoE`` accumulates
on device since the previous log step (training forwards only: activation-checkpoint
recomputes and eval-mode forwards are not counted):

=====================================  ==============================================
``moe/layer_{i}/tokens_per_expert``    histogram (TensorBoard only): one bucket per
                                       expert, centred on its index, holding its share
                                       of the layer's assignments (the buckets sum to
                                       1; ``num`` is the number of assignments,
                                       tokens x top_k)
``moe/layer_{i}/load_imbalance``       max / mean of assignments per expert (1 =
                                       perfectly balanced)
``moe/layer_{i}/router_entropy``       mean over tokens of the entropy, in nats, of the
                                       routing distribution (softmax probabilities, or
                                       sigmoid scores normalised to sum 1); log(E) when
                                       uniform
``moe/layer_{i}/aux_loss``             mean over forwards of the layer's load-balancing
                                       loss (1.0 when balanced, see ``routing_losses``)
``moe/layer_{i}/z_loss``               mean over forwards of the layer's router z-loss
``moe/layer_{i}/expert_bias_norm``     L2 norm of the expert bias (layers that have one)
``moe/bank_{b}/usage_overlap``         banks shared by several layers: mean over pairs
                                       of those layers of ``usage_overlap`` of their
                                       expert-load distributions (1 = identical)
``moe/aux_loss``, ``moe/z_loss``       means over MoE layers of the per-layer values
                                       (the layer average the training loss uses)
=====================================  ==============================================

``i`` is the transformer block's index, ``b`` the bank's index in the ``TieLayout``.
Averages are over data-parallel (and context-parallel) ranks too: the statistics of
all layers are concatenated into one tensor and summed with a single all-reduce over
torchtitan's ``loss`` mesh, followed by a single copy to the host. Every rank resets
its statistics after a log step.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable

import torch
from torch import nn
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.tools.logging import logger

from .compat import tensorboard_loggers
from .models.moe import ROUTING_STATS, TiedMoE, tied_moe_layers

_ENTROPY, _TOKENS, _LB, _Z, _FORWARDS = (ROUTING_STATS.index(k) for k in ("entropy_sum", "tokens", "lb_sum", "z_sum", "forwards"))


def usage_overlap(p: torch.Tensor, q: torch.Tensor) -> float:
    """Overlap of two expert-load distributions: ``1 - JSD(p, q)``, the Jensen-Shannon
    divergence in bits.

    ``p`` and ``q`` are non-negative loads over the same experts (counts or shares;
    each is normalised to sum 1). JSD(p, q) = H(m) - (H(p) + H(q)) / 2 with
    m = (p + q) / 2 and H the entropy in bits, so the overlap lies in [0, 1]: 1 exactly
    when the distributions are identical, 0 when the two layers use disjoint experts.
    It is symmetric and, unlike the KL divergence, finite when an expert is unused.
    """
    p = p.double() / p.double().sum()
    q = q.double() / q.double().sum()

    def entropy_bits(d: torch.Tensor) -> torch.Tensor:
        return -torch.special.xlogy(d, d).sum() / math.log(2)

    jsd = entropy_bits((p + q) / 2) - (entropy_bits(p) + entropy_bits(q)) / 2
    return float(min(1.0, max(0.0, 1.0 - jsd.item())))


def _unique_moe_layers(model_parts: Iterable[nn.Module]) -> list[TiedMoE]:
    layers = {id(m): m for part in model_parts for m in tied_moe_layers(part)}
    return sorted(layers.values(), key=lambda m: m.layer_id)


class TiedMetricsProcessor(MetricsProcessor):
    """torchtitan's metrics processor, plus the routing statistics of the MoE layers.

    ``log`` is called by the trainer on every rank at each ``should_log`` step; it
    reduces and logs the MoE statistics (a collective: every rank of a data-parallel
    group takes part), then logs torchtitan's metrics with the MoE scalars among them.
    """

    def log(
        self,
        step: int,
        global_avg_loss: float,
        global_max_loss: float,
        grad_norm: float,
        extra_metrics: dict[str, Any] | None = None,
    ):
        moe_scalars = self.log_moe(step)
        if moe_scalars:
            extra_metrics = {**(extra_metrics or {}), **moe_scalars}
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra_metrics)

    def log_moe(self, step: int) -> dict[str, float]:
        """Reduce the MoE statistics over data-parallel ranks, write the expert-load
        histograms, reset the statistics and return the ``moe/`` scalars (the same on
        every rank of a data-parallel group)."""
        layers = _unique_moe_layers(self.model_parts or [])
        if not layers:
            return {}
        stats = self._reduced_statistics(layers)
        for m in layers:
            m.reset_statistics()
        metrics, histograms = moe_metrics(layers, stats)

        for tb in tensorboard_loggers(self.logger):
            for name, counts in histograms.items():
                tag = name if tb.tag is None else f"{tb.tag}/{name}"
                _add_expert_histogram(tb.writer, tag, counts, step)
        if "moe/aux_loss" in metrics:
            imbalance = max(v for k, v in metrics.items() if k.endswith("/load_imbalance"))
            logger.info(
                f"moe: aux_loss {metrics['moe/aux_loss']:.4f}  z_loss {metrics['moe/z_loss']:.4f}  "
                f"max load_imbalance {imbalance:.3f}"
            )
        return metrics

    def _reduced_statistics(self, layers: list[TiedMoE]) -> list[tuple[torch.Tensor, torch.Tensor, float | None]]:
        """Per layer: (assignments per expert, ROUTING_STATS, expert-bias norm or None),
        summed over the data/context-parallel ranks, on the host in float64."""
        flat = torch.cat([t for m in layers for t in (m.stats_tokens_per_expert, m.stats_routing)]).double()
        loss_mesh = self._loss_mesh()
        if loss_mesh is not None:
            torch.distributed.all_reduce(flat, group=loss_mesh.get_group())
        # The expert bias is the same on every data-parallel rank: not reduced.
        biases = [m.expert_bias for m in layers if m.expert_bias is not None]
        if biases:
            flat = torch.cat([flat, torch.stack([b.detach().float().norm() for b in biases]).to(flat)])
        host = flat.cpu()  # the only host sync
        out, offset, bias_index = [], 0, len(host) - len(biases)
        for m in layers:
            e = m.stats_tokens_per_expert.numel()
            counts, routing = host[offset : offset + e], host[offset + e : offset + e + len(ROUTING_STATS)]
            offset += e + len(ROUTING_STATS)
            bias_norm = None
            if m.expert_bias is not None:
                bias_norm, bias_index = float(host[bias_index]), bias_index + 1
            out.append((counts, routing, bias_norm))
        return out

    def _loss_mesh(self):
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or not self.parallel_dims.dp_cp_enabled:
            return None
        return self.parallel_dims.get_optional_mesh("loss")


def moe_metrics(
    layers: list[TiedMoE], stats: list[tuple[torch.Tensor, torch.Tensor, float | None]]
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The ``moe/`` scalars and the per-layer assignment counts for the histograms,
    from reduced statistics. Layers that routed no token since the last log are left out."""
    metrics: dict[str, float] = {}
    histograms: dict[str, torch.Tensor] = {}
    aux, z = [], []
    loads_of_bank: dict[int, list[torch.Tensor]] = defaultdict(list)
    for m, (counts, routing, bias_norm) in zip(layers, stats):
        prefix = f"moe/layer_{m.layer_id}"
        if bias_norm is not None:
            metrics[f"{prefix}/expert_bias_norm"] = bias_norm
        if routing[_TOKENS] <= 0 or counts.sum() <= 0:
            continue
        histograms[f"{prefix}/tokens_per_expert"] = counts
        metrics[f"{prefix}/load_imbalance"] = float(counts.max() / counts.mean())
        metrics[f"{prefix}/router_entropy"] = float(routing[_ENTROPY] / routing[_TOKENS])
        metrics[f"{prefix}/aux_loss"] = float(routing[_LB] / routing[_FORWARDS])
        metrics[f"{prefix}/z_loss"] = float(routing[_Z] / routing[_FORWARDS])
        aux.append(metrics[f"{prefix}/aux_loss"])
        z.append(metrics[f"{prefix}/z_loss"])
        loads_of_bank[m.experts.bank_index].append(counts)
    for bank, loads in sorted(loads_of_bank.items()):
        if len(loads) > 1:
            pairs = [usage_overlap(a, b) for i, a in enumerate(loads) for b in loads[i + 1 :]]
            metrics[f"moe/bank_{bank}/usage_overlap"] = sum(pairs) / len(pairs)
    if aux:
        metrics["moe/aux_loss"] = sum(aux) / len(aux)
        metrics["moe/z_loss"] = sum(z) / len(z)
    return metrics, histograms


def _add_expert_histogram(writer, tag: str, counts: torch.Tensor, step: int) -> None:
    """One bucket per expert, [i - 0.5, i + 0.5), holding the expert's share of the
    assignments; num / sum / sum_squares describe the assignments' expert indices."""
    counts = counts.double()
    index = torch.arange(len(counts), dtype=torch.float64)
    writer.add_histogram_raw(
        tag,
        min=-0.5,
        max=len(counts) - 0.5,
        num=float(counts.sum()),
        sum=float((counts * index).sum()),
        sum_squares=float((counts * index * index).sum()),
        bucket_limits=(index + 0.5).tolist(),
        bucket_counts=(counts / counts.sum()).tolist(),
        global_step=step,
    )


def build_tied_metrics_processor(
    job_config: JobConfig,
    parallel_dims: ParallelDims,
    model_args: Any = None,
    tag: str | None = None,
) -> TiedMetricsProcessor:
    """``TrainSpec.build_metrics_processor_fn`` of the tied families (torchtitan calls
    it as ``fn(job_config, parallel_dims, model_args)``)."""
    return TiedMetricsProcessor(job_config, parallel_dims, tag)
