import pytest

from retrolm.nn import BlockScale, LayerScale, depth_width_schedule, make_divisible


def _depths(s):
    return [b.depth for b in s]


def _widths(s):
    return [b.width_mult for b in s]


def test_block_scaling_paper_preset():
    # DeLighT presets: 8 blocks, depths 4 ... 8, w_m = 2
    s = depth_width_schedule("block", 8, min_depth=4, max_depth=8, width_mult=2)
    assert _depths(s) == [4, 4, 5, 5, 6, 6, 7, 8]
    assert _widths(s) == [2.0, 2.143, 2.286, 2.429, 2.571, 2.714, 2.857, 3.0]
    assert all(isinstance(b, BlockScale) for b in s)


def test_block_scaling_wikitext103_script():
    s = depth_width_schedule("block", 12, min_depth=4, max_depth=12, width_mult=2)
    assert _depths(s) == [4, 4, 5, 6, 6, 7, 8, 9, 9, 10, 11, 12]
    assert _widths(s)[0] == 2.0 and _widths(s)[-1] == 4.0
    assert _widths(s)[1] == round(2 + 8 / 44, 3)


def test_one_block_gets_the_min_depth():
    assert depth_width_schedule("block", 1, min_depth=4, max_depth=8, width_mult=2) == [
        BlockScale(4, 2.0)
    ]


def test_uniform_scaling_repeats_the_block():
    s = depth_width_schedule("uniform", 3, min_depth=5, width_mult=1.5)
    assert s == [BlockScale(5, 1.5)] * 3
    assert (
        depth_width_schedule("uniform", 2, min_depth=5, max_depth=5, width_mult=2)
        == [BlockScale(5, 2.0)] * 2
    )


def test_block_scales_are_frozen():
    s = depth_width_schedule("uniform", 1, min_depth=4, width_mult=2)
    with pytest.raises(AttributeError):
        s[0].depth = 5


def test_openelm_270m_worked_example():
    s = depth_width_schedule(
        "openelm",
        16,
        model_dim=1280,
        head_dim=64,
        qkv_multipliers=(0.5, 1.0),
        ffn_multipliers=(0.5, 4.0),
        num_gqa_groups=4,
        ffn_dim_divisor=256,
    )
    assert [x.q_heads for x in s] == [12] * 5 + [16] * 7 + [20] * 4
    assert [x.kv_heads for x in s] == [3] * 5 + [4] * 7 + [5] * 4
    ffn = [x.ffn_dim for x in s]
    assert ffn[0] == 768 and ffn[-1] == 5120
    assert ffn == sorted(ffn) and all(f % 256 == 0 for f in ffn)
    # layer 5: alpha = round(0.5 + 0.5 * 5 / 15, 2) = 0.67, 1280 * 0.67 = 857.6: the nearest
    # multiple of 256 is 768 (< 90% of 857.6), so one more divisor: 1024 = 16 heads of 64
    assert s[5] == LayerScale(16, 4, ffn[5])
    assert all(isinstance(x, LayerScale) for x in s)


def test_openelm_constant_multipliers_and_defaults():
    s = depth_width_schedule(
        "openelm", 3, model_dim=512, head_dim=64, qkv_multipliers=1.0, ffn_multipliers=4.0
    )
    assert s == [LayerScale(8, 8, 2048)] * 3  # num_gqa_groups=1: kv heads = q heads


@pytest.mark.parametrize(
    ("value", "divisor", "expected"),
    [
        (640, 256, 768),  # 2.5 divisors: halves round up
        (100, 256, 256),  # at least the divisor
        (857.6, 256, 1024),  # 768 < 0.9 * 857.6: one more divisor
        (806.4, 256, 768),  # 768 >= 0.9 * 806.4: kept
        (1024, 256, 1024),
        (27, 8, 32),  # nearest is 24 (>= 90% of 27? 24 < 24.3): bumped to 32
    ],
)
def test_make_divisible(value, divisor, expected):
    assert make_divisible(value, divisor) == expected


@pytest.mark.parametrize(
    ("kind", "n", "options", "match"),
    [
        ("blocky", 4, {}, r"unknown schedule kind 'blocky'"),
        ("block", 0, {"min_depth": 4, "max_depth": 8, "width_mult": 2}, r"num_layers .* got 0"),
        ("block", 4, {"min_depth": 8, "max_depth": 4, "width_mult": 2}, r"min_depth=8"),
        ("block", 4, {"min_depth": 0, "max_depth": 4, "width_mult": 2}, r"min_depth=0"),
        ("block", 4, {"min_depth": 4, "max_depth": 8, "width_mult": 0}, r"width_mult .* got 0"),
        ("block", 4, {"min_depth": 4, "width_mult": 2}, r"missing \['max_depth'\]"),
        ("block", 4, {"min_depth": 4, "max_depth": 8, "width_mult": 2, "depth": 3}, "'depth'"),
        ("uniform", 4, {"min_depth": 4, "max_depth": 8, "width_mult": 2}, r"max_depth=8"),
        ("openelm", 4, {"model_dim": 64, "head_dim": 16}, r"missing \['qkv_multipliers'"),
        (
            "openelm",
            4,
            {"model_dim": 64, "head_dim": 16, "qkv_multipliers": (1, 2, 3), "ffn_multipliers": 1},
            r"qkv_multipliers .*\(1, 2, 3\)",
        ),
        (
            "openelm",
            4,
            {"model_dim": 64, "head_dim": 0, "qkv_multipliers": 1, "ffn_multipliers": 1},
            r"head_dim .* got 0",
        ),
    ],
)
def test_bad_schedules_are_refused(kind, n, options, match):
    with pytest.raises(ValueError, match=match):
        depth_width_schedule(kind, n, **options)
