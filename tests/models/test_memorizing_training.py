"""Training a Memorizing Transformer segment by segment (``ModelFamily.segment_losses``,
used by the trainer): the same losses and gradients as one backward over the whole window,
and a trained run equal to the one-backward path."""

import dataclasses

import pytest
import torch
from tests.models.test_memorizing_cli import MODEL
from tests.retrieval.conftest import write_corpus

from retrolm import MemorizingConfig, MemorizingLanguageModel
from retrolm.checkpoint import load_model
from retrolm.data import TextData
from retrolm.models import registry
from retrolm.models.registry import Batch, get_family
from retrolm.train import TrainConfig, train

CASES = {
    "xl": {},
    "noxl-joint": dict(xl_max_memories=0, gate="joint_softmax"),
    "two-knn-shift": dict(memorizing_layers=(1, 2), shift_knn_memories_down=1),
}


def lm(**over) -> MemorizingLanguageModel:
    torch.manual_seed(0)
    model = MemorizingLanguageModel(MemorizingConfig.from_name("memorizing-tiny", **over))
    return model.double()


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def check_pieces(model, seq) -> None:
    """The pieces' losses sum to the full loss and, backed up one by one, give its grads."""
    full = model(seq, return_loss=True)
    full.backward()
    want = grads(model)
    pieces = get_family("memorizing").segment_losses(model, Batch(seq))
    assert len(pieces) == -(-(seq.shape[1] - 1) // model.config.segment_len)
    total = 0.0
    for piece in pieces:
        loss = piece()
        loss.backward()  # each piece on its own: nothing crosses segments with a graph
        total = total + loss.detach()
    got = grads(model)
    # the loss is taken in float32 (nn.cross_entropy) even for a float64 model
    torch.testing.assert_close(total, full.detach(), rtol=1e-6, atol=0)
    assert want.keys() == got.keys() and len(want) > 20
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_pieces_give_the_loss_and_gradients_of_one_backward(case):
    seq = torch.randint(8, 256, (2, 8 * 3 + 5 + 1), generator=torch.Generator().manual_seed(3))
    seq[0, 12:15] = 7  # ignored labels (ignore_index 7): the shares follow the counted ones
    check_pieces(lm(ignore_index=7, **CASES[case]), seq)


def test_a_piece_without_labels_still_feeds_the_memory():
    seq = torch.randint(8, 256, (2, 8 * 3 + 1), generator=torch.Generator().manual_seed(4))
    seq[:, 9:17] = 7  # every label of segment 2 ignored
    check_pieces(lm(ignore_index=7), seq)


def test_a_trained_run_equals_the_one_backward_path(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus", ["json", "csv"])
    model = {**MODEL, "max_seq_len": 48}  # 3 segments of 16
    cfg = TrainConfig(
        steps=2, batch_size=2, grad_accum=2, warmup_steps=1, eval_every=0, save_every=2,
        precision="fp32", plot=False, grad_clip=0.5,
    )  # fmt: skip
    fam, runs = get_family("memorizing"), {}
    for name, hook in (("pieces", fam.segment_losses), ("whole", None)):
        monkeypatch.setitem(
            registry.FAMILIES, "memorizing", dataclasses.replace(fam, segment_losses=hook)
        )
        text = TextData(corpus, vocab_size=300)
        runs[name] = train(text, tmp_path / name, cfg, family="memorizing", model_config=model)
    a, b = runs["pieces"], runs["whole"]
    assert a.step == b.step == 2
    losses = [[float(r["loss"]) for r in run.history] for run in (a, b)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    wa = load_model(tmp_path / "pieces")[0].state_dict()
    wb = load_model(tmp_path / "whole")[0].state_dict()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_knn_temperature_and_gate_are_not_weight_decayed():
    """The trainer decays weight matrices only: a decayed log-temperature would drift to
    exp(0) = 1 (near-uniform cosine attention) and the gate towards 0.5."""
    from retrolm.train.optim import param_groups

    model = lm()
    attn = model.net.layers[1].attn
    no_decay = {id(p) for g in param_groups(model, 0.1) if g["weight_decay"] == 0.0
                for p in g["params"]}  # fmt: skip
    assert id(attn.scale) in no_decay and id(attn.gate_bias) in no_decay
    assert id(attn.to_q.weight) not in no_decay


def test_a_checkpoint_with_the_old_per_head_shapes_still_loads():
    """Before they became vectors, the temperature and gate were saved as (heads, 1, 1)."""
    torch.manual_seed(0)
    model = lm()
    attn = model.net.layers[1].attn
    with torch.no_grad():
        attn.scale.add_(torch.linspace(-0.5, 0.5, attn.scale.numel()))
        attn.gate_bias.add_(torch.linspace(-1.0, 1.0, attn.gate_bias.numel()))
    old = {k: (v.reshape(-1, 1, 1) if k.endswith(("attn.scale", "attn.gate_bias")) else v)
           for k, v in model.state_dict().items()}  # fmt: skip
    assert any(v.dim() == 3 and k.endswith("attn.scale") for k, v in old.items())
    fresh = lm()
    fresh.load_state_dict(old)
    ids = torch.randint(1, 40, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)
