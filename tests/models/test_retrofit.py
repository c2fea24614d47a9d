"""RETRO-fit (issue 26): a frozen trained decoder (a retrolm run, or a tiny random-weight
GPT-2 / Llama folder) with RETRO's neighbour encoder and chunked cross-attention.

Properties: at step 0 the logits are the base's, bit for bit; training moves the new
weights only (the optimizer holds nothing else); causality and the exact window of
positions each chunk's neighbours may reach; cached decoding equals the full forward; a
checkpoint holds the new weights only and reassembles with the base; bad bases are one line.
"""

from __future__ import annotations

import pytest
import torch
from tests.models.retrofit_bases import make_bert_folder, make_hf_base, make_retrolm_base

from retrolm import retrofit
from retrolm.errors import IncompatibleError

M = 4  # chunk size
SMALL = dict(chunk_size=M, max_seq_len=32, enc_depth=1, dim_head=16)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrofit_bases")
    return {
        "gpt2": make_hf_base(root / "gpt2", "gpt2"),
        "llama": make_hf_base(root / "llama", "llama"),
        "retrolm": make_retrolm_base(root / "run"),
    }


def _logits_of_base(model, ids):
    inner = model.base.model
    out = inner(ids)
    return out if torch.is_tensor(out) else out.logits


def _inputs(model, n=16, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = model.base.vocab_size
    ids = torch.randint(0, v, (2, n), generator=g)
    ret = torch.randint(0, v, (2, n // M, k, 2 * M), generator=g)
    return ids, ret


def _perturb(model, scale=0.3, seed=1):
    """Random new weights (CCA's output projections no longer zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.new_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("kind", ["gpt2", "llama", "retrolm"])
def test_step0_logits_are_the_base_logits_exactly(bases, kind):
    model = retrofit(bases[kind], cca_layers=(2, 3), **SMALL).eval()
    ids, ret = _inputs(model)
    with torch.no_grad():
        want = _logits_of_base(model, ids)
        assert torch.equal(model(ids, ret), want)
        assert torch.equal(model(ids), want)  # retrieval off
    # the new weights are a small share, and none of them is the base's
    new = sum(p.numel() for p in model.new_parameters())
    assert 0 < new < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["gpt2", "retrolm"])
def test_without_neighbours_a_trained_retrofit_is_still_the_base(bases, kind):
    model = retrofit(bases[kind], cca_layers=(2, 3), **SMALL).eval()
    _perturb(model)
    ids, ret = _inputs(model)
    with torch.no_grad():
        assert torch.equal(model(ids), _logits_of_base(model, ids))
        assert not torch.equal(model(ids, ret), _logits_of_base(model, ids))


def _train_steps(model, steps=3, weight_decay=0.1):
    from retrolm.models.registry import Batch
    from retrolm.models.retro.family import retro_loss
    from retrolm.train.optim import param_groups

    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=1e-2)
    model.train()
    ids, ret = _inputs(model, n=17)
    for _ in range(steps):
        loss = retro_loss(model, Batch(ids, ret[:, :4]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("kind", ["llama", "retrolm"])
def test_training_moves_the_new_weights_only(bases, kind):
    model = retrofit(bases[kind], cca_layers=(2, 3), **SMALL)
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    new_before = [p.detach().clone() for p in model.new_parameters()]
    opt = _train_steps(model)
    for k, v in model.base.state_dict().items():
        assert torch.equal(v, base_before[k]), k
    changed = [not torch.equal(a, p) for a, p in zip(new_before, model.new_parameters())]
    assert all(changed)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.new_parameters()}
    assert model.base.training is False  # the frozen base runs without dropout


def test_unfreeze_trains_the_named_base_parameters_too(bases):
    model = retrofit(bases["gpt2"], cca_layers=(3,), unfreeze=("transformer.ln_f",), **SMALL)
    ln_f = model.base.model.transformer.ln_f
    before = ln_f.weight.detach().clone()
    wte = model.base.token_embedding.weight.detach().clone()
    opt = _train_steps(model)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(ln_f.weight) in held and id(ln_f.bias) in held
    assert not torch.equal(ln_f.weight, before)
    assert torch.equal(model.base.token_embedding.weight, wte)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(ln_f.weight) not in decayed  # a norm: no weight decay
    with pytest.raises(ValueError, match="names no parameter"):
        retrofit(bases["gpt2"], unfreeze=("no_such_norm",), **SMALL)


def _reads(p: int) -> int:
    """The chunk whose neighbours position p reads (RETRO: (p+1)//m - 1; < 0: none)."""
    return (p + 1) // M - 1


def _may_change(u: int, n: int, last_layer_only: bool) -> set[int]:
    """Oracle: positions that chunk u's neighbours may reach. With CCA after the last layer
    only, exactly the positions that read chunk u; with CCA earlier, later self-attention
    carries it on to every position from the first reader on."""
    if last_layer_only:
        return {p for p in range(n) if _reads(p) == u}
    return set(range((u + 1) * M - 1, n))


@pytest.mark.parametrize("layers", [(3,), (2, 3)])
def test_neighbour_influence_windows_and_causality_on_a_retrofitted_hf_model(bases, layers):
    model = retrofit(bases["gpt2"], cca_layers=layers, **SMALL).double().eval()
    _perturb(model)
    n = 14  # not a multiple of m: the last chunk's neighbours serve the tail
    ids, ret = _inputs(model, n=16)
    ids, ret = ids[:, :n], ret[:, : n // M]
    with torch.no_grad():
        ref = model(ids, ret)
        for u in range(n // M):
            other = ret.clone()
            other[:, u] = (other[:, u] + 7) % model.base.vocab_size
            diff = (model(ids, other) - ref).abs().amax(dim=(0, 2))
            moved = {p for p in range(n) if diff[p] > 1e-12}
            allowed = _may_change(u, n, layers == (3,))
            assert moved <= allowed, (u, sorted(moved - allowed))
            first = (u + 1) * M - 1
            assert first in moved  # the first reader does read them
            if layers == (3,):
                assert moved == allowed
        for j in range(n):  # causality: a token changes nothing before it
            alt = ids.clone()
            alt[:, j] = (alt[:, j] + 3) % model.base.vocab_size
            out = model(alt, ret)
            assert torch.allclose(out[:, :j], ref[:, :j], atol=1e-12, rtol=0), j
            assert not torch.allclose(out[:, j], ref[:, j])


@pytest.mark.parametrize("kind", ["gpt2", "llama", "retrolm"])
def test_cached_decoding_equals_the_full_forward(bases, kind):
    model = retrofit(bases[kind], cca_layers=(2, 3), **SMALL).double().eval()
    _perturb(model)
    ids, ret = _inputs(model, n=18)
    ret = ret[:, :4]
    with torch.no_grad():
        full = model(ids, ret)
        cache = model.init_cache(2)
        steps = [model(ids[:, :5], ret, cache=cache)]
        steps += [model(ids[:, i : i + 1], ret, cache=cache) for i in range(5, 11)]
        steps.append(model(ids[:, 11:], ret, cache=cache))  # a multi-token piece mid-way
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-10)


def test_checkpoint_holds_the_new_weights_and_reassembles_with_the_base(bases, tmp_path):
    from retrolm.checkpoint import load_model, save_checkpoint
    from retrolm.models.registry import config_to_dict

    model = retrofit(bases["llama"], cca_layers=(2,), **SMALL)
    _perturb(model)
    meta = {"family": "retrofit", "model_config": config_to_dict(model.config), "step": 1}
    ckpt = save_checkpoint(tmp_path / "run", model, meta)
    from safetensors.torch import load_file

    keys = set(load_file(ckpt / "model.safetensors"))
    assert keys and not any(k.startswith("base.") for k in keys)
    assert sum(load_file(ckpt / "model.safetensors")[k].numel() for k in keys) == sum(
        p.numel() for p in model.new_parameters()
    )
    back, _ = load_model(tmp_path / "run")
    ids, ret = _inputs(model)
    with torch.no_grad():
        assert torch.equal(back(ids, ret), model.eval()(ids, ret))


def test_a_retrofit_model_is_its_own_family_and_shares_as_a_folder(bases, tmp_path):
    from retrolm import from_pretrained
    from retrolm.models.registry import family_of

    model = retrofit(bases["retrolm"], cca_layers=(2,), **SMALL).eval()
    _perturb(model)
    assert family_of(model).name == "retrofit"
    model.save_pretrained(tmp_path / "shared")
    back = from_pretrained(tmp_path / "shared")
    ids, ret = _inputs(model)
    with torch.no_grad():
        assert torch.equal(back(ids, ret), model(ids, ret))


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and text
    return text


def test_bad_bases_are_one_line_each(bases, tmp_path):
    from dataclasses import replace

    from retrolm.models.retrofit import RetrofitRETRO

    with pytest.raises(ValueError) as e:  # an encoder, not a decoder
        retrofit(make_bert_folder(tmp_path / "bert"))
    assert "not a decoder-only causal LM" in _one_line(e)
    with pytest.raises(ValueError) as e:  # a folder that is no model at all
        retrofit(tmp_path)
    assert "neither a retrolm run" in _one_line(e)
    with pytest.raises(ValueError) as e:  # a RETRO run that reads neighbours already
        retrofit(make_retrolm_base(tmp_path / "retro", retrieval=True))
    assert "trained with retrieval" in _one_line(e)
    model = retrofit(bases["gpt2"], **SMALL)
    with pytest.raises(FileNotFoundError) as e:  # the base is gone at load time
        RetrofitRETRO(replace(model.config, base=str(tmp_path / "gone")))
    assert "does not exist" in _one_line(e)
    with pytest.raises(IncompatibleError) as e:  # the base changed since
        RetrofitRETRO(replace(model.config, base_hash="0" * 64))
    assert "changed since" in _one_line(e)
    with pytest.raises(ValueError) as e:  # a tokenizer bigger than the base's vocabulary
        RetrofitRETRO(replace(model.config, num_tokens=10**6))
    assert "retrolm db build --tokenizer" in _one_line(e)
