import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrolm import RETRO, RetroConfig
from retrolm.evaluate import EvalConfig, evaluate, longest_common_run, save_report
from tests.fakes import ByteTokenizer, FakeDatabase, TinyRetro, register_tiny

M = 4  # retro-tiny's chunk size
register_tiny()  # TinyRetro is a retrieval family: generation finds it by class


def model():
    torch.manual_seed(0)
    return RETRO(config=RetroConfig.from_name("retro-tiny", num_tokens=260)).eval()


@pytest.fixture
def held_out(tmp_path):
    d = tmp_path / "held"
    d.mkdir()
    (d / "a.txt").write_text("In the beginning was the word, and the word was with God. " * 2)
    (d / "b.txt").write_text("short one")
    return d


def text_db():
    tok = ByteTokenizer()
    texts = [
        "In the beginning God created the heaven and the earth.",
        "And the word was made flesh, and dwelt among us.",
        "short one more",
    ]
    return FakeDatabase([tok.encode(t) for t in texts], chunk_size=4, num_candidates=10)


@torch.no_grad()
def brute_force_nll(net, ids):
    """All of a short document in one forward: the NLL of every token after the first."""
    x = torch.tensor([ids])
    logp = F.log_softmax(net(x[:, :-1]).float(), -1)
    return float(-logp.gather(-1, x[:, 1:, None]).sum())


@pytest.mark.parametrize("stride", [4, 8, 16])
def test_every_token_scored_once_and_matches_a_full_forward(held_out, stride):
    net, tok = model(), ByteTokenizer()
    res = evaluate(net, held_out, tokenizer=tok, config=EvalConfig(seq_len=16, stride=stride))
    docs = [tok.encode(p.read_text()) + [1] for p in sorted(held_out.glob("*.txt"))]
    r = res.modes["no_retrieval"]
    assert r["tokens"] == sum(len(d) - 1 for d in docs)
    assert r["bytes"] == sum(len(p.read_bytes()) for p in held_out.glob("*.txt")) - 2
    # b.txt fits in one window: its NLL is that of one full forward
    short = evaluate(
        net, held_out, tokenizer=tok, config=EvalConfig(seq_len=16, stride=stride, glob="b.txt")
    )
    expect = brute_force_nll(net, docs[1])
    assert short.modes["no_retrieval"]["nll_per_token"] * (len(docs[1]) - 1) == pytest.approx(
        expect, rel=1e-5
    )


def test_with_retrieval_side_by_side_and_leakage(held_out, tmp_path):
    res = evaluate(model(), held_out, text_db(), config=EvalConfig(seq_len=16, stride=8))
    a, b = res.modes["retrieval"], res.modes["no_retrieval"]
    assert a["tokens"] == b["tokens"] and a["bits_per_byte"] != b["bits_per_byte"]
    assert [r["alpha"] for r in res.leakage][-1] == 1.0
    last = res.leakage[-1]
    assert last["fraction"] == 1.0
    assert last["retrieval"] == pytest.approx(a["bits_per_byte"])
    fractions = [r["fraction"] for r in res.leakage]
    assert fractions == sorted(fractions) and fractions[0] < 1.0  # "short one" is retrievable
    assert "retrieval lowers bits/byte by" in res.table()
    paths = save_report(res, tmp_path / "out")
    assert [p.name for p in paths] == ["eval.json", "eval.csv", "eval.md", "eval_leakage.png"]
    import csv

    with open(paths[1]) as f:
        rows = list(csv.DictReader(f))
    assert [r["mode"] for r in rows] == ["retrieval", "no_retrieval"]
    for r in rows:
        assert float(r["bits_per_byte"]) == pytest.approx(res.modes[r["mode"]]["bits_per_byte"])
    md = paths[2].read_text().splitlines()
    assert md[0] == "| mode | bits/byte | token perplexity | tokens |"
    assert md[2].startswith(f"| retrieval | {a['bits_per_byte']:.4f} |")
    assert md[3].startswith(f"| no_retrieval | {b['bits_per_byte']:.4f} |")
    assert f"| 1.000 | 100.0% | {last['retrieval']:.4f} |" in paths[2].read_text()


@pytest.mark.parametrize("retrieval", [True, False])
def test_bits_per_byte_by_hand_with_and_without_retrieval(held_out, retrieval):
    """A one-window document scored by hand: its chunks' neighbours from the database's
    search, one forward, NLL summed over every token but the first, over ln 2 times the
    UTF-8 bytes of the text after its first character."""
    net, db, tok = model(), text_db(), ByteTokenizer()
    text = (held_out / "b.txt").read_text()  # "short one": 9 bytes + <eos> in one window
    ids = tok.encode(text) + [tok.eos_id]
    kw = {}
    if retrieval:
        chunks = [ids[s : s + M] for s in range(0, len(ids), M)]
        rows = np.array([c + [0] * (M - len(c)) for c in chunks])  # pad id 0
        nbr, _ = db.search_tokens(rows, 10)
        ret, present = db.retrieved_tokens(nbr[:, :2])  # k = 2, (C, 2, 2m), (C, 2)
        kw = {"retrieved": ret[None], "neighbour_mask": present[None]}
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = F.log_softmax(net(x[:, :-1], **kw).double(), -1)
    nll = -float(logp.gather(-1, x[:, 1:, None]).sum())
    expect = nll / (math.log(2) * (len(text.encode("utf-8")) - 1))
    cfg = EvalConfig(seq_len=16, stride=8, glob="b.txt")
    res = evaluate(net, held_out, db if retrieval else None, tokenizer=tok, config=cfg)
    mode = "retrieval" if retrieval else "no_retrieval"
    assert res.modes[mode]["bits_per_byte"] == pytest.approx(expect, rel=1e-5)  # fp32 model
    if retrieval:  # the neighbours matter, so the check above can tell the modes apart
        assert res.modes["no_retrieval"]["bits_per_byte"] != pytest.approx(expect, rel=1e-4)


def test_longest_common_run_against_brute_force():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, size=(20, 6))
    b = rng.integers(0, 4, size=(20, 3, 12))
    a[0, 4:] = -1  # padding never matches
    b[1, :, 6:] = -2

    def brute(x, ys):
        x = [t for t in x if t >= 0]
        best = 0
        for y in ys:
            for i in range(len(x)):
                for j in range(len(y)):
                    n = 0
                    while i + n < len(x) and j + n < len(y) and x[i + n] == y[j + n]:
                        n += 1
                    best = max(best, n)
        return best

    assert longest_common_run(a, b, block=7).tolist() == [brute(a[i], b[i]) for i in range(20)]


def test_empty_held_out_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty has no non-empty file matching"):
        evaluate(TinyRetro(), tmp_path / "empty", tokenizer=ByteTokenizer())
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        evaluate(TinyRetro(), tmp_path / "nope", tokenizer=ByteTokenizer())


# ---------------------------------------------------------------- families without retrieval


def routing_lm():
    from retrolm.models.routing import RoutingLanguageModel
    from retrolm.models.routing.config import RoutingConfig

    torch.manual_seed(0)
    cfg = RoutingConfig.from_name("routing-tiny", num_tokens=260, max_seq_len=32, window_size=8)
    return RoutingLanguageModel(cfg).eval()


def hierarchical():
    from retrolm import HierarchicalConfig, HierarchicalTransformer

    torch.manual_seed(0)
    cfg = HierarchicalConfig.from_name(
        "hier-tiny", num_tokens=260, seq_len=32, window_sizes=(8, 8, None)
    )
    return HierarchicalTransformer(cfg).eval()


def logits_of(net, x):
    out = net(x)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def sliding_window_oracle(net, ids, n, s):
    """Target t is predicted from the window that first holds it: w = 0 for t <= n, else the
    smallest multiple of s with t <= w + n; the window's tokens before t are the context."""
    total = 0.0
    for t in range(1, len(ids)):
        w = 0 if t <= n else s * -(-(t - n) // s)
        ctx = torch.tensor([ids[w:t]])
        total -= float(F.log_softmax(logits_of(net, ctx)[0, -1].float(), -1)[ids[t]])
    return total


@pytest.mark.parametrize("make", [routing_lm, hierarchical], ids=["routing", "hierarchical"])
@pytest.mark.parametrize("n,stride", [(32, None), (20, 7)])
def test_sliding_windows_without_retrieval_match_an_oracle(held_out, make, n, stride):
    net, tok = make(), ByteTokenizer()
    cfg = EvalConfig(seq_len=n, stride=stride, glob="a.txt", batch_size=3)
    res = evaluate(net, held_out, tokenizer=tok, config=cfg)
    ids = tok.encode((held_out / "a.txt").read_text()) + [tok.eos_id]
    assert len(ids) > 3 * n  # several windows: the stride matters
    r = res.modes["no_retrieval"]
    assert list(res.modes) == ["no_retrieval"] and res.leakage == [] and res.chunks == 0
    assert r["tokens"] == len(ids) - 1 and r["bytes"] == len(ids) - 2  # <eos> has no bytes
    expect = sliding_window_oracle(net, ids, n, stride or n // 2)  # default: half the window
    assert r["nll_per_token"] * r["tokens"] == pytest.approx(expect, rel=1e-4)
    assert r["bits_per_byte"] == pytest.approx(expect / np.log(2) / r["bytes"], rel=1e-4)
    assert "retrieval lowers" not in res.table() and "no_retrieval" in res.table()


def test_windows_of_any_length_without_retrieval_and_clear_errors(held_out):
    net, tok = routing_lm(), ByteTokenizer()
    evaluate(net, held_out, tokenizer=tok, config=EvalConfig(seq_len=13, stride=5))  # m = 1
    with pytest.raises(ValueError, match="window <= the model's max_seq_len 32"):
        evaluate(net, held_out, tokenizer=tok, config=EvalConfig(seq_len=33))
    with pytest.raises(ValueError, match="'routing' model reads no neighbours: pass db=None"):
        evaluate(net, held_out, text_db())
    with pytest.raises(ValueError, match="chunk size 4"):  # RETRO keeps its chunk rule
        evaluate(TinyRetro(), held_out, tokenizer=tok, config=EvalConfig(seq_len=2))


def test_document_nll_is_evaluates_scoring_per_document(held_out):
    """The public per-document scorer (the lm-eval adapter's) sums to evaluate's NLL in each
    mode, its greedy flags are each window's argmax, and streamed families match too."""
    from retrolm.evaluate import document_nll
    from tests.fakes import StreamingToy, register_streaming_toy

    tok, db, cfg = ByteTokenizer(), text_db(), EvalConfig(seq_len=16, stride=8)
    net = model()
    docs = [tok.encode(p.read_text()) + [1] for p in sorted(held_out.glob("*.txt"))]
    res = evaluate(net, held_out, db, config=cfg)
    per_doc = [document_nll(net, d, db, config=cfg) for d in docs]
    for mode in res.modes:
        got = sum(float(nll[mode].sum()) for nll in per_doc)
        assert got == pytest.approx(res.modes[mode]["nll_per_token"] * (res.modes[mode]["tokens"]))
    greedy = {}
    short = document_nll(net, docs[1], None, config=cfg, modes=["no_retrieval"], greedy=greedy)
    with torch.no_grad():  # b.txt fits one window: its argmax is that of one forward
        top = net(torch.tensor([docs[1][:-1]])).argmax(-1)[0].numpy()
    assert (greedy["no_retrieval"][1:] == (top == np.array(docs[1][1:]))).all()
    assert short["no_retrieval"][0] == 0.0
    with pytest.raises(ValueError, match="must be among"):
        document_nll(net, docs[1], None, modes=["retrieval"])
    register_streaming_toy()
    torch.manual_seed(0)
    toy = StreamingToy().eval()
    streamed = evaluate(toy, held_out, tokenizer=tok, config=EvalConfig(seq_len=5))
    for mode in ("memory", "no_memory"):
        got = sum(float(document_nll(toy, d, modes=[mode])[mode].sum()) for d in docs)
        want = streamed.modes[mode]["nll_per_token"] * streamed.modes[mode]["tokens"]
        assert got == pytest.approx(want, rel=1e-5)
