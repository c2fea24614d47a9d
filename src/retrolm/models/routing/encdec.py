"""Routing Transformer encoder-decoder: a non-causal routing encoder whose output the causal
decoder reads through routed cross-attention (Roy et al., TACL 2021, arXiv 2003.05997).

Keywords are the LM's, prefixed ``enc_`` or ``dec_`` (``enc_depth=2, dec_window_size=64``).
The encoder returns embeddings; the decoder is causal and receives the context. One k-means
update runs after backward for both (hooked on the encoder's input, whose gradient is the
last one computed), unless the update is turned off and ``update_kmeans()`` is called.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from retrolm.models.autoregressive import AutoregressiveWrapper
from retrolm.models.routing.model import RoutingTransformerLM
from retrolm.nn.kmeans import update_kmeans


def _split(kwargs: dict) -> tuple[dict, dict]:
    enc, dec = {}, {}
    for k, v in kwargs.items():
        if k.startswith("enc_"):
            enc[k[4:]] = v
        elif k.startswith("dec_"):
            dec[k[4:]] = v
        else:
            raise ValueError(f"encoder-decoder keywords start with enc_ or dec_, got {k!r}")
    return enc, dec


class RoutingTransformerEncDec(nn.Module):
    def __init__(self, dim: int, ignore_index: int = -100, pad_value: int = 0, **kwargs) -> None:
        super().__init__()
        enc, dec = _split(kwargs)
        for part in (enc, dec):
            part.setdefault("window_size", 256)
        enc_auto = enc.pop("_register_kmeans_update", enc.pop("register_kmeans_update", True))
        dec.pop("_register_kmeans_update", None)
        dec.pop("register_kmeans_update", None)
        self.encoder = RoutingTransformerLM(
            dim=dim,
            return_embeddings=True,
            causal=enc.pop("causal", False),
            register_kmeans_update=enc_auto,
            **enc,
        )
        self.decoder = RoutingTransformerLM(
            dim=dim, causal=True, receives_context=True, register_kmeans_update=False, **dec
        )
        # the encoder's hook updates the decoder's centroids too
        self.encoder.transformer._kmeans_scope = weakref.ref(self)
        self.dec_wrapper = AutoregressiveWrapper(self.decoder, ignore_index, pad_value)

    def update_kmeans(self) -> None:
        update_kmeans(self)

    def cancel_kmeans_update(self) -> None:
        self.encoder.cancel_kmeans_update()

    def register_kmeans_update(self) -> None:
        self.encoder.register_kmeans_update()

    def forward(
        self,
        seq_in: Tensor,  # (b, m) source tokens
        seq_out: Tensor,  # (b, n + 1) target tokens with return_loss, else (b, n)
        return_loss: bool = False,
        randomly_truncate_sequence: bool = False,
        enc_input_mask: Tensor | None = None,
        dec_input_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``return_loss``: (loss, aux_loss) where ``loss`` = CE + every auxiliary loss (one
        ``loss.backward()`` trains everything) and ``aux_loss`` is their value for logging
        (a leaf: backpropagating it as well changes nothing). Else (logits, aux_loss)."""
        context, enc_aux = self.encoder(seq_in, input_mask=enc_input_mask)
        kw = dict(context=context, context_mask=enc_input_mask)
        if dec_input_mask is not None:
            kw["input_mask"] = dec_input_mask
        if not return_loss:
            logits, dec_aux = self.decoder(seq_out, **kw)
            return logits, enc_aux + dec_aux
        loss = self.dec_wrapper(
            seq_out, return_loss=True, randomly_truncate_sequence=randomly_truncate_sequence, **kw
        )
        loss = loss + enc_aux
        return loss, enc_aux.detach().clone().requires_grad_(True)

    @torch.no_grad()
    def generate(
        self,
        seq_in: Tensor,
        seq_out_start: Tensor,
        seq_len: int | None = None,
        enc_input_mask: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        """Encode once, then decode ``seq_len`` tokens (default: the decoder's max_seq_len
        minus the start) with a KV cache. ``kwargs`` as ``AutoregressiveWrapper.generate``."""
        was = self.training
        self.eval()
        context, _ = self.encoder(seq_in, input_mask=enc_input_mask)
        if seq_len is None:
            seq_len = self.decoder.max_seq_len - seq_out_start.shape[-1]
        out = self.dec_wrapper.generate(
            seq_out_start, seq_len, context=context, context_mask=enc_input_mask, **kwargs
        )
        self.train(was)
        return out
