import pytest
import torch

from retrolm.sampling import filter_logits, sample_next


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))


def test_top_k_keeps_exactly_k():
    logits = torch.randn(3, 20)
    out = filter_logits(logits, top_k=5)
    assert (out.isfinite().sum(-1) == 5).all()
    assert torch.equal(out.argmax(-1), logits.argmax(-1))


def test_top_p_is_mass_kept():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = filter_logits(probs.log(), top_p=0.75)
    # 0.5 < 0.75, 0.5+0.3 >= 0.75 -> the first two are kept, the rest dropped
    assert out.isfinite().tolist() == [[True, True, False, False]]
    assert filter_logits(probs.log(), top_p=0.1).isfinite().sum() == 1


def test_sampling_respects_filter():
    g = torch.Generator().manual_seed(0)
    logits = torch.zeros(1, 10)
    logits[0, 3] = 5.0
    draws = {int(sample_next(logits, top_k=1, generator=g)) for _ in range(20)}
    assert draws == {3}


@pytest.mark.parametrize("kw,match", [({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        filter_logits(torch.randn(1, 5), **kw)


@pytest.mark.parametrize("kw", [{}, {"top_k": 4}, {"top_p": 0.8}, {"top_k": 5, "top_p": 0.7}])
def test_draws_follow_the_filtered_softmax(kw):
    """Empirical frequencies of 40k draws match softmax(filter_logits(logits / T))."""
    torch.manual_seed(0)
    logits = torch.randn(2, 8) * 2
    g = torch.Generator().manual_seed(1)
    n = 20000
    draws = torch.stack(
        [sample_next(logits, temperature=0.7, generator=g, **kw) for _ in range(n)], 1
    )  # (2, n)
    expect = filter_logits(logits / 0.7, **kw).softmax(-1)
    freq = torch.stack([torch.bincount(d, minlength=8) for d in draws]).float() / n
    assert (freq[expect == 0] == 0).all()  # filtered tokens never drawn
    torch.testing.assert_close(freq, expect, rtol=0, atol=0.015)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_after_top_k_equals_scaling_first(temperature):
    """Temperature divides only the k candidates; the draw is the one from logits / T."""
    logits = torch.randn(3, 200, dtype=torch.float64)
    for seed in range(5):
        got = sample_next(
            logits, temperature=temperature, top_k=17, generator=torch.Generator().manual_seed(seed)
        )
        scaled_first = sample_next(
            logits / temperature, top_k=17, generator=torch.Generator().manual_seed(seed)
        )
        assert torch.equal(got, scaled_first)
