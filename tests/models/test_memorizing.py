"""Memorizing Transformer (``retrolm.models.memorizing``): causality across segments with a
non-empty memory, XL recurrence, document boundaries, streaming == one call, generation."""

import pytest
import torch
from tests.tolerance import assert_close_fp

from retrolm import MemorizingConfig, MemorizingLanguageModel
from retrolm.generation import generate


def lm(**over) -> MemorizingLanguageModel:
    torch.manual_seed(0)
    cfg = MemorizingConfig.from_name("memorizing-tiny", **over)
    model = MemorizingLanguageModel(cfg).double().eval()
    with torch.no_grad():  # gates and biases away from their symmetric init
        for name, p in model.named_parameters():
            if "gate_bias" in name or "rel_pos_bias" in name:
                p.normal_(0, 1.0)
    return model


def ids(b=2, n=40, seed=1, low=3):
    return torch.randint(low, 256, (b, n), generator=torch.Generator().manual_seed(seed))


CASES = {
    "xl-sigmoid": {},
    "xl-joint": dict(gate="joint_softmax"),
    "noxl-sigmoid": dict(xl_max_memories=0),
    "noxl-joint": dict(xl_max_memories=0, gate="joint_softmax"),
    "two-knn": dict(memorizing_layers=(1, 2)),
    "two-knn-shift": dict(memorizing_layers=(1, 2), shift_knn_memories_down=1),
    "two-knn-shift-noxl": dict(memorizing_layers=(1, 2), shift_knn_memories_down=1,
                               xl_max_memories=0, gate="joint_softmax"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_causal_across_segments_with_a_non_empty_memory(case):
    model = lm(**CASES[case])
    x = ids()
    cache = model.init_cache(2)
    base = model(x, cache=cache)
    assert all(len(m) > 0 for m in cache.knn)  # the later segments did read a memory
    for t in (9, 17, 20, 31, 39):  # in segments 2..5 (segment_len 8)
        y = x.clone()
        y[:, t:] = ids(2, 40 - t, seed=t)
        out = model(y)
        assert_close_fp(out[:, :t], base[:, :t], reduction=64)
        assert (out[:, t:] - base[:, t:]).abs().amax() > 1e-3  # so the test can fail


@torch.no_grad()
def test_the_memory_is_read_and_the_gate_combines():
    model = lm()
    x = ids()
    on, off = model(x), model(x, use_memory=False)
    # segment 1 and 2 see an empty memory (XL 8 holds the last segment); later ones do not
    assert_close_fp(on[:, :16], off[:, :16], reduction=64)
    assert (on[:, 16:] - off[:, 16:]).abs().amax() > 1e-3
    with torch.no_grad():
        model.net.layers[1].attn.gate_bias.fill_(-30.0)  # sigmoid(b) ~ 0: memory weight 0
    assert_close_fp(model(x), model(x, use_memory=False), reduction=64)


@torch.no_grad()
def test_xl_recurrence_equals_one_long_segment():
    """XL long enough to hold everything: segments of 8 give what one segment of 40 gives
    (positions after the XL keys: the true distances), through either API."""
    over = dict(xl_max_memories=40, memorizing_layers=(1,))
    model = lm(**over)
    x = ids()
    long = lm(**{**over, "segment_len": 40})(x)
    assert_close_fp(model(x), long, reduction=64)
    net = model.net  # the reference's call, one call per segment, XL passed back
    with net.knn_memories_context(batch_size=2) as mems:
        xl, outs = None, []
        for s in range(0, 40, 8):
            logits, xl = net(x[:, s : s + 8], mems, xl_memories=xl)
            outs.append(logits)
        assert len(xl) == 2 and xl[0].shape == (2, 40, 2, 16)
    with net.knn_memories_context(batch_size=2) as mems:
        one, _ = net(x, mems)
    assert_close_fp(torch.cat(outs, 1), one, reduction=64)
    assert_close_fp(one, long, reduction=64)


@pytest.mark.parametrize("kind", ["doc_start", "sos", "eos"])
@torch.no_grad()
def test_a_document_start_row_equals_a_fresh_model(kind):
    plain = lm()
    clearing = lm(clear_memories_on_sos_token_id=1, clear_memories_on_eos_token_id=2)
    history, nxt = ids(2, 32), ids(2, 24, seed=7)
    if kind == "eos":
        history[0, -1] = 2
    if kind == "sos":
        nxt[0, 0] = 1
    doc = torch.tensor([True, False]) if kind == "doc_start" else None
    cache = clearing.init_cache(2)
    clearing(history, cache=cache)
    got = clearing(nxt, cache=cache, doc_start=doc)
    fresh = plain(nxt[:1])  # row 0: a new document from scratch (kNN and XL empty)
    assert_close_fp(got[:1], fresh, reduction=64)
    pc = plain.init_cache(2)  # row 1: continues its document as if nothing happened
    plain(history, cache=pc)
    cont = plain(nxt, cache=pc)
    assert_close_fp(got[1:], cont[1:], reduction=64)
    assert (cont[:1] - fresh).abs().amax() > 1e-3  # without clearing, row 0 differs


def test_boundary_ids_elsewhere_raise_naming_row_and_position():
    model = lm(clear_memories_on_sos_token_id=1, clear_memories_on_eos_token_id=2)
    x = ids(2, 16)
    x[1, 11] = 1
    with pytest.raises(
        ValueError, match=r"sos_token_id=1 at row 1, position 3 of its segment \(token 11"
    ):
        model(x)
    x = ids(2, 16)
    x[0, 5] = 2
    with pytest.raises(ValueError, match=r"eos_token_id=2 at row 0, position 5"):
        model(x)
    x[0, 5], x[0, 7] = 9, 2  # the last token of a segment: fine
    model(x)
    cache = model.init_cache(2)
    model(x[:, :3], cache=cache)
    with pytest.raises(ValueError, match="3 tokens into a segment"):
        model(x[:, 3:], cache=cache, doc_start=torch.tensor([True, False]))


@pytest.mark.parametrize("pieces", [[1] * 20, [3, 5, 13, 1, 18], [8, 8, 8, 16]])
@torch.no_grad()
def test_streaming_in_any_pieces_equals_one_call(pieces):
    model = lm(memorizing_layers=(1, 2), shift_knn_memories_down=1, max_knn_memories=16)
    x = ids(2, sum(pieces))
    full = model(x)
    cache, outs, s = model.init_cache(2), [], 0
    for p in pieces:
        outs.append(model(x[:, s : s + p], cache=cache))
        s += p
    assert_close_fp(torch.cat(outs, 1), full, reduction=64)


@torch.no_grad()
def test_generation_past_max_seq_len_equals_full_forwards():
    model = lm(max_knn_memories=16)
    prompt, new = ids(2, 20), 30  # 50 tokens > max_seq_len 32
    cached = generate(model, prompt, new, temperature=0)
    full = generate(model, prompt, new, temperature=0, use_cache=False)
    assert cached.ids.shape == (2, 50)
    assert torch.equal(cached.ids, full.ids)
    seq = prompt.clone()  # the oracle: greedy with whole forwards
    for _ in range(new):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached.ids, seq)


def test_scoping_one_row_of_the_reference_call_leaves_it_exact():
    model = lm()
    net, x = model.net, ids(3, 24)
    with torch.no_grad(), net.knn_memories_context(batch_size=3) as mems:
        xl, whole = None, []
        for s in range(0, 24, 8):
            out, xl = net(x[:, s : s + 8], mems, xl_memories=xl)
            whole.append(out)
    with torch.no_grad(), net.knn_memories_context(batch_size=3) as mems:
        xl, part = None, []
        for s in range(0, 24, 8):
            with mems.at_batch_indices([2]):
                out, xl = net(x[2:, s : s + 8], mems, xl_memories=xl)
            part.append(out)
        assert mems[0].count == [0, 0, 16]  # 24 tokens, the last 8 in XL
    assert_close_fp(torch.cat(part, 1), torch.cat(whole, 1)[2:], reduction=64)


def test_reference_call_labels_and_read_only_memory():
    model = lm(xl_max_memories=0)
    net, x = model.net, ids(2, 8)
    mems = net.create_knn_memories(batch_size=2)
    assert len(mems) == 1
    labels = x.clone()
    labels[:, :4] = -100
    logits = net(x, mems, add_knn_memory=False)
    assert mems[0].count == [0, 0]  # read-only
    loss = net(x, mems, labels=labels)
    assert mems[0].count == [8, 8]
    expect = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 256), x[:, 4:].flatten())
    torch.testing.assert_close(loss.double(), expect, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert net.layers[1].attn.to_q.weight.grad.abs().sum() > 0
    labels[:] = 0  # token 0 is a real label (not ignored)
    assert net(x, mems, labels=labels) > 0


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = MemorizingLanguageModel(MemorizingConfig.from_name("memorizing-tiny"))
    seq = ids(2, 33)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(80):
        loss = model(seq, return_loss=True)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first, (first, loss.item())
