"""Project model args <-> Hugging Face configs (OlmoeConfig / Qwen3MoeConfig).

Only what both sides can express converts; anything else is refused in one line
(a shared expert, a sigmoid router, sliding-window attention, ...), since a silently
different model is worse than none.
"""

from __future__ import annotations

import os

from ..models.family import routed_moe_args
from ..models.qwen3 import TiedQwen3ModelArgs
from ..tying import TieLayout
from .errors import HFInteropError
from .state_dict import HF_ARCHITECTURES

TESTED_TRANSFORMERS = "5.23.0"
TIED_EXPERTS_KEY = "tied_experts"
"""config.json key of an hf-tied export: ``{"banks": [{"layers": [...], "num_experts": N}, ...]}``."""


def require_transformers():
    """The transformers module, if it is a supported version (>= 5: its configs carry
    ``rope_parameters`` and its models fuse the experts of a layer in memory)."""
    try:
        import transformers
    except ImportError:
        raise HFInteropError(
            f"transformers is not installed: pip install 'tiedmoe_titan[hf]' (transformers=={TESTED_TRANSFORMERS})"
        ) from None
    if int(transformers.__version__.split(".")[0]) < 5:
        raise HFInteropError(
            f"transformers {transformers.__version__} is installed; the Hugging Face interop needs transformers >= 5 "
            f"(tested with {TESTED_TRANSFORMERS}): pip install 'tiedmoe_titan[hf]'"
        )
    return transformers


def _refuse_unless(ok: bool, what: str, family: str) -> None:
    if not ok:
        raise HFInteropError(f"{what}: Hugging Face's {HF_ARCHITECTURES[family][1]} cannot express it")


def hf_config(family: str, args: TiedQwen3ModelArgs, layout: TieLayout, banks_once: bool):
    """The Hugging Face config of a project model. ``banks_once`` (hf-tied) adds the tie
    map; without it (hf-untied) every bank must hold the same number of experts."""
    transformers = require_transformers()
    moe = args.moe_args
    _refuse_unless(args.moe_enabled, "a model without MoE layers", family)
    _refuse_unless(moe.num_shared_experts == 0, f"moe num_shared_experts = {moe.num_shared_experts}", family)
    _refuse_unless(moe.score_func == "softmax", f"moe score_func = {moe.score_func!r}", family)
    _refuse_unless(moe.route_scale == 1.0, f"moe route_scale = {moe.route_scale}", family)
    _refuse_unless(not moe.gate_bias, "a router gate with a bias", family)
    _refuse_unless(moe.num_expert_groups is None, "node-limited routing (moe num_expert_groups)", family)
    _refuse_unless(not moe.score_before_experts, "routing scores applied before the experts", family)
    _refuse_unless(args.qk_norm, "attention without QK-norm", family)
    if family == "olmoe":
        # OLMoE's q/k norms are sized from hidden_size / num_attention_heads.
        _refuse_unless(
            args.head_dim * args.n_heads == args.dim, f"head_dim {args.head_dim} x n_heads {args.n_heads} != dim {args.dim}", family
        )
    sizes = sorted({bank.num_experts for bank in layout.banks})
    if not banks_once and len(sizes) > 1:
        raise HFInteropError(
            f"the banks hold {' and '.join(map(str, sizes))} experts (tying.bank_expansion = {layout.config.bank_expansion}): "
            "a standard Hugging Face config has one expert count for all layers; export --format hf-tied, which carries each bank's size"
        )
    model_type, architecture = HF_ARCHITECTURES[family]
    fields = dict(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads or args.n_heads,
        max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(args.rope_theta)},
        tie_word_embeddings=args.enable_weight_tying,
        num_experts=layout.banks[0].num_experts,
        num_experts_per_tok=moe.top_k,
        norm_topk_prob=moe.route_norm,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=args.eos_id if args.eos_id < args.vocab_size else None,
        architectures=[architecture],
    )
    if family == "olmoe":
        fields.update(intermediate_size=args.moe_inter_dim)
    else:
        fields.update(
            intermediate_size=args.hidden_dim, moe_intermediate_size=args.moe_inter_dim, head_dim=args.head_dim,
            decoder_sparse_step=1, mlp_only_layers=[],
        )
    config = transformers.AutoConfig.for_model(model_type, **fields)
    if banks_once:
        setattr(config, TIED_EXPERTS_KEY, {"banks": [{"layers": list(b.layers), "num_experts": b.num_experts} for b in layout.banks]})
    return config


def read_hf_config(hf_dir: str):
    """The config of a Hugging Face model folder, via transformers (which also reads
    the pre-5.x layout of config.json)."""
    transformers = require_transformers()
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise HFInteropError(f"{hf_dir} has no config.json: give the folder of a Hugging Face model (save_pretrained output)")
    try:
        return transformers.AutoConfig.from_pretrained(hf_dir)
    except (ValueError, KeyError, OSError) as e:
        raise HFInteropError(f"{hf_dir}/config.json cannot be read by transformers {transformers.__version__}: {str(e).splitlines()[0]}") from None


def model_args_of_hf(config, hf_dir: str) -> tuple[str, TiedQwen3ModelArgs]:
    """(family, model args) of a Hugging Face OLMoE or Qwen3-MoE config."""
    families = {model_type: family for family, (model_type, _) in HF_ARCHITECTURES.items()}
    family = families.get(config.model_type)
    if family is None:
        supported = ", ".join(f"{t} ({a})" for t, a in HF_ARCHITECTURES.values())
        raise HFInteropError(f"{hf_dir}: model_type {config.model_type!r} is not supported: tiedmoe-import reads {supported}")
    where = f"{hf_dir}/config.json"
    rope = config.rope_parameters or {}
    for ok, what in (
        (config.hidden_act == "silu", f"hidden_act = {config.hidden_act!r}"),
        (not config.attention_bias, "attention_bias = true"),
        (rope.get("rope_type", "default") == "default", f"rope_type = {rope.get('rope_type')!r}"),
        (getattr(config, "clip_qkv", None) is None, "clip_qkv is set"),
        (not getattr(config, "use_sliding_window", False), "use_sliding_window = true"),
        (not getattr(config, "mlp_only_layers", None), "mlp_only_layers (dense layers) is set"),
        (getattr(config, "decoder_sparse_step", 1) == 1, "decoder_sparse_step != 1 (dense layers)"),
    ):
        if not ok:
            raise HFInteropError(f"{where}: {what}, which the {family} family cannot express")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    eos = config.eos_token_id
    moe_args = routed_moe_args(config.num_experts, config.num_experts_per_tok, route_norm=config.norm_topk_prob)
    args = TiedQwen3ModelArgs(
        vocab_size=config.vocab_size,
        dim=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        hidden_dim=config.intermediate_size,
        norm_eps=config.rms_norm_eps,
        rope_theta=rope.get("rope_theta", TiedQwen3ModelArgs.rope_theta),
        qk_norm=True,
        max_seq_len=config.max_position_embeddings,
        eos_id=eos if isinstance(eos, int) else TiedQwen3ModelArgs.eos_id,
        enable_weight_tying=config.tie_word_embeddings,
        moe_enabled=True,
        moe_inter_dim=config.moe_intermediate_size if family == "qwen3" else config.intermediate_size,
        moe_args=moe_args,
    )
    return family, args
