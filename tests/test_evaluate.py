import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrolm import RETRO, RetroConfig
from retrolm.evaluate import EvalConfig, evaluate, longest_common_run, save_report
from tests.fakes import ByteTokenizer, FakeDatabase, TinyRetro


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
    assert [p.name for p in paths] == ["eval.json", "eval_leakage.png"]


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
