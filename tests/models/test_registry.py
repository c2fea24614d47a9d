"""The model registry carries what evaluation and generation need per family."""

import pytest
import torch

from retrolm import RETRO, HierarchicalConfig, HierarchicalTransformer, RetroConfig
from retrolm.models.registry import (
    DECODER,
    FAMILIES,
    ModelFamily,
    family_of,
    get_family,
    plain_logits,
)
from retrolm.models.retro.family import retro_logits
from retrolm.models.routing import RoutingLanguageModel, RoutingTransformerLM
from retrolm.models.routing.config import RoutingConfig

ROUTING = RoutingConfig.from_name("routing-tiny", max_seq_len=64, window_size=16)
HIER = HierarchicalConfig.from_name("hier-tiny", seq_len=32, window_sizes=(8, 8, None))


def models():
    torch.manual_seed(0)
    return {
        "retro": RETRO(config=RetroConfig.from_name("retro-tiny")),
        "routing": RoutingLanguageModel(ROUTING),
        "hierarchical": HierarchicalTransformer(HIER),
    }


def test_each_model_finds_its_family_by_class():
    for name, model in models().items():
        assert family_of(model).name == name
    bare = RoutingTransformerLM(config=ROUTING)  # no registered family: a plain decoder
    assert family_of(bare) is DECODER
    assert family_of(bare, "routing").name == "routing"  # an explicit family wins


def test_lookup_never_imports_a_family_module():
    name = "never-imported"
    FAMILIES[name] = ModelFamily(name, "no_such_module:Config", "no_such_module:Model")
    try:
        assert family_of(models()["hierarchical"]).name == "hierarchical"
    finally:
        del FAMILIES[name]


def test_chunk_size_is_retros_chunk_and_one_elsewhere():
    ms = models()
    assert get_family("retro").chunk_size(ms["retro"].config) == ms["retro"].config.chunk_size > 1
    assert get_family("routing").chunk_size(ms["routing"].config) == 1
    assert get_family("hierarchical").chunk_size(ms["hierarchical"].config) == 1
    assert not hasattr(ms["hierarchical"].config, "chunk_size")  # no RETRO field to fake


def test_logits_hooks_return_plain_logits_for_every_family():
    ids = torch.randint(2, 200, (2, 16))
    for name, model in models().items():
        out = get_family(name).logits(model.eval(), ids)
        assert isinstance(out, torch.Tensor) and out.shape[:2] == (2, 16)
    raw = models()["routing"].eval()(ids)
    assert isinstance(raw, tuple)  # routing returns (logits, aux): the hook unwraps it
    assert torch.equal(plain_logits(models()["routing"].eval(), ids), raw[0])


def test_cache_hook_follows_the_config():
    ms = models()
    for name in ("retro", "routing", "hierarchical"):
        assert get_family(name).init_cache(ms[name], 2) is not None
    balanced = RoutingConfig.from_dict(
        {**ROUTING.to_dict(), "routing": "balanced", "allow_future_leak": True}
    )
    assert get_family("routing").init_cache(RoutingLanguageModel(balanced), 2) is None


def test_misused_hooks_fail_with_the_fix():
    with pytest.raises(ValueError, match="does not read neighbours"):
        plain_logits(models()["routing"], torch.zeros(1, 4, dtype=torch.long), retrieved=1)
    with pytest.raises(ValueError, match="pass logits=retro_logits"):
        ModelFamily("r2", "m:C", "m:M", uses_retrieval=True)
    assert ModelFamily("r3", "m:C", "m:M", uses_retrieval=True, logits=retro_logits)


def test_the_routing_family_refuses_a_non_causal_language_model():
    with pytest.raises(ValueError, match="needs causal=True"):
        get_family("routing").build(RoutingConfig.from_dict({**ROUTING.to_dict(), "causal": False}))


def test_logits_hooks_keep_the_last_rows():
    """``logits_to_keep`` (generation's prefill) equals the last rows of the full logits, for
    every family, and for a RETRO subclass whose forward lacks the option."""

    class OldRetro(RETRO):
        def forward(self, seq, retrieved=None, *, neighbour_mask=None, cache=None):
            return super().forward(seq, retrieved, neighbour_mask=neighbour_mask, cache=cache)

    ids = torch.randint(2, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    for name, model in {**models(), "old-retro": OldRetro(config=models()["retro"].config)}.items():
        hook = retro_logits if "retro" in name else plain_logits
        model.eval()
        full = hook(model, ids)
        assert full.shape[:2] == (2, 12), name
        torch.testing.assert_close(hook(model, ids, logits_to_keep=2), full[:, -2:])


def test_plain_logits_hands_logits_to_keep_only_to_models_that_take_it():
    """A model declaring ``takes_logits_to_keep`` gets it (and may skip work); any other
    gets the usual call and its logits are sliced: both return the last positions."""
    from torch import nn

    from retrolm.models.registry import plain_logits

    class Recorder(nn.Module):
        def __init__(self, takes: bool) -> None:
            super().__init__()
            self.takes_logits_to_keep, self.calls = takes, []

        def forward(self, ids, **kw):
            self.calls.append(sorted(kw))
            logits = torch.arange(ids.shape[1], dtype=torch.float)[None, :, None].expand(1, -1, 3)
            keep = kw.get("logits_to_keep")
            return logits if keep is None else logits[:, -keep:]

    ids = torch.zeros(1, 5, dtype=torch.long)
    for takes, want in ((True, ["cache", "logits_to_keep"]), (False, ["cache"])):
        model = Recorder(takes)
        out = plain_logits(model, ids, cache="c", logits_to_keep=2)
        assert model.calls == [want] and out[0, :, 0].tolist() == [3.0, 4.0]
    model = Recorder(True)
    assert plain_logits(model, ids).shape == (1, 5, 3) and model.calls == [[]]
