import pytest
import torch

from retrolm import RETRO, RetroConfig
from retrolm.generation import describe_sources, generate
from tests.fakes import FakeDatabase, TinyRetro, random_docs, register_tiny

register_tiny()  # TinyRetro is a retrieval family: generation finds it by class


def tiny_retro(seed=0):
    torch.manual_seed(seed)
    return RETRO(config=RetroConfig.from_name("retro-tiny")).eval()


def tiny_retro_copy(seed=0):
    """With the neighbour copy head, its gate opened so that copying decides tokens."""
    torch.manual_seed(seed)
    model = RETRO(config=RetroConfig.from_name("retro-tiny", copy_head=True)).eval()
    with torch.no_grad():
        model.copy_head.gate_bias.fill_(3.0)
    return model


def fake_db():
    return FakeDatabase(random_docs(10, 40, seed=2), chunk_size=4, num_candidates=4)


@pytest.mark.parametrize(
    "make", [tiny_retro, tiny_retro_copy, lambda: TinyRetro().eval()], ids=["retro", "copy", "fake"]
)
@pytest.mark.parametrize("prompt_len", [1, 4, 7])
def test_cached_greedy_equals_full_forward(make, prompt_len):
    model, db = make(), fake_db()
    prompt = torch.randint(2, 40, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    kw = dict(retriever=db, temperature=0, num_neighbours=2)
    cached = generate(model, prompt, 20, **kw)
    full = generate(model, prompt, 20, use_cache=False, **kw)
    assert torch.equal(cached.ids, full.ids)
    assert cached.ids.shape == (2, prompt_len + 20)
    # every completed chunk retrieved once, in order, prompt chunks included
    assert [r.chunk for r in cached.retrievals] == list(range((prompt_len + 20) // 4))


def test_full_forward_oracle_by_hand():
    """The reference loop written out: retrieval for every complete chunk, full forward."""
    model, db = tiny_retro(), fake_db()
    seq = torch.tensor([[5, 6, 7, 8, 9, 10]])
    for _ in range(10):
        n_chunks = seq.shape[1] // 4
        chunks = seq[:, : n_chunks * 4].reshape(n_chunks, 4).numpy()
        ids, _ = db.search_tokens(chunks, 2)
        toks, mask = db.retrieved_tokens(ids)
        logits = model(seq, toks[None], neighbour_mask=mask[None])
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    out = generate(model, [5, 6, 7, 8, 9, 10], 10, db, temperature=0, num_neighbours=2)
    assert torch.equal(out.ids, seq)


def test_copy_head_changes_the_continuation():
    model, db = tiny_retro_copy(), fake_db()
    prompt = db.chunks[3, :6].tolist()  # text the database holds: its neighbours continue it
    with_copy = generate(model, prompt, 16, db, temperature=0)
    model.copy_head.enabled = False
    without = generate(model, prompt, 16, db, temperature=0)
    assert not torch.equal(with_copy.ids, without.ids)


def test_retrieval_changes_the_continuation():
    model, db = tiny_retro(), fake_db()
    with_r = generate(model, list(range(2, 14)), 16, db, temperature=0)
    without = generate(model, list(range(2, 14)), 16, None, temperature=0)
    assert not torch.equal(with_r.ids, without.ids)
    assert without.retrievals == []


def test_sampling_is_seeded_and_stops_at_eos():
    model, db = tiny_retro(), fake_db()
    a = generate(model, [3, 4], 12, db, temperature=1.0, top_k=20, seed=7)
    b = generate(model, [3, 4], 12, db, temperature=1.0, top_k=20, seed=7)
    assert torch.equal(a.ids, b.ids)
    eos = int(a.ids[0, 2])  # declare the first sampled token the EOS: stops right there
    c = generate(model, [3, 4], 12, db, temperature=1.0, top_k=20, seed=7, eos_id=eos)
    assert c.ids.tolist() == [[3, 4, eos]]


def test_on_token_sees_each_new_token_before_the_next_forward():
    """The streaming hook: one call per sampled step, in order, with the tokens that end up
    in the result, each before the forward that reads it (so a server can send it at once)."""
    model, db = tiny_retro(), fake_db()
    seen, fed = [], []
    forward = model.forward

    def spy(seq, *a, **kw):
        fed.append(len(seen))  # how many tokens the hook had seen when this forward ran
        return forward(seq, *a, **kw)

    model.forward = spy
    out = generate(model, [3, 4, 5], 9, db, temperature=1.0, seed=3, on_token=seen.append)
    assert [int(t[0]) for t in seen] == out.new_ids[0].tolist()
    assert fed == list(range(9))  # the prompt's forward, then one per token but the last
    again = generate(model, [3, 4, 5], 9, db, temperature=1.0, seed=3)
    assert torch.equal(again.ids, out.ids)  # the hook changes nothing
    eos = int(out.ids[0, 3])
    stopped = []
    generate(model, [3, 4, 5], 9, db, temperature=1.0, seed=3, eos_id=eos, on_token=stopped.append)
    assert [int(t[0]) for t in stopped] == [eos]


def test_stops_at_max_seq_len_and_rejects_long_prompts():
    model = tiny_retro()
    out = generate(model, [3] * 30, 10, fake_db(), temperature=0)
    assert out.ids.shape[1] == 32  # retro-tiny max_seq_len
    with pytest.raises(
        ValueError, match="the prompt has 33 tokens but the model's max_seq_len is 32"
    ):
        generate(model, [3] * 33, 1)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, [], 1)


def test_sources_name_file_and_snippet():
    model, db = tiny_retro(), fake_db()
    out = generate(model, list(range(2, 10)), 4, db, temperature=0)
    src = describe_sources(db, out)
    assert src and all(s["file"].startswith("/fake/doc") for s in src)
    assert {s["chunk"] for s in src} == {0, 1, 2}


# ---------------------------------------------------------------- families without retrieval


def routing_lm(seed=0):
    from retrolm.models.routing import RoutingLanguageModel
    from retrolm.models.routing.config import RoutingConfig

    torch.manual_seed(seed)
    cfg = RoutingConfig.from_name("routing-tiny", max_seq_len=64, window_size=8)
    model = RoutingLanguageModel(cfg)
    model(torch.randint(2, 250, (2, 65)), return_loss=True).backward()  # k-means initialised
    return model.eval()


def hierarchical(seed=0):
    from retrolm import HierarchicalConfig, HierarchicalTransformer

    torch.manual_seed(seed)
    cfg = HierarchicalConfig.from_name("hier-tiny", seq_len=64, window_sizes=(8, 8, None))
    return HierarchicalTransformer(cfg).eval()


def greedy_by_full_forwards(model, prompt, steps):
    """The oracle: append the argmax of a whole-sequence forward, step by step."""
    seq = prompt
    for _ in range(steps):
        out = model(seq)
        logits = out[0] if isinstance(out, tuple) else out
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


@pytest.mark.parametrize("make", [routing_lm, hierarchical], ids=["routing", "hierarchical"])
@pytest.mark.parametrize("prompt_len", [1, 7, 16])
def test_cached_greedy_equals_full_forwards_without_retrieval(make, prompt_len):
    model = make()
    prompt = torch.randint(2, 250, (2, prompt_len), generator=torch.Generator().manual_seed(3))
    steps = 40 - prompt_len  # past several routing windows / hierarchy strides
    cached = generate(model, prompt, steps, temperature=0)
    full = generate(model, prompt, steps, temperature=0, use_cache=False)
    assert torch.equal(cached.ids, full.ids)
    assert torch.equal(cached.ids, greedy_by_full_forwards(model, prompt, steps))
    assert cached.ids.shape == (2, 40) and cached.retrievals == []
    assert len(set(cached.new_ids[0].tolist())) > 1  # not a constant: the test can fail


@pytest.mark.parametrize("make", [routing_lm, hierarchical], ids=["routing", "hierarchical"])
def test_cached_path_feeds_one_token_per_step(make, monkeypatch):
    """With a cache the model sees the prompt once, then single tokens."""
    model, widths = make(), []
    orig = model.forward

    def spy(ids, *a, **kw):
        widths.append(ids.shape[1])
        return orig(ids, *a, **kw)

    monkeypatch.setattr(model, "forward", spy)
    generate(model, torch.tensor([[5, 6, 7]]), 6, temperature=0)
    assert widths == [3, 1, 1, 1, 1, 1]
    widths.clear()
    generate(model, torch.tensor([[5, 6, 7]]), 6, temperature=0, use_cache=False)
    assert widths == [3, 4, 5, 6, 7, 8]


def test_sampling_without_retrieval_is_seeded():
    model = routing_lm()
    a = generate(model, [3, 4], 12, temperature=1.0, top_p=0.9, seed=5)
    b = generate(model, [3, 4], 12, temperature=1.0, top_p=0.9, seed=5)
    c = generate(model, [3, 4], 12, temperature=1.0, top_p=0.9, seed=6)
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)


def test_a_retriever_is_refused_for_families_without_retrieval():
    with pytest.raises(ValueError, match="'routing' model reads no neighbours"):
        generate(routing_lm(), [3, 4], 2, fake_db())
    from retrolm.models.routing import RoutingTransformerLM

    bare = RoutingTransformerLM(config=routing_lm().config)  # no registered family
    with pytest.raises(ValueError, match="belongs to no registered model family"):
        generate(bare, [3, 4], 2, fake_db())
    out = generate(bare, [3, 4], 5, temperature=0)  # a plain decoder: (logits, aux) is fine
    assert out.ids.shape == (1, 7)
