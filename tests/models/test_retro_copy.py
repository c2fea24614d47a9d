"""The RETRO neighbour copy head: exact match lengths and mixture against a per-position loop,
causality, cached == full, retrieval off unchanged, and it learns to copy misaligned text."""

import math

import pytest
import torch
import torch.nn.functional as F

from retrolm import RETRO, RetroConfig
from retrolm.train import param_groups

V, M = 256, 4  # retro-tiny: chunk 4, neighbours 2m = 8


def tiny(**kw) -> RETRO:
    torch.manual_seed(0)
    model = RETRO(RetroConfig.from_name("retro-tiny", copy_head=True, **kw)).double().eval()
    with torch.no_grad():  # a non-zero gate on the hidden state, so that path is exercised
        model.copy_head.gate.weight.normal_(0, 0.3)
    return model


def inputs(b=2, n=19, k=2, vocab=6, seed=1):
    """A small alphabet, so the neighbours match the context often and at many lengths."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, vocab, (b, n), generator=g)
    ret = torch.randint(1, vocab, (b, (n + M - 1) // M, k, 2 * M), generator=g)
    return seq, ret


def loop_reference(model, seq, ret, mask):
    """Per position, with Python loops: the match lengths and the mixture of the docstring."""
    head, pad = model.copy_head, model.config.pad_id
    with torch.no_grad():
        hidden = model._decode(seq, ret, mask, None)
        logp = F.log_softmax(model.to_logits(hidden), -1)
    b, n = seq.shape
    out = logp.clone()
    for bi in range(b):
        for i in range(n):
            c = (i + 1) // M - 1
            if c < 0:
                continue
            cands, lengths = [], []
            for kk in range(ret.shape[2]):
                if not mask[bi, c, kk]:
                    continue
                nb = ret[bi, c, kk].tolist()
                for p in range(len(nb)):
                    if nb[p] == pad:
                        continue
                    L = 0
                    while (
                        L < head.max_match
                        and i - L >= 0
                        and p - 1 - L >= 0
                        and nb[p - 1 - L] != pad
                        and seq[bi, i - L] == nb[p - 1 - L]
                    ):
                        L += 1
                    if L:
                        cands.append(nb[p])
                        lengths.append(L)
            if not lengths:
                continue
            w = torch.softmax(head.score.detach()[lengths], 0)
            copy = torch.zeros(V, dtype=torch.float64)
            for tok, wt in zip(cands, w):
                copy[tok] += wt
            gl = head.gate_bias.detach()[max(lengths)] + head.gate(hidden[bi, i]).detach()[0]
            g = torch.sigmoid(gl)
            out[bi, i] = torch.log((1 - g) * logp[bi, i].exp() + g * copy)
    return out


def test_mixture_equals_per_position_loop_float64():
    model = tiny()
    seq, ret = inputs()
    ret[0, 2, 1, 3] = 0  # a pad token inside a neighbour breaks matches through it
    mask = torch.rand(ret.shape[:3], generator=torch.Generator().manual_seed(3)) > 0.3
    fast = model(seq, ret, neighbour_mask=mask)
    ref = loop_reference(model, seq, ret, mask)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(fast, F.log_softmax(model(seq, ret * 0 + 1), -1))  # can fail


def test_match_lengths_count_every_length_and_cap():
    head = tiny(copy_max_match=3).copy_head
    seq = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 9]])
    ret = torch.zeros(1, 2, 1, 2 * M, dtype=torch.long)
    ret[0, 0, 0] = torch.tensor([9, 2, 3, 4, 5, 6, 8, 8])  # read by positions 3..6
    windows, _ = head.context(seq, None)
    cand, length = head.match_lengths(windows, torch.arange(8), ret, ret != 0)
    # position 4 (latest tokens ...3, 4, 5): nb[5] = 6 follows "2 3 4 5" -> capped at 3
    assert length[0, 4].tolist() == [0, 0, 0, 0, 0, 3, 0, 0] and cand[0, 4, 5] == 6
    assert length[0, 3, 4] == 3 and cand[0, 3, 4] == 5  # "2 3 4" -> 5
    assert (length[0, :3] == 0).all()  # the first chunk has no neighbours to read
    assert (length[0, 7] == 0).all()  # position 7 reads chunk 1's neighbours: all padding


def test_output_is_normalised_and_retrieval_off_is_the_decoder():
    model = tiny()
    seq, ret = inputs()
    out = model(seq, ret)
    torch.testing.assert_close(out.logsumexp(-1), torch.zeros(2, 19, dtype=torch.float64))
    plain = RETRO(RetroConfig.from_name("retro-tiny")).double().eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(model(seq), plain(seq), rtol=0, atol=0)
    model.copy_head.enabled = False  # CCA alone: the same weights, the plain logits
    torch.testing.assert_close(model(seq, ret), plain(seq, ret), rtol=0, atol=0)


def test_causality_sweep_tokens():
    model = tiny()
    seq, ret = inputs(n=18)
    base = model(seq, ret)
    for t in range(seq.shape[1]):
        pert = seq.clone()
        pert[:, t:] = pert[:, t:] % 5 + 1  # stays in the small alphabet: matches change
        out = model(pert, ret)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t], base[:, t])


def test_neighbours_of_chunk_u_reach_only_their_window():
    model = tiny(dec_cross_attn_layers=(3,))
    model.copy_head.enabled = True
    n = 18
    seq, ret = inputs(n=n)
    base = model(seq, ret)
    for u in range(n // M):
        pert = ret.clone()
        pert[:, u] = pert[:, u] % 5 + 1
        changed = (model(seq, pert) - base).abs().amax(dim=(0, 2)) > 0
        first = u * M + M - 1
        window = torch.zeros(n, dtype=torch.bool)
        window[first : min(first + M, n)] = True
        if u == n // M - 1:
            window[first:] = True
        assert torch.equal(changed, window), (u, changed.nonzero().flatten().tolist())


@pytest.mark.parametrize("splits", [[19], [1] * 19, [3, 1, 4, 1, 5, 5], [8, 11]])
def test_cached_decoding_equals_full_forward(splits):
    model = tiny()
    seq, ret = inputs(n=19)
    mask = torch.rand(ret.shape[:3], generator=torch.Generator().manual_seed(2)) > 0.25
    full = model(seq, ret, neighbour_mask=mask)
    cache, outs, s = model.init_cache(2), [], 0
    with torch.no_grad():
        for t in splits:
            outs.append(model(seq[:, s : s + t], ret, neighbour_mask=mask, cache=cache))
            s += t
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    kept = model(seq, ret, neighbour_mask=mask, logits_to_keep=3)
    torch.testing.assert_close(kept, full[:, -3:], rtol=1e-12, atol=1e-12)


def test_loss_is_the_mixture_nll_and_gradients_are_finite():
    model = tiny().train()
    seq, ret = inputs(n=20)
    loss = model(seq, ret, return_loss=True)
    logp = model(seq[:, :-1], ret)
    ref = F.nll_loss(logp.flatten(0, 1), seq[:, 1:].flatten())
    torch.testing.assert_close(loss, ref)
    loss.backward()
    head = model.copy_head
    for p in (head.score, head.gate_bias, head.gate.weight):
        assert p.grad is not None and p.grad.isfinite().all() and p.grad.abs().sum() > 0


def test_param_groups_scale_the_copy_head_learning_rate():
    model = tiny()
    groups = param_groups(model, 0.1)
    scaled = [g for g in groups if g["lr_scale"] != 1.0]
    assert len(scaled) == 1 and scaled[0]["weight_decay"] == 0.0
    head = model.copy_head
    assert {id(p) for p in scaled[0]["params"]} == {
        id(head.score),
        id(head.gate_bias),
        id(head.gate.weight),
    }
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_invalid_max_match():
    with pytest.raises(ValueError, match="copy_max_match"):
        RetroConfig.from_name("retro-tiny", copy_head=True, copy_max_match=0)


def test_copy_max_match_has_an_effect():
    seq, ret = inputs()
    a, b = tiny(copy_max_match=1), tiny(copy_max_match=8)
    assert not torch.allclose(a(seq, ret), b(seq, ret))


def _misaligned_batch(g, b=8, n=32):
    """Random text whose neighbours hold the next chunk, shifted by 1-3 tokens."""
    seq = torch.randint(1, V, (b, n + 1), generator=g)
    ret = torch.randint(1, V, (b, n // M, 2, 2 * M), generator=g)
    for bi in range(b):
        for u in range(n // M):
            shift = int(torch.randint(1, 4, (1,), generator=g))
            src = seq[bi, max(0, u * M + M - shift) :][: 2 * M]  # overlaps the chunk's end
            ret[bi, u, 0, shift : shift + len(src)] = src[: 2 * M - shift]
    return seq, ret


def test_learns_to_copy_misaligned_neighbours():
    """Where CCA needs content matching it rarely learns in a short run, the head copies."""
    results = {}
    for copy in (False, True):
        torch.manual_seed(0)
        cfg = RetroConfig.from_name("retro-tiny", copy_head=copy, max_seq_len=32)
        model = RETRO(cfg)
        opt = torch.optim.AdamW(
            [dict(g, lr=3e-3 * g["lr_scale"]) for g in param_groups(model, 0.0)]
        )
        g = torch.Generator().manual_seed(0)
        for _ in range(60):
            seq, ret = _misaligned_batch(g)
            loss = model(seq, ret, return_loss=True)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        seq, ret = _misaligned_batch(torch.Generator().manual_seed(99))
        with torch.no_grad():
            results[copy] = model(seq, ret, return_loss=True).item()
    # uniform guessing is ln 256 = 5.55; the copyable tokens are ~85% of those after chunk 0
    assert results[True] < results[False] - 1.5, results
    assert results[False] > 0.8 * math.log(V), results
