"""The list of semantic mutants ``run.py`` applies, one at a time, to a copy of the project.

Each mutant is a plausible bug in a definition the paper (or the design) fixes: an offset,
a mask, a sign, an order. ``replace`` holds (original, mutated) snippets of ``file``; each
original must occur exactly once there. ``hints`` are test files of the default suite
likely to catch it (run first, to be quick); the whole default suite runs if they pass.
Add one for each new family or mechanism as it lands.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    replace: tuple[tuple[str, str], ...]
    description: str
    hints: tuple[str, ...] = ()


RETRO = "src/retrolm/models/retro/model.py"
RETRO_FUSED = "src/retrolm/models/retro/fused.py"
T_RETRO = "tests/models/test_retro.py"
T_ORACLES = "tests/models/test_retro_oracles.py"

MUTANTS: list[Mutant] = [
    Mutant(
        "cca_query_double_shift",
        RETRO,
        (
            (
                "q_cca = self.rotary.span(c.chunk_size - 1, c.chunk_size, seq.device)",
                "q_cca = self.rotary.span(2 * (c.chunk_size - 1), c.chunk_size, seq.device)",
            ),
        ),
        "CCA queries at 2(m-1)+j instead of m-1+j (RETRO-pytorch's bug B1)",
        (T_ORACLES,),
    ),
    Mutant(
        "cca_query_double_shift_decode",
        RETRO_FUSED,
        (
            (
                "model.rotary.span(m - 1, m, seq.device))",
                "model.rotary.span(2 * (m - 1), m, seq.device))",
            ),
        ),
        "the same double shift in the fused one-token decoding step only",
        ("tests/nn/test_fused_decode.py", T_RETRO),
    ),
    Mutant(
        "encoder_on_decoder_layer_1",
        RETRO,
        (
            (
                "if layer_no == self.cca_layers[0] and retrieved is not None:",
                "if layer_no == 1 and retrieved is not None:",
            ),
        ),
        "the encoder conditioned on decoder layer 1's states, not the first CCA layer's",
        (T_ORACLES,),
    ),
    Mutant(
        "encoder_on_decoder_layer_1_decode",
        RETRO_FUSED,
        (
            (
                "if retrieving and i + 1 == model.cca_layers[0]:",
                "if retrieving and i + 1 == 1:",
            ),
        ),
        "the same, in the chunk states the fused decoding step keeps",
        ("tests/nn/test_fused_decode.py",),
    ),
    Mutant(
        "neighbour_key_rotary_shift_3",
        RETRO,
        (
            (
                "k_rotary = self.rotary.span(0, self.config.retrieved_len, enc.device)",
                "k_rotary = self.rotary.span(3, self.config.retrieved_len, enc.device)",
            ),
        ),
        "neighbour keys at t+3 instead of t = 0 ... 2m-1",
        (T_ORACLES,),
    ),
    Mutant(
        "cca_window_one_late",
        RETRO,
        (
            ("first = min(max(m - 1 - start, 0), t)", "first = min(max(m - start, 0), t)"),
            (
                "u0, u1 = (start + first + 1) // m - 1, (start + t) // m - 1",
                "u0, u1 = (start + first) // m - 1, (start + t - 1) // m - 1",
            ),
            ("lead = (start + first - (m - 1)) % m", "lead = (start + first - m) % m"),
        ),
        "chunk u's neighbours read from u*m+m (chunk u+1's first token), one position late",
        (T_ORACLES, T_RETRO),
    ),
    Mutant(
        "cca_layers_off_by_one",
        RETRO,
        (
            (
                "cca=(i + 1) in c.dec_cross_attn_layers",
                "cca=i in c.dec_cross_attn_layers",
            ),
        ),
        "dec_cross_attn_layers read as 0-based: CCA one decoder layer late",
        (T_RETRO,),
    ),
    Mutant(
        "encoder_cross_layers_off_by_one",
        RETRO,
        (
            (
                "cross=(i + 1) in c.enc_cross_attn_layers",
                "cross=i in c.enc_cross_attn_layers",
            ),
        ),
        "enc_cross_attn_layers read as 0-based: the chunk states read one encoder layer late",
        (T_RETRO,),
    ),
    Mutant(
        "missing_neighbour_mask_inverted",
        RETRO,
        (
            (
                "token_mask = token_mask & neighbour_mask[..., None]",
                "token_mask = token_mask & ~neighbour_mask[..., None]",
            ),
        ),
        "missing neighbours attended, present ones masked",
        (T_RETRO,),
    ),
    Mutant(
        "neighbour_pad_tokens_attended",
        RETRO,
        (
            (
                "x = layer.self_attn(x, mask=keep, q_rotary=pos_r, k_rotary=pos_r)",
                "x = layer.self_attn(x, mask=None, q_rotary=pos_r, k_rotary=pos_r)",
            ),
        ),
        "the encoder's self-attention lets pad tokens of a neighbour reach its real tokens",
        (T_RETRO,),
    ),
    Mutant(
        "decoder_self_attention_not_causal",
        RETRO,
        (
            (
                "c.dec_dim, c.heads, c.dim_head, dropout=c.dec_attn_dropout, causal=True",
                "c.dec_dim, c.heads, c.dim_head, dropout=c.dec_attn_dropout, causal=False",
            ),
        ),
        "the decoder's self-attention sees the future",
        (T_RETRO,),
    ),
    Mutant(
        "same_document_filter_off_training",
        "src/retrolm/data.py",
        (("valid &= ~np.isin(cand_docs, seq_docs)", "valid &= True"),),
        "training neighbours may come from a document the training sequence touches",
        ("tests/test_data.py",),
    ),
    Mutant(
        "same_document_filter_off_database",
        "src/retrolm/retrieval/neighbours.py",
        (
            (
                "return doc_ids[ids] == query_docs[rows, None]  # also drops the chunk itself",
                "return ids < 0",
            ),
        ),
        "the database's neighbour lists keep the chunk itself and its own document",
        ("tests/retrieval/test_neighbours.py",),
    ),
    Mutant(
        "local_attention_not_causal_blocked",
        "src/retrolm/nn/local_attention.py",
        (
            (
                "allowed = ((dist >= 0) & (dist < window)) if causal else",
                "allowed = (dist < window) if causal else",
            ),
        ),
        "blocked local attention: later keys of the query's own block visible",
        ("tests/nn/test_attention.py",),
    ),
    Mutant(
        "local_attention_not_causal_mask",
        "src/retrolm/nn/masks.py",
        (
            (
                "return (dist >= 0) & (dist < window)",
                "return dist < window",
            ),
        ),
        "the causal sliding-window mask lets every later key in",
        ("tests/nn/test_attention.py",),
    ),
    Mutant(
        "kmeans_commitment_sign",
        "src/retrolm/nn/kmeans.py",
        (
            (
                "err = torch.rsub(best, 2.0, alpha=2.0) / self.dim",
                "err = -torch.rsub(best, 2.0, alpha=2.0) / self.dim",
            ),
        ),
        "the commitment loss pushes queries and keys away from their centroids",
        ("tests/nn/test_block_oracles.py",),
    ),
    Mutant(
        "routing_sort_positions_descending",
        "src/retrolm/nn/sorted_window.py",
        (
            (
                "return torch.where(group < 0, big, group) * n + pos",
                "return torch.where(group < 0, big, group) * n + (n - 1 - pos)",
            ),
        ),
        "tokens of a cluster sorted by descending position: the window looks at the future",
        ("tests/nn/test_routing_blocks.py", "tests/models/test_routing.py"),
    ),
    Mutant(
        "routing_cache_sort_descending",
        "src/retrolm/models/routing/cache.py",
        (
            (
                "order = (groups * n + pos).argsort(dim=-1)",
                "order = (groups * n - pos).argsort(dim=-1)",
            ),
        ),
        "the routing cache's (cluster, position) order with positions descending",
        ("tests/models/test_routing.py",),
    ),
    Mutant(
        "pkm_product_index_swapped",
        "src/retrolm/nn/pkm.py",
        (
            (
                "ci = i[0][..., :, None] * self.num_keys + i[1][..., None, :]",
                "ci = i[1][..., :, None] * self.num_keys + i[0][..., None, :]",
            ),
        ),
        "PKM reads the value slot of the transposed key pair",
        ("tests/nn/test_block_oracles.py",),
    ),
    Mutant(
        "moe_gate_not_renormalised",
        "src/retrolm/nn/moe.py",
        (("w = (w / w.sum(-1, keepdim=True)).to(x.dtype)", "w = w.to(x.dtype)"),),
        "MoE weights each expert by its raw gate probability, not renormalised over top_k",
        ("tests/nn/test_block_oracles.py",),
    ),
    Mutant(
        "wrapper_label_mask_off_by_one",
        "src/retrolm/models/autoregressive.py",
        (
            (
                "labels.masked_fill(~mask[:, 1 : inp.shape[1] + 1], self.ignore_index)",
                "labels.masked_fill(~mask[:, : inp.shape[1]], self.ignore_index)",
            ),
        ),
        "the wrapper ignores labels by the mask of the input token, not of the label",
        ("tests/models/test_autoregressive.py",),
    ),
    Mutant(
        "eval_skips_the_nearest_neighbour",
        "src/retrolm/evaluate.py",
        (
            (
                "ret, mask = db.retrieved_tokens(nbr[:, :k])",
                "ret, mask = db.retrieved_tokens(nbr[:, 1 : k + 1])",
            ),
        ),
        "evaluation's retrieval mode feeds neighbours 2 ... k+1 instead of the k nearest",
        ("tests/test_evaluate.py",),
    ),
    Mutant(
        "streamed_eval_forgets_between_pieces",
        "src/retrolm/evaluate.py",
        (
            (
                "fam.logits(model, x, cache).float()",
                "fam.logits(model, x, fam.init_cache(model, x.shape[0])).float()",
            ),
        ),
        "streamed evaluation starts a fresh memory for every piece instead of the document",
        ("tests/test_streaming.py",),
    ),
    Mutant(
        "memorizing_xl_bias_at_distance_zero",
        "src/retrolm/models/memorizing/knn_attention.py",
        (
            (
                "self.bias = bias.toeplitz(j - n, n, j)[None]",
                "self.bias = bias.toeplitz(0, n, j)[None]",
            ),
        ),
        "queries at 0 ... n-1 for the relative bias (memorizing-transformers-pytorch's bug): "
        "every XL key gets the bias of distance 0",
        ("tests/models/test_memorizing.py",),
    ),
    Mutant(
        "memorizing_xl_keeps_the_oldest",
        "src/retrolm/models/memorizing/model.py",
        (
            (
                "st.xl[i], new_valid = kv[:, -m:], both[:, -m:]",
                "st.xl[i], new_valid = kv[:, :m], both[:, :m]",
            ),
        ),
        "the XL window keeps the oldest pairs instead of the last xl_max_memories",
        ("tests/models/test_memorizing.py",),
    ),
    Mutant(
        "knn_memory_stops_at_capacity",
        "src/retrolm/nn/knn_memory.py",
        (
            (
                "slots[i], ok[i] = t.clamp(min=0) % self.max_memories, t >= 0",
                "slots[i], ok[i] = t.clamp(min=0, max=self.max_memories - 1), t >= 0",
            ),
        ),
        "past capacity every pair overwrites the last slot instead of the oldest (the ring)",
        ("tests/nn/test_knn_memory.py",),
    ),
    Mutant(
        "glt_shuffle_order",
        "src/retrolm/nn/group_linear.py",
        (
            (
                "y = t.permute(1, 2, 0) if shuffle else t.transpose(0, 1)",
                "y = t.transpose(0, 1)",
            ),
        ),
        "GroupLinear(shuffle=True) leaves group j's outputs contiguous (no interleave)",
        ("tests/nn/test_group_linear.py",),
    ),
    Mutant(
        "glt_backward_ignores_shuffle",
        "src/retrolm/nn/group_linear.py",
        (
            (
                "gg = _to_groups(grad, weight.shape[0], ctx.shuffle, weight.dtype)",
                "gg = _to_groups(grad, weight.shape[0], False, weight.dtype)",
            ),
        ),
        "GroupLinear's backward reads the output gradient as if unshuffled",
        ("tests/nn/test_group_linear.py",),
    ),
    Mutant(
        "dextra_paper_groups_start_at_two",
        "src/retrolm/models/delight/dextra.py",
        (('first = 0 if glt_groups == "paper" else 1', "first = 1"),),
        "DExTra's paper schedule starts at 2 groups, as the reference code does",
        ("tests/models/test_delight_blocks.py",),
    ),
    Mutant(
        "segment_piece_unweighted",
        "src/retrolm/models/memorizing/family.py",
        (
            (
                "return model(part, cache=cache, return_loss=True) * (count / total)",
                "return model(part, cache=cache, return_loss=True)",
            ),
        ),
        "segment-by-segment training: each piece's loss not weighted by its share of labels",
        ("tests/models/test_memorizing_training.py",),
    ),
    Mutant(
        "dextra_fold_ignores_mixer",
        "src/retrolm/models/delight/dextra_decode.py",
        (
            (
                "x_w, h_w = _rows(lin, glt.groups, p, h_width, w)",
                "x_w, h_w = _rows(lin, 1, p, h_width, w)",
            ),
        ),
        "folded DExTra (decoding): the input mixer's group interleave left out of the fold",
        ("tests/models/test_delight_decode.py",),
    ),
    Mutant(
        "retrofit_base_not_frozen",
        "src/retrolm/models/retrofit/base.py",
        (
            (
                "p.requires_grad_(any(hit(name, u) for u in wanted))",
                "p.requires_grad_(True)",
            ),
        ),
        "RETRO-fit: the base's parameters left trainable (the optimizer updates the base)",
        ("tests/models/test_retrofit.py",),
    ),
    Mutant(
        "retrofit_cca_out_not_zeroed",
        "src/retrolm/models/retrofit/model.py",
        (("nn.init.zeros_(out.weight)", "nn.init.normal_(out.weight, std=0.02)"),),
        "RETRO-fit: CCA's output projection starts random, so step 0 is not the base",
        ("tests/models/test_retrofit.py",),
    ),
    Mutant(
        "infini_delta_without_subtraction",
        "src/retrolm/models/infini/memory.py",
        (
            (
                "            v = v - _read(features, past)",
                "            v = v + 0 * _read(features, past)",
            ),
        ),
        "Infini-attention's delta rule (eq. 5) writes V, not what the memory lacks (V - read)",
        ("tests/models/test_infini.py",),
    ),
    Mutant(
        "plain_bias_attention_unscaled",
        "src/retrolm/nn/attention.py",
        (
            (
                "sim = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).add_(bias)",
                "sim = torch.matmul(q, k.transpose(-1, -2)).add_(bias)",
            ),
        ),
        "the half-precision biased attention forgets the 1/sqrt(d) scale of q.k",
        ("tests/nn/test_relative_bias.py",),
    ),
    Mutant(
        "infini_gate_swapped",
        "src/retrolm/models/infini/memory.py",
        (
            (
                "return out * gate + mem_out * (1 - gate)",
                "return out * (1 - gate) + mem_out * gate",
            ),
        ),
        "Infini-attention's gate (eq. 6) weighs the memory by sigmoid(g) and the local by 1 - it",
        ("tests/models/test_infini.py",),
    ),
    Mutant(
        "infini_fused_gate_per_row",
        "src/retrolm/nn/fused/csrc/decode_blocks.cpp",
        (
            (
                "const float g = 1.f / (1.f + std::exp(-gp[i % h]));",
                "const float g = 1.f / (1.f + std::exp(-gp[(i / h) % h]));",
            ),
        ),
        "the fused one-token Infini step reads the gate of the wrong head (by row, not head)",
        ("tests/models/test_infini_fused.py",),
    ),
]
