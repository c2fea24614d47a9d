"""The DeLighT language model (Mehta et al., "DeLighT: Deep and Light-weight Transformer",
ICLR 2021), and OpenELM's layer-wise scaled decoder (Mehta et al., 2024) as its second
block kind.

Notation: b batch, n positions, V vocabulary, d = dim, e = emb_map_dim.

    ids (b, n) ─ embed ─► (b, n, d) + positions ─ recurrent dropout ─► block 0 … block B-1
              ─ final norm ─► logits (b, n, V) = h @ E^T (tied; with DeFINE, (h W_e) @ E^T)

* ``block="delight"``: DeLighT blocks (``block.py``: DExTra d -> d/2, one attention head
  of width d/2, light FFN d -> d/r -> d) whose DExTra depth N^b and width multiplier w^b
  grow from the first block to the last (block-wise scaling, ``nn.depth_width_schedule``,
  §3.3): the blocks near the input are shallow and narrow, those near the output deep and
  wide. The embedding is a plain lookup (x sqrt(d)) or DeFINE (``define.py``: an e-wide
  lookup x sqrt(e), then a DExTra e -> d); positions are sinusoidal or learned and added
  to the embedding, with one dropout mask per sequence (the reference's "recurrent
  dropout": the same features dropped at every position).
* ``block="openelm"``: OpenELM blocks (``openelm.py``: pre-RMSNorm, GQA with QK-norm and
  rotary, SwiGLU, no biases) whose query/key-value heads and FFN widths grow linearly with
  depth (layer-wise scaling). Positions come from the rotary; the final norm is RMSNorm.

``block_table()`` gives each block's parameters and multiply-accumulates per token (the
reference's ``--print-stats``); ``describe_blocks()`` formats it, and ``retrolm train``
logs it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrolm.models.delight.block import DeLighTBlock
from retrolm.models.delight.cache import DeLighTCache
from retrolm.models.delight.config import DeLighTConfig
from retrolm.models.delight.define import DeFINE
from retrolm.models.delight.dextra import norm_name
from retrolm.models.delight.openelm import OpenELMBlock
from retrolm.models.pretrained import PreTrainedMixin
from retrolm.nn.group_linear import GroupLinear
from retrolm.nn.kv_cache import KVCache
from retrolm.nn.losses import cross_entropy
from retrolm.nn.norms import RMSNorm, make_norm
from retrolm.nn.positions import AbsolutePositions
from retrolm.nn.rotary import RotaryEmbedding

__all__ = ["BlockStats", "DeLighTLM", "format_block_table"]


@dataclass(frozen=True)
class BlockStats:
    """One row of ``DeLighTLM.block_table``."""

    name: str  # "embedding", "block 0", …, "output"
    shape: str  # DeLighT: DExTra depth and width multiplier; OpenELM: heads and FFN width
    params: int
    macs: int  # multiply-accumulates per token (weights, plus attention over the context)


def linear_macs(module: nn.Module) -> int:
    """Multiply-accumulates per token of every ``nn.Linear`` and ``nn.GroupLinear`` in
    ``module``: one per weight (a group linear stores only its ``i·o/g`` weights)."""
    return sum(
        m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, GroupLinear))
    )


def recurrent_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout of (b, n, d) with one mask per sequence, shared by all n positions."""
    if not training or p == 0.0:
        return x
    keep = torch.empty_like(x[:, :1]).bernoulli_(1.0 - p)  # (b, 1, d)
    return x * keep / (1.0 - p)


class DeLighTLM(PreTrainedMixin, nn.Module):
    """``DeLighTLM(num_tokens, dim, **options)`` or ``DeLighTLM(config=DeLighTConfig(...))``
    (options: the fields of ``DeLighTConfig``). ``lm(ids)`` -> logits (b, n, V);
    ``lm(seq, return_loss=True)`` -> the mean next-token loss of seq[:, 1:] given
    seq[:, :-1] (labels ``ignore_index`` skipped); ``lm(ids, cache=lm.init_cache(b))``
    -> logits of the new ids only, after those the cache holds."""

    def __init__(
        self,
        num_tokens: int | None = None,
        dim: int | None = None,
        *,
        config: DeLighTConfig | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        cfg = self.config = _config(num_tokens, dim, config, options)
        self.scale = 1.0
        self.positions: AbsolutePositions | None = None
        self.rotary: RotaryEmbedding | None = None
        self.out_proj: nn.Linear | None = None
        if cfg.block == "delight":
            self._build_delight(cfg)
        else:
            self._build_openelm(cfg)
        self.to_logits = None if cfg.tie_embedding else nn.Linear(cfg.dim, cfg.num_tokens, False)

    def _build_delight(self, cfg: DeLighTConfig) -> None:
        common = dict(
            max_groups=cfg.max_groups,
            glt_groups=cfg.glt_groups,
            norm_type=cfg.norm_type,
            act_type=cfg.act_type,
        )
        if cfg.emb_map_dim is None:
            self.embed = nn.Embedding(cfg.num_tokens, cfg.dim)
            nn.init.normal_(self.embed.weight, std=cfg.dim**-0.5)
            self.scale = math.sqrt(cfg.dim)
        else:
            self.embed = DeFINE(
                cfg.num_tokens,
                cfg.emb_map_dim,
                cfg.dim,
                depth=cfg.min_depth,
                width_mult=cfg.width_mult,
                shuffle=cfg.glt_shuffle,
                dropout=cfg.delight_dropout,
                **common,
            )
            if cfg.tie_embedding:  # scores h against the e-wide table
                self.out_proj = nn.Linear(cfg.dim, cfg.emb_map_dim, bias=False)
        if cfg.pos_emb == "rotary":  # the blocks' single head (dim/2 wide) is rotated
            self.rotary = RotaryEmbedding(cfg.dim // 2)
        else:
            self.positions = AbsolutePositions(cfg.pos_emb, cfg.max_seq_len, cfg.dim)
        self.blocks = nn.ModuleList(
            DeLighTBlock(
                cfg.dim,
                s.depth,
                s.width_mult,
                ffn_red=cfg.ffn_red,
                shuffle=cfg.glt_shuffle,
                dropout=cfg.dropout,
                attn_dropout=cfg.attn_dropout,
                delight_dropout=cfg.delight_dropout,
                **common,
            )
            for s in cfg.schedule()
        )
        self.norm = make_norm(norm_name(cfg.norm_type), cfg.dim)

    def _build_openelm(self, cfg: DeLighTConfig) -> None:
        self.embed = nn.Embedding(cfg.num_tokens, cfg.dim)
        nn.init.normal_(self.embed.weight, std=0.02)  # OpenELM's initializer_range
        self.rotary = RotaryEmbedding(cfg.head_dim)
        self.blocks = nn.ModuleList(
            OpenELMBlock(
                cfg.dim,
                s.q_heads,
                s.kv_heads,
                cfg.head_dim,
                s.ffn_dim,
                normalize_qk=cfg.normalize_qk_projections,
                act_type=cfg.act_type,
                dropout=cfg.dropout,
                attn_dropout=cfg.attn_dropout,
            )
            for s in cfg.schedule()
        )
        self.norm = RMSNorm(cfg.dim)

    # ------------------------------------------------------------------------- forward

    def init_cache(self, batch_size: int) -> DeLighTCache:
        """An empty decoding cache (the batch size comes with the first ids)."""
        return DeLighTCache(0, [KVCache() for _ in self.blocks])

    def forward(
        self, ids: Tensor, return_loss: bool = False, cache: DeLighTCache | None = None
    ) -> Tensor:
        """ids (b, n) -> logits (b, n, V); with ``return_loss`` ids has n + 1 tokens and the
        result is the scalar loss; with ``cache`` the ids follow the cached ones."""
        labels = None
        if return_loss:
            if cache is not None:
                raise ValueError("return_loss=True scores a whole sequence: pass cache=None")
            ids, labels = ids[:, :-1], ids[:, 1:]
        offset = 0 if cache is None else cache.pos
        n = ids.shape[1]
        if offset + n > self.config.max_seq_len:
            raise ValueError(
                f"positions {offset} ... {offset + n - 1} exceed max_seq_len="
                f"{self.config.max_seq_len}; shorten the input or raise max_seq_len"
            )
        x = self._embed(ids, offset)  # (b, n, d)
        rotary = None if self.rotary is None else self.rotary.span(offset, n, ids.device)
        for i, blk in enumerate(self.blocks):
            kv = None if cache is None else cache.kv[i]
            x = blk(x, rotary=rotary, cache=kv)
        if cache is not None:
            cache.pos += n
        logits = self._logits(self.norm(x))  # (b, n, V)
        if labels is None:
            return logits
        return cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), self.config.ignore_index
        )

    def _embed(self, ids: Tensor, offset: int) -> Tensor:  # (b, n) -> (b, n, d)
        x = self.embed(ids)
        if self.scale != 1.0:
            x = x * self.scale
        if self.positions is not None:
            x = x + self.positions(ids.shape[1], offset).to(x.dtype)
        return recurrent_dropout(x, self.config.dropout, self.training)

    def _logits(self, h: Tensor) -> Tensor:  # (b, n, d) -> (b, n, V)
        if self.to_logits is not None:
            return self.to_logits(h)
        if self.out_proj is not None:
            h = self.out_proj(h)  # (b, n, e)
        return F.linear(h, self.embed.weight)

    # ------------------------------------------------------------------ the block table

    def block_table(self, context: int | None = None) -> list[BlockStats]:
        """Parameters and multiply-accumulates per token of the embedding, every block and
        the output layer. A block's MACs count its weights once per token plus its
        attention over ``context`` keys (scores and weighted sum, 2 · context · width;
        default ``max_seq_len``, the last position of a full window)."""
        ctx = self.config.max_seq_len if context is None else context
        rows = [BlockStats("embedding", self._embed_shape(), _params(self.embed),
                           linear_macs(self.embed))]  # fmt: skip
        if self.positions is not None:
            rows.append(BlockStats("positions", self.config.pos_emb, _params(self.positions), 0))
        for i, (blk, s) in enumerate(zip(self.blocks, self.config.schedule(), strict=True)):
            if isinstance(blk, DeLighTBlock):
                shape, width = f"N={s.depth} w={s.width_mult:g}", self.config.dim // 2
            else:
                shape = f"heads {s.q_heads}/{s.kv_heads} ffn {s.ffn_dim}"
                width = s.q_heads * self.config.head_dim
            rows.append(BlockStats(f"block {i}", shape, _params(blk),
                                   linear_macs(blk) + 2 * ctx * width))  # fmt: skip
        out = [m for m in (self.out_proj, self.to_logits, self.norm) if m is not None]
        tied = 0 if self.to_logits is not None else self.config.num_tokens * self._table_width()
        rows.append(BlockStats("output", "tied" if self.to_logits is None else "separate",
                               sum(_params(m) for m in out),
                               sum(linear_macs(m) for m in out) + tied))  # fmt: skip
        return rows

    def describe_blocks(self, context: int | None = None) -> str:
        """``block_table`` as text (what ``retrolm train`` logs)."""
        return format_block_table(self.block_table(context))

    def _embed_shape(self) -> str:
        if isinstance(self.embed, DeFINE):
            return f"DeFINE {self.embed.map_dim} -> {self.config.dim}"
        return f"lookup {self.config.dim}"

    def _table_width(self) -> int:
        return self.embed.map_dim if isinstance(self.embed, DeFINE) else self.config.dim


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def format_block_table(rows: list[BlockStats]) -> str:
    """A fixed-width table of ``BlockStats`` rows with a total line."""
    lines = [f"{'':<10} {'shape':<26} {'params':>12} {'MACs/token':>12}"]
    for r in rows:
        lines.append(f"{r.name:<10} {r.shape:<26} {r.params:>12,} {r.macs:>12,}")
    total_p, total_m = sum(r.params for r in rows), sum(r.macs for r in rows)
    lines.append(f"{'total':<10} {'':<26} {total_p:>12,} {total_m:>12,}")
    return "\n".join(lines)


def _config(
    num_tokens: int | None, dim: int | None, config: DeLighTConfig | None, options: dict
) -> DeLighTConfig:
    """The config of ``DeLighTLM(...)``'s arguments: ``config`` alone, or keywords."""
    if config is not None:
        given = [k for k, v in (("num_tokens", num_tokens), ("dim", dim)) if v is not None]
        if given or options:
            raise ValueError(
                f"pass config= or keyword options, not both (got config and "
                f"{sorted([*given, *options])})"
            )
        return config
    names = {f.name for f in dataclasses.fields(DeLighTConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"unknown DeLighTLM options {unknown}; valid: {sorted(names)}")
    if num_tokens is None or dim is None:
        raise ValueError("DeLighTLM needs num_tokens and dim (or config=DeLighTConfig(...))")
    return DeLighTConfig(num_tokens=num_tokens, dim=dim, **options)
