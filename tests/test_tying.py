"""TieLayout: groups, anchors, expansion, narrow control, and one-line errors."""

import math

import pytest

from tiedmoe_titan.tying import TieConfig, TieConfigError, TieLayout


def layout(n_layers=16, experts=64, top_k=8, groups=None, **cfg):
    return TieLayout.build(TieConfig(**cfg), list(range(n_layers)), experts, top_k, groups)


def test_untied_is_one_bank_per_layer():
    lay = layout()
    assert [b.layers for b in lay.banks] == [(i,) for i in range(16)]
    assert not lay.is_tied and lay.total_bank_experts == 16 * 64


def test_paper_layout_anchors_and_short_last_group():
    lay = layout(n_layers=15, group_size=4, untied_first=2, untied_last=2)
    assert [b.layers for b in lay.banks] == [(0,), (1,), (2, 3, 4, 5), (6, 7, 8, 9), (10, 11, 12), (13,), (14,)]
    assert lay.num_shared_banks == 3 and lay.num_unshared_moe_layers == 4
    assert all(lay.owns_bank(b.layers[0]) and not any(lay.owns_bank(x) for x in b.layers[1:]) for b in lay.banks)


def test_expansion_only_for_tied_region():
    lay = layout(group_size=4, untied_first=2, untied_last=2, bank_expansion=4)
    assert [b.num_experts for b in lay.banks] == [64, 64, 256, 256, 256, 64, 64]
    # G=4 with 4x expansion stores about as many experts as the untied model.
    assert lay.total_bank_experts == 4 * 64 + 3 * 256


def test_narrow_control_matches_tied_expert_count():
    tied = layout(group_size=4, untied_first=2, untied_last=2)
    narrow = layout(group_size=4, untied_first=2, untied_last=2, narrow_control=True)
    assert not narrow.is_tied
    assert [b.num_experts for b in narrow.banks] == [28] * 16  # 64 * 7 / 16
    assert narrow.total_bank_experts == tied.total_bank_experts


def test_lr_scales():
    for mode, expected in [("none", 1.0), ("inv_sqrt_g", 0.5), ("inv_g", 0.25)]:
        lay = layout(group_size=4, untied_first=2, untied_last=2, bank_lr_scale=mode)
        assert lay.lr_scale(lay.bank_of(3)) == pytest.approx(expected)
        assert lay.lr_scale(lay.bank_of(0)) == 1.0  # anchors keep the base LR
    short = layout(n_layers=15, group_size=4, untied_first=2, untied_last=2, bank_lr_scale="inv_sqrt_g")
    assert short.lr_scale(short.bank_of(10)) == pytest.approx(1 / math.sqrt(3))  # the shorter last group


@pytest.mark.parametrize(
    "cfg, extra, field",
    [
        (dict(group_size=0), {}, "tying.group_size"),
        (dict(group_size=2, untied_first=-1), {}, "tying.untied_first"),
        (dict(group_size=2, untied_first=8, untied_last=7), {}, "tying.untied_first + tying.untied_last"),
        (dict(bank_expansion=2), {}, "tying.bank_expansion"),
        (dict(group_size=2, bank_expansion=0), {}, "tying.bank_expansion"),
        (dict(group_size=2, bank_lr_scale="half"), {}, "tying.bank_lr_scale"),
        (dict(narrow_control=True), {}, "tying.narrow_control"),
        # top-k larger than a bank: the narrow control of G=8 leaves 64*4/16=16 < 24 experts per layer.
        (dict(group_size=8, untied_first=1, untied_last=1, narrow_control=True), dict(top_k=24), "top_k"),
        (dict(group_size=2, bank_expansion=1.5), {}, "tying.bank_expansion"),
        # a bank that group-limited routing cannot split: the narrow control's 28 experts into 8 groups.
        (dict(group_size=4, untied_first=2, untied_last=2, narrow_control=True), dict(groups=8), "num_expert_groups"),
    ],
)
def test_bad_config_is_one_clear_line(cfg, extra, field):
    with pytest.raises(TieConfigError) as err:
        layout(**extra, **cfg)
    message = str(err.value)
    assert field in message and "\n" not in message
