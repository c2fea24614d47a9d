"""Hierarchical Transformer config: every option has an effect or is rejected, validation
messages, presets, and the seed README's snippets at reduced sizes."""

import dataclasses
import json

import pytest
import torch
from tests.models.test_hierarchical import one_thread  # noqa: F401 (autouse fixture)

from retrolm import HierarchicalConfig, HierarchicalTransformer
from retrolm.models.hierarchical.config import PRESETS

V, SEQ = 17, 32
BASE = dict(
    num_tokens=V, dim=16, depth=2, dim_head=8, heads=2, seq_len=SEQ,
    hierarchies=(1, 2, 8), window_sizes=(4, 6, None),
)  # fmt: skip


def run(seed=0, **overrides):
    torch.manual_seed(seed)
    model = HierarchicalTransformer(**{**BASE, **overrides}).double()
    ids = torch.arange(SEQ + 1).remainder(5)[None].repeat(2, 1)  # labels include token 0
    ids[1] = torch.randint(0, V, (SEQ + 1,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        loss, parts = model(ids, return_loss=True)
    n_params = sum(p.numel() for p in model.parameters())
    return n_params, model(ids[:, :-1]).detach(), loss, parts


# (option, changed value): each must change the parameter count, the logits or the loss
CHANGES = [
    ("num_tokens", 19),
    ("dim", (16, 24, 16)),
    ("depth", 1),
    ("dim_head", 4),
    ("heads", 1),
    ("ff_mult", 2),
    ("hierarchies", (1, 2, 4)),
    ("window_sizes", (2, 6, None)),
    ("window_sizes", (None, 6, None)),
    ("window_sizes", (0, 6, None)),
    ("hierarchical_stride", (1, 2, 4)),
    ("hierarchy_merge_all", True),
    ("predict_hierarchy", 2),
    ("predict_use_all_hierarchy", True),
    ("recon_loss_weight", 0.5),
    ("recon_loss_weight", 0.0),
    ("hierarchical_ar_loss_weight", 1.0),
    ("hierarchical_ar_loss_weight", 0.0),
    ("ignore_index", 3),
]


@pytest.mark.parametrize("option,value", CHANGES)
def test_every_option_has_an_effect(option, value):
    p0, logits0, loss0, _ = run()
    p1, logits1, loss1, _ = run(**{option: value})
    same_logits = logits0.shape == logits1.shape and torch.allclose(logits0, logits1)
    assert p0 != p1 or not same_logits or not torch.allclose(loss0, loss1), option


def test_options_tested_elsewhere_exist():
    # detach_ar_target (gradients), use_flash_attn (attention path), seq_len (length and
    # window checks) are tested in test_hierarchical.py and below
    fields = {f.name for f in dataclasses.fields(HierarchicalConfig)}
    covered = {o for o, _ in CHANGES} | {"detach_ar_target", "use_flash_attn", "seq_len"}
    assert fields == covered, fields ^ covered


INVALID = [
    (dict(hierarchies=(1, 3)), r"hierarchies must be unique powers of 2, got \(1, 3\)"),
    (dict(hierarchies=(2, 2), window_sizes=None), r"unique powers of 2, got \(2, 2\)"),
    (dict(dim=(16, 16)), r"dim=\(16, 16\) has 2 values but there are 3 hierarchies"),
    (dict(window_sizes=(4, 6)), r"window_sizes=\(4, 6\) has 2 values"),
    (dict(heads=(2, 2, 2, 2)), r"heads=\(2, 2, 2, 2\) has 4 values"),
    (dict(hierarchical_stride=(1, 4, 1)), r"hierarchical_stride=4 for hierarchy 2 must be a power"),
    (dict(hierarchical_stride=(1, 1, 3)), r"hierarchical_stride=3 for hierarchy 8"),
    (dict(hierarchical_stride=(2, 1, 1), hierarchies=(2, 4, 8)), r"predicting hierarchy 2 has "),
    (dict(window_sizes=(4, 6, 5)), r"window size 5 for hierarchy 8 is larger than .* = 4"),
    (dict(window_sizes=(33, 6, None)), r"window size 33 for hierarchy 1 is larger"),
    (dict(window_sizes=(-1, 6, None)), r"window size -1 for hierarchy 1 must be None, 0 or > 0"),
    (dict(predict_hierarchy=4), r"predict_hierarchy=4 is not one of the hierarchies \(1, 2, 8\)"),
    (dict(dim_head=5), r"dim_head must be even"),
    (dict(hierarchies=1, window_sizes=None, hierarchy_merge_all=True), r"at least two"),
    (dict(hierarchies=1, window_sizes=None, predict_use_all_hierarchy=True), r"at least two"),
    (dict(recon_loss_weight=-0.1), r"recon_loss_weight must be >= 0, got -0.1"),
    (dict(depth=0), r"depth=0 must be a positive int"),
    (dict(ff_mult=0), r"ff_mult must be > 0"),
]


@pytest.mark.parametrize("overrides,match", INVALID)
def test_invalid_configs_raise_with_their_rule(overrides, match):
    with pytest.raises(ValueError, match=match):
        HierarchicalTransformer(**{**BASE, **overrides})


def test_seq_len_bounds_windows_and_inputs():
    HierarchicalConfig(**{**BASE, "seq_len": 64, "window_sizes": (4, 6, 8)})  # 64 / 8 = 8
    with pytest.raises(ValueError, match="larger than that hierarchy's length"):
        HierarchicalConfig(**{**BASE, "seq_len": 56, "window_sizes": (4, 6, 8)})


def test_presets_and_dict_round_trip():
    for name in PRESETS:
        cfg = HierarchicalConfig.from_name(name)
        again = HierarchicalConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg
    tiny = HierarchicalTransformer(config=HierarchicalConfig.from_name("hier-tiny"))
    assert tiny(torch.zeros(1, 10, dtype=torch.long)).shape == (1, 10, 256)
    assert HierarchicalConfig.from_name("hier-tiny", depth=1).depth == 1
    with pytest.raises(ValueError, match="unknown hierarchical preset 'nope'"):
        HierarchicalConfig.from_name("nope")
    with pytest.raises(ValueError, match=r"unknown HierarchicalConfig fields \['bogus'\]"):
        HierarchicalConfig.from_dict({"bogus": 1})


# ---- the seed README's snippets, as written, at reduced sizes ----


def test_readme_three_hierarchies():
    model = HierarchicalTransformer(
        num_tokens=256,  # number of tokens
        dim=32,  # model dimensions
        depth=2,  # depth
        dim_head=16,  # dimension per attention head
        heads=2,  # attention heads
        seq_len=128,  # sequence lengths
        hierarchies=(1, 2, 8),
        window_sizes=(32, 64, None),
    )
    ids = torch.randint(0, 256, (1, 128))
    loss, _ = model(ids, return_loss=True)
    loss.backward()
    logits = model(ids)
    assert logits.shape == (1, 128, 256)


def test_readme_non_hierarchical():
    model = HierarchicalTransformer(
        num_tokens=256, dim=32, depth=2, dim_head=16, heads=2, seq_len=128,
        hierarchies=1, window_sizes=None,
    )  # fmt: skip
    assert len(model.merges) == 0 and len(model.recon_heads) == 0
    ids = torch.randint(0, 256, (1, 128))
    loss, (ce, recon, ar) = model(ids, return_loss=True)
    torch.testing.assert_close(loss, ce)


def test_readme_complex_config_and_generate():
    model = HierarchicalTransformer(
        num_tokens=256,
        dim=(16, 24, 32, 48),
        depth=2,
        seq_len=128,
        use_flash_attn=True,
        ff_mult=(2, 2, 4, 4),
        dim_head=(8, 8, 16, 16),
        heads=(1, 2, 2, 2),
        hierarchies=(1, 2, 4, 16),
        hierarchical_stride=(1, 1, 1, 8),
        window_sizes=(16, 32, 32, None),
    )
    ids = torch.randint(0, 256, (1, 128))
    loss, _ = model(ids, return_loss=True)
    loss.backward()
    sampled = model.generate(ids[:, :100], 28)
    assert sampled.shape == (1, 28)
