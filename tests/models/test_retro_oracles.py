"""RETRO's geometry against oracles that derive it from the paper, not from the model's code.

Each test runs the whole model in float64, captures what its chunked cross-attention (CCA)
and encoder actually received and returned (forward hooks), and recomputes the result from
scratch: rotary tables built here from RoFormer's formula, positions from the paper's
definitions (Borgeaud et al. 2022 §2.4, App. B.1.2; DESIGN.md "RETRO semantics"):

- CCA queries of chunk u's attending window (positions u*m + m-1 ... u*m + 2m-2) sit at
  relative positions m-1+j, j = 0 ... m-1 (RETRO-pytorch shifts them twice: 2(m-1)+j);
- the keys of each retrieved neighbour + continuation sit at t = 0 ... 2m-1;
- the encoder is conditioned on the decoder states of chunk u taken after the
  self-attention of the first CCA layer, min(P).

Shapes: b batch, n positions, m chunk size, L chunks, k neighbours, r = 2m, e/d widths.
"""

import math

import torch
from tests.tolerance import fp_tol

from retrolm import RETRO, RetroConfig

V, M = 256, 4  # retro-tiny: vocab 256, chunk 4, neighbours 2m = 8


# The model's rotary tables and rotation run in fp32 by design (nn/rotary.py), so the float64
# model agrees with a float64 oracle to fp32 precision: a tolerance of a few fp32 ulps of the
# output's scale. A wrong position moves the output by ~20% of its norm (measured), 4 orders
# of magnitude above it.
TOL = fp_tol(torch.float32, factor=64)["rtol"]


def tiny(**kw) -> RETRO:
    """retro-tiny in float64, with weights drawn large enough (std 0.3 instead of 0.02) that
    attention is peaked: with near-uniform attention a position error changes the output
    by only ~0.5%, which a tolerance could hide."""
    torch.manual_seed(0)
    model = RETRO(RetroConfig.from_name("retro-tiny", **kw)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    scale = float(ref.abs().max())
    torch.testing.assert_close(out, ref, rtol=TOL, atol=TOL * scale)


def inputs(b=2, n=19, k=2, seed=1):
    """Tokens (b, n), neighbours (b, L, k, 2m) with pad tokens inside, and a neighbour mask
    (b, L, k) with some neighbours missing."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, V, (b, n), generator=g)
    ret = torch.randint(1, V, (b, (n + M - 1) // M, k, 2 * M), generator=g)
    ret[0, 1, 0, M + 1 :] = 0  # a continuation cut by a document end: padded
    ret[1, 2, 1, :3] = 0
    present = torch.ones(ret.shape[:3], dtype=torch.bool)
    present[0, 2, 1] = False
    present[1, 0, 0] = False
    return seq, ret, present


def rotate(x: torch.Tensor, pos: torch.Tensor, dim: int) -> torch.Tensor:
    """RoFormer rotary from its definition: channel c < dim/2 pairs with c + dim/2 and turns
    by pos * 10000^(-2c/dim). x (..., s, dh), pos (s,) float64 -> same shape as x."""
    inv = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    ang = pos.double()[:, None] * inv[None]  # (s, dim/2)
    cos, sin = ang.cos(), ang.sin()
    half = dim // 2
    x1, x2, rest = x[..., :half], x[..., half:dim], x[..., dim:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), -1)


def capture(model: RETRO):
    """Hooks recording each CCA module's (args, output) and the encoder's (args, output)."""
    seen = {"cca": {}, "enc": []}
    handles = []
    for i, layer in enumerate(model.layers):
        if layer.cca is not None:

            def hook(mod, args, out, i=i):
                seen["cca"][i + 1] = (args, out)

            handles.append(layer.cca.fn.register_forward_hook(hook))
    handles.append(
        model.encoder.register_forward_hook(lambda mod, args, out: seen["enc"].append((args, out)))
    )
    return seen, handles


@torch.no_grad()
def cca_oracle(cca, h, enc, token_mask, m: int, rot_dim: int, q_shift=0, k_shift=0):
    """CCA by its definition, one position at a time.

    h (b, n, d) the normed states the CCA received; enc (b, L, k, r, e) encoded neighbours;
    token_mask (b, L, k, r) True = a real token of a present neighbour. -> (b, n, d).
    ``q_shift``/``k_shift``: deliberate errors, for the test that shows the oracle can fail.
    """
    attn = cca.attn
    b, n, _ = h.shape
    L, k, r = enc.shape[1:4]
    hd = attn.dim_head
    t = torch.arange(r, dtype=torch.float64) + k_shift  # neighbour + continuation at 0 ... 2m-1
    keys = attn.k_proj(enc).unflatten(-1, (attn.heads, hd))  # (b, L, k, r, h, dh)
    keys = rotate(keys.transpose(-2, -3), t, rot_dim)  # (b, L, k, h, r, dh)
    vals = attn.v_proj(enc).unflatten(-1, (attn.heads, hd)).transpose(-2, -3)
    keys = keys.permute(0, 1, 3, 2, 4, 5).flatten(3, 4)  # (b, L, h, k*r, dh)
    vals = vals.permute(0, 1, 3, 2, 4, 5).flatten(3, 4)
    allowed = token_mask.flatten(2)  # (b, L, k*r)
    out = torch.zeros(b, n, attn.out_proj.out_features, dtype=h.dtype)
    for p in range(n):
        if p < m - 1:  # positions 0 ... m-2 attend nothing: the zero update
            continue
        u = (p - (m - 1)) // m  # the window u*m+m-1 ... u*m+2m-2 holding p
        assert u < L  # n < (L+1)*m: the last chunk's window ends past the sequence
        j = p - (u * m + m - 1)  # slot in the window, 0 ... m-1
        q = attn.q_proj(h[:, p]).unflatten(-1, (attn.heads, hd))[:, :, None]  # (b, h, 1, dh)
        q = rotate(q, torch.tensor([m - 1 + j + q_shift], dtype=torch.float64), rot_dim)
        s = (q @ keys[:, u].transpose(-1, -2)).squeeze(2) / math.sqrt(hd)  # (b, h, k*r)
        s = s.masked_fill(~allowed[:, u, None], float("-inf"))
        w = torch.nan_to_num(s.softmax(-1), nan=0.0)  # a chunk without neighbours: zeros
        o = (w[:, :, None] @ vals[:, u]).squeeze(2)  # (b, h, dh)
        out[:, p] = attn.out_proj(o.flatten(1))
    return out


def test_cca_positions_against_an_oracle():
    """Every CCA layer's output equals the oracle built with queries at m-1+j and keys at t:
    the query double shift 2(m-1)+j or a key shift fails by orders of magnitude."""
    model = tiny()
    seq, ret, present = inputs(n=19)
    seen, handles = capture(model)
    with torch.no_grad():
        model(seq, ret, neighbour_mask=present)
    for hd in handles:
        hd.remove()
    (enc_args, enc) = seen["enc"][0]
    token_mask = (ret != model.config.pad_id) & present[..., None]  # derived here
    assert torch.equal(enc_args[1], token_mask[:, : enc.shape[1]])
    rot_dim = model.config.head_rotary_dim
    assert sorted(seen["cca"]) == [2, 3]
    for layer_no, (args, out) in seen["cca"].items():
        cca = model.layers[layer_no - 1].cca.fn
        h = args[0]
        ref = cca_oracle(cca, h, enc, token_mask[:, : enc.shape[1]], M, rot_dim)
        assert_matches(out, ref)
        assert ref[:, M - 1 :].abs().amax(-1).gt(0).all()  # every position from m-1 reads


def test_cca_oracle_detects_a_shift():
    """The oracle is sensitive to the geometry it guards: queries at 2(m-1)+j or keys at
    t+3 give outputs far outside the tolerance above (so the test above can fail)."""
    model = tiny()
    seq, ret, present = inputs(n=16)
    seen, handles = capture(model)
    with torch.no_grad():
        model(seq, ret, neighbour_mask=present)
    for hd in handles:
        hd.remove()
    _, enc = seen["enc"][0]
    args, out = seen["cca"][2]
    cca, rot_dim = model.layers[1].cca.fn, model.config.head_rotary_dim
    token_mask = ((ret != 0) & present[..., None])[:, : enc.shape[1]]
    good = cca_oracle(cca, args[0], enc, token_mask, M, rot_dim)
    assert_matches(out, good)
    # RETRO-pytorch's double shift 2(m-1)+j = (m-1+j) + (m-1); keys shifted by 3; one late
    for q_shift, k_shift in ((M - 1, 0), (0, 3), (1, 0)):
        bad = cca_oracle(cca, args[0], enc, token_mask, M, rot_dim, q_shift, k_shift)
        assert (bad - out).norm() > 0.05 * out.norm(), (q_shift, k_shift)  # measured 0.17-0.31


def test_encoder_reads_the_states_after_the_first_cca_layers_self_attention():
    """The encoder's chunk states are the output of decoder layer min(P)'s self-attention
    residual, chunk by chunk: not layer 1's, not another layer's, not after the CCA."""
    model = tiny(dec_cross_attn_layers=(3, 2))  # min(P) = 2, listed out of order
    first = min(model.config.dec_cross_attn_layers)
    seq, ret, present = inputs(n=18)
    after_attn = {}
    handles = [
        layer.self_attn.register_forward_hook(
            lambda mod, args, out, i=i: after_attn.__setitem__(i + 1, out)
        )
        for i, layer in enumerate(model.layers)
    ]
    seen, more = capture(model)
    with torch.no_grad():
        model(seq, ret, neighbour_mask=present)
    for hd in handles + more:
        hd.remove()
    chunk_states = seen["enc"][0][0][2]  # (b, L, m, d)
    L = seq.shape[1] // M
    assert chunk_states.shape == (2, L, M, model.config.dec_dim)
    for no, states in after_attn.items():
        expect = states[:, : L * M].unflatten(1, (L, M))
        same = torch.equal(chunk_states, expect)
        assert same == (no == first), f"encoder conditioned on layer {no}'s states"


def test_encoded_neighbours_of_chunk_u_read_chunk_u_states_only():
    """The encoder's conditioning is per chunk: changing chunk 1's decoder states changes
    the encoded neighbours of chunk 1 and of no other chunk."""
    model = tiny()
    seq, ret, present = inputs(n=16)
    seen, handles = capture(model)
    with torch.no_grad():
        model(seq, ret, neighbour_mask=present)
        args, enc = seen["enc"][0]
        ctx = args[2].clone()
        ctx[:, 1] += 1.0  # chunk 1's states
        enc2 = model.encoder(args[0], args[1], ctx, model.rotary)
    for hd in handles:
        hd.remove()
    changed = (enc2 - enc).abs().amax(dim=(0, 2, 3, 4)) > 1e-9  # per chunk
    assert changed.tolist() == [u == 1 for u in range(enc.shape[1])]


def test_cca_window_positions_against_an_oracle_per_chunk():
    """Only positions u*m + m-1 ... u*m + 2m-2 see chunk u (the last chunk's window is cut
    by the sequence's end): replacing chunk u's neighbours changes exactly those rows of a
    model whose only CCA layer is the last one."""
    model = tiny(dec_cross_attn_layers=(3,))
    n = 18
    seq, ret, present = inputs(n=n)
    with torch.no_grad():
        base = model(seq, ret, neighbour_mask=present)
        L = n // M
        for u in range(L):
            pert = ret.clone()
            pert[:, u] = (pert[:, u] + 5) % (V - 1) + 1
            changed = (model(seq, pert, neighbour_mask=present) - base).abs().amax((0, 2)) > 0
            expect = [u * M + M - 1 <= p <= u * M + 2 * M - 2 for p in range(n)]
            assert changed.tolist() == expect, u


def test_missing_neighbours_give_zero_cca_update():
    """A chunk whose neighbours are all missing adds exactly nothing at its window."""
    model = tiny(dec_cross_attn_layers=(3,))
    seq, ret, present = inputs(n=16)
    seen, handles = capture(model)
    none = present.clone()
    none[:, 1] = False
    with torch.no_grad():
        model(seq, ret, neighbour_mask=none)
    for hd in handles:
        hd.remove()
    out = seen["cca"][3][1]
    assert out[:, M - 1 + M : M - 1 + 2 * M].abs().max() == 0  # chunk 1's window
    assert out[:, M - 1 : M - 1 + M].abs().amax(-1).gt(0).all()  # chunk 0's window reads
    assert out.isfinite().all()
