"""Every MemorizingConfig option has an effect by behaviour; bad values raise ValueError."""

import dataclasses

import pytest
import torch

from retrolm import MemorizingConfig, MemorizingLanguageModel, MemorizingTransformer
from retrolm.models.memorizing.config import PRESETS


def run(train=False, x=None, **over):
    torch.manual_seed(0)
    model = MemorizingLanguageModel(MemorizingConfig.from_name("memorizing-tiny", **over))
    model.train(train)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos_bias" in name:  # (the gate keeps gate_init)
                p.normal_(0, 1.0)
    x = (
        x
        if x is not None
        else torch.randint(3, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    )
    torch.manual_seed(1)  # dropout masks
    with torch.no_grad():
        return model(x)


# option -> a value whose effect shows in the logits of a 48-token stream (6 segments)
CHANGES = {
    "dim": 48, "depth": 3, "dim_head": 8, "heads": 3, "knn_attn_heads": 4, "ff_mult": 2.0,
    "memorizing_layers": (1,), "max_knn_memories": 4, "num_retrieved_memories": 1,
    "shift_knn_memories_down": 1, "xl_max_memories": 3, "xl_memory_layers": (2,),
    "shift_xl_memories_down": 1, "segment_len": 5, "gate": "joint_softmax", "gate_init": 2.0,
    "attn_scale_init": 3.0, "rel_pos_buckets": 8, "rel_pos_max_distance": 20,
}  # fmt: skip
NEEDS = {
    "shift_knn_memories_down": dict(memorizing_layers=(1, 2)),
    "rel_pos_max_distance": dict(rel_pos_buckets=8),  # distances of 4 and more are bucketed
}


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_option_changes_the_outputs(name):
    extra = NEEDS.get(name, {})
    base, changed = run(**extra), run(**extra, **{name: CHANGES[name]})
    assert base.shape != changed.shape or (base - changed).abs().amax() > 1e-4


@pytest.mark.parametrize("name", ["attn_dropout", "ff_dropout"])
def test_dropouts_act_in_training_only(name):
    assert (run(train=True) - run(train=True, **{name: 0.5})).abs().amax() > 1e-4
    torch.testing.assert_close(run(), run(**{name: 0.5}))


def test_pad_id_keys_are_never_attended():
    x = torch.randint(3, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    x[:, 10:30:3] = 7
    base, padded = run(x=x, pad_id=None), run(x=x, pad_id=7)
    assert (base[:, 11:] - padded[:, 11:]).abs().amax() > 1e-4
    torch.testing.assert_close(base[:, :10], padded[:, :10])


def test_num_tokens_ignore_index_and_backends(tmp_path):
    assert run(num_tokens=300).shape[-1] == 300
    torch.manual_seed(0)
    model = MemorizingLanguageModel(MemorizingConfig.from_name("memorizing-tiny", ignore_index=5))
    seq = torch.full((1, 9), 5)
    seq[0, 0] = 9
    assert model(seq, return_loss=True).isnan()  # every label ignored: no tokens
    for backend in ("exact", "faiss"):
        cfg = MemorizingConfig.from_name("memorizing-tiny", knn_backend=backend)
        assert MemorizingLanguageModel(cfg).init_cache(2).knn[0].backend == backend
    torch.testing.assert_close(run(knn_backend="faiss"), run(knn_backend="exact"))
    d = tmp_path / "mem"
    torch.testing.assert_close(run(knn_memories_directory=str(d)), run())
    assert (d / "knn.memory.layer.1.memmap").exists()
    # max_seq_len is the training window the trainer cuts (no effect on a forward)
    assert (
        MemorizingLanguageModel(
            MemorizingConfig.from_name("memorizing-tiny", max_seq_len=64)
        ).max_seq_len
        == 64
    )


def test_every_field_is_covered():
    covered = set(CHANGES) | {"attn_dropout", "ff_dropout", "pad_id", "num_tokens"}
    covered |= {"ignore_index", "knn_backend", "knn_memories_directory", "max_seq_len"}
    covered |= {
        "clear_memories_on_sos_token_id",
        "clear_memories_on_eos_token_id",
    }  # test_memorizing
    fields = {f.name for f in dataclasses.fields(MemorizingConfig)} - {"extra"}
    assert fields == covered


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(memorizing_layers=(3,)), r"memorizing_layers .* got \(3,\)"),
        (dict(memorizing_layers=(0,)), r"got \(0,\)"),
        (dict(xl_memory_layers=(1, 1)), r"xl_memory_layers .* got \(1, 1\)"),
        (dict(gate="tanh"), "'tanh'"),
        (dict(knn_backend="hnsw"), "'hnsw'"),
        (dict(segment_len=0), "segment_len must be a positive int, got 0"),
        (dict(heads=-1), "heads must be a positive int, got -1"),
        (dict(knn_attn_heads=0), "knn_attn_heads must be a positive int, got 0"),
        (dict(xl_max_memories=-1), "xl_max_memories must be an int >= 0, got -1"),
        (dict(shift_knn_memories_down=-2), "got -2"),
        (dict(attn_dropout=1.0), "attn_dropout must be in"),
        (dict(attn_scale_init=0.0), "attn_scale_init"),
        (dict(rel_pos_max_distance=8), "rel_pos_max_distance"),
        (dict(num_retrieved_memories=0), "num_retrieved_memories"),
        (dict(max_knn_memories=0), "max_knn_memories"),
        (dict(extra={"foo": 1}), "foo"),
    ],
)
def test_bad_configs_raise(over, match):
    with pytest.raises(ValueError, match=match):
        MemorizingConfig.from_name("memorizing-tiny", **over)


def test_reference_keywords_and_unknown_ones():
    net = MemorizingTransformer(
        num_tokens=256, dim=32, depth=2, dim_head=16, heads=2, memorizing_layers=(1,),
        max_knn_memories=100, xl_max_memories=4, knn_memory_multiprocessing=False,
    )  # fmt: skip
    assert net.config.memorizing_layers == (1,) and net.config.xl_max_memories == 4
    assert MemorizingTransformer(256, 32, 4).config.memorizing_layers == (2,)  # depth // 2
    with pytest.raises(ValueError, match="memorizing_layer"):
        MemorizingTransformer(256, 32, 2, memorizing_layer=(1,))  # a typo is named
    with pytest.raises(ValueError, match="memorizing_layers"):
        MemorizingTransformer(256, 32, 2, memorizing_layers=(5,))
    assert set(PRESETS) == {"memorizing-tiny", "memorizing-small", "memorizing-bench"}
