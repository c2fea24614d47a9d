"""Every RoutingConfig option has an effect: it changes the parameters, the module graph, the
outputs (in training mode for dropouts) or the centroids; the seed's dead options
(``ff_mult``, ``commitment_factor``) included."""

import dataclasses
import functools

import pytest
import torch

from retrolm import AutoregressiveWrapper, RoutingConfig, RoutingTransformerLM
from retrolm.nn.kmeans import kmeans_modules

V = 29
BASE = dict(
    num_tokens=V,
    dim=32,
    depth=2,
    heads=4,
    dim_head=8,
    max_seq_len=32,
    window_size=4,
    causal=True,
    n_local_attn_heads=1,
)

CHANGES = {
    "dim": 48,
    "depth": 3,
    "max_seq_len": 64,
    "heads": 2,
    "dim_head": 16,
    "window_size": 8,
    "local_attn_window_size": 2,
    "n_local_attn_heads": (0, 2),
    "causal": False,
    "routing": ("balanced", dict(allow_future_leak=True)),
    "shared_qk": False,
    "num_mem_kv": 2,
    "emb_dim": 16,
    "tie_embedding": True,
    "weight_tie": True,
    "attn_dropout": 0.5,
    "attn_layer_dropout": 0.5,
    "ff_dropout": 0.5,
    "layer_dropout": 0.5,
    "ff_mult": 2.0,
    "ff_glu": True,
    "ff_activation": "relu",
    "ff_chunks": 3,
    "reversible": True,
    "pkm_layers": (1,),
    "pkm_num_keys": (8, dict(pkm_layers=(1,))),
    "moe_layers": (2,),
    "moe_num_experts": (2, dict(moe_layers=(2,))),
    "moe_loss_coef": (0.5, dict(moe_layers=(2,))),
    "use_scale_norm": True,
    "use_rezero": True,
    "shift_tokens": True,
    "kmeans_ema_decay": 0.5,
    "commitment_factor": 1.0,
    "receives_context": True,
    "return_embeddings": True,
    "register_kmeans_update": False,
    "rotary_base": 100.0,
    "num_tokens": 31,
}
# options whose effect is that a configuration is accepted or refused
GATES = {"allow_future_leak"}


def fingerprint(**kw):
    """Everything an option could change: parameter shapes, module types, chunking, the
    train-mode outputs and aux loss, and the centroids after one training step."""
    torch.manual_seed(0)
    model = RoutingTransformerLM(**{**BASE, **kw})
    ctx = torch.randn(2, 8, model.config.dim) if model.config.receives_context else None
    shapes = [tuple(p.shape) for p in model.parameters()]
    graph = [type(m).__name__ for m in model.modules()]
    chunks = [getattr(m, "chunks", None) for m in model.modules()]
    torch.manual_seed(1)
    x = torch.randint(0, V, (2, 17))
    model.train()
    out, aux = model(x, context=ctx)
    (out.float().pow(2).mean() + aux).backward()  # initialises the centroids from x
    o2, a2 = model(torch.randint(0, V, (2, 17)), context=ctx)
    (o2.float().pow(2).mean() + a2).backward()  # the EMA moves them (another batch)
    centroids = [km.means.clone() for km in kmeans_modules(model)]
    return shapes, graph, chunks, out.detach(), aux.detach(), centroids


@functools.cache
def _base(extra: tuple):
    return fingerprint(**dict(extra))


def differs(a, b):
    sa, ga, ca, oa, xa, ka = a
    sb, gb, cb, ob, xb, kb = b
    if sa != sb or ga != gb or ca != cb or oa.shape != ob.shape:
        return True
    if not torch.allclose(oa, ob) or not torch.allclose(xa, xb):
        return True
    return len(ka) != len(kb) or any(not torch.allclose(p, q) for p, q in zip(ka, kb))


def test_every_config_field_is_covered():
    fields = {f.name for f in dataclasses.fields(RoutingConfig)} - {"extra"}
    assert fields == set(CHANGES) | GATES


def test_allow_future_leak_gates_causal_balanced_routing():
    with pytest.raises(ValueError, match="not causal.*allow_future_leak=True"):
        RoutingConfig(causal=True, routing="balanced")
    RoutingConfig(causal=True, routing="balanced", allow_future_leak=True)


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_option_has_an_effect(name):
    value = CHANGES[name]
    extra = {}
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict):
        value, extra = value
    base = _base(tuple(sorted(extra.items())))
    changed = fingerprint(**{**extra, name: value})
    assert differs(base, changed), f"{name}={value!r} changed nothing"


def test_commitment_factor_scales_the_aux_loss():
    a = fingerprint(commitment_factor=1e-4)[4]
    b = fingerprint(commitment_factor=1e-2)[4]
    torch.testing.assert_close(b, a * 100, rtol=1e-4, atol=0)


def test_ff_mult_sets_the_hidden_width():
    m = RoutingTransformerLM(**{**BASE, "ff_mult": 2.0})
    assert m.transformer.layers[0][1].residual.fn.up_proj.out_features == 64


def test_wrapper_update_kmeans_with_the_automatic_update_off():
    torch.manual_seed(0)
    lm = RoutingTransformerLM(**BASE, register_kmeans_update=False)
    w = AutoregressiveWrapper(lm)
    w(torch.randint(0, V, (2, 18)), return_loss=True).backward()
    before = [km.means.clone() for km in kmeans_modules(lm)]
    w(torch.randint(0, V, (2, 18)), return_loss=True).backward()
    assert all(torch.equal(a, km.means) for a, km in zip(before, kmeans_modules(lm)))
    w.update_kmeans()
    assert any(not torch.equal(a, km.means) for a, km in zip(before, kmeans_modules(lm)))


def test_registry_entry_point_and_pkm_param_groups():
    from retrolm.models.registry import get_family
    from retrolm.models.routing import RoutingLanguageModel, pkm_param_groups

    cfg = RoutingConfig.from_name("routing-tiny", depth=2, pkm_layers=(2,), pkm_num_keys=8)
    model = RoutingLanguageModel(config=cfg)
    loss = model(torch.randint(0, 256, (2, 17)), return_loss=True)
    loss.backward()
    groups = pkm_param_groups(model, lr=1e-3)
    assert groups[1]["lr"] == 1e-2 and len(groups[1]["params"]) == 1
    fam = get_family("routing")  # registered by retrolm.models.registry itself
    assert type(fam.build(fam.make_config())).__name__ == "RoutingLanguageModel"
