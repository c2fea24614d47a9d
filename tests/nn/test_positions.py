import math

import pytest
import torch

from retrolm.nn import AbsolutePositions, sinusoids


def test_sinusoids_follow_the_formula():
    d, p = 8, 5
    got = sinusoids(7, d)[p]
    freqs = [10000 ** (-i / (d // 2 - 1)) for i in range(d // 2)]
    want = [math.sin(p * w) for w in freqs] + [math.cos(p * w) for w in freqs]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)
    assert sinusoids(3, 5)[:, -1].eq(0).all()  # odd width: a zero feature at the end


@pytest.mark.parametrize("kind", ["sinusoidal", "learned"])
def test_an_offset_continues_the_positions(kind):
    pos = AbsolutePositions(kind, 16, 6)
    assert torch.equal(pos(4, offset=5), pos(12)[5:9])
    assert pos(3).shape == (3, 6)
    with pytest.raises(ValueError, match="positions 14 ... 16 exceed max_len=16"):
        pos(3, offset=14)


def test_learned_positions_are_parameters_and_sinusoids_are_not():
    assert [n for n, _ in AbsolutePositions("learned", 4, 2).named_parameters()] == ["table.weight"]
    sin = AbsolutePositions("sinusoidal", 4, 2)
    assert list(sin.parameters()) == [] and sin.state_dict() == {}
    with pytest.raises(ValueError, match="unknown position kind 'rope'"):
        AbsolutePositions("rope", 4, 2)
