"""An lm-evaluation-harness model: score a retrolm run on lm-eval tasks.

``lm_eval --model retrolm --model_args run=RUN,retrieval=on|off`` once this module is
imported. lm-eval 0.4.13 discovers no models through package entry points (its registry
only knows its own ``MODEL_MAPPING`` and what ``register_model`` adds), so either run
``python -m retrolm.lm_eval_adapter ...`` (lm-eval's own command line with this model
registered) or ``import retrolm.lm_eval_adapter`` before ``lm_eval.simple_evaluate``. The
package also declares the entry point ``lm_eval.models: retrolm`` for tools that read it.

Scoring is ``retrolm.evaluate``'s (``document_nll``): the same windows, chunk alignment and
neighbours from the run's database, so ``loglikelihood_rolling`` of a text equals the NLL
``retrolm eval`` reports for it as a document: the text is tokenized with its ``<eos>``
appended and every token but the first is scored (the first has no context).
``retrieval=off`` scores the same model with no neighbours (a streaming family: its memory
off). Model args: ``run`` (a run folder or checkpoint), ``retrieval`` (on/off, default on),
``db`` (another database), ``batch_size`` (windows per forward), ``max_length`` (window
length, default the model's max_seq_len), ``neighbours`` (k, default 2), ``device``.
"""

from __future__ import annotations

import logging
from typing import Any

import lm_eval.models  # noqa: F401  (registers lm-eval's own models first: see get_model)
import numpy as np
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from retrolm.evaluate import EvalConfig, document_nll
from retrolm.generation import generate

log = logging.getLogger(__name__)

_ON, _OFF = ("on", "true", "1", "yes"), ("off", "false", "0", "no")


def _switch(value: Any) -> bool:
    text = str(value).strip().lower()
    if text not in _ON + _OFF:
        raise ValueError(f"retrieval={value!r} must be on or off")
    return text in _ON


def _device(name: str | None) -> torch.device:
    """The device asked for; lm-eval's command line asks for "cuda" by default, so a
    machine without CUDA falls back to the CPU (logged)."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(str(name))
    if dev.type == "cuda" and not torch.cuda.is_available():
        log.warning("device %s asked for but CUDA is unavailable: running on the CPU", name)
        return torch.device("cpu")
    return dev


@register_model("retrolm")
class RetroLMEval(LM):
    """A retrolm run as an lm-eval ``LM`` (module docstring)."""

    def __init__(
        self,
        run: str,
        retrieval: Any = "on",
        db: str | None = None,
        batch_size: Any = 4,
        max_length: int | None = None,
        neighbours: int = 2,
        device: str | None = None,
        **_ignored: Any,
    ) -> None:
        super().__init__()
        from retrolm.checkpoint import load_model, open_run_data, resolve_checkpoint
        from retrolm.models.registry import family_of, uses_retrieval

        model, meta = load_model(run)
        ckpt = resolve_checkpoint(run)
        database, self.tok = open_run_data(meta, ckpt, db)
        self.model = model.to(_device(device)).eval()
        self.family = meta["family"]
        fam = family_of(model, self.family)
        self.retrieval = _switch(retrieval)
        self.db = database if uses_retrieval(meta) else None
        self.config = EvalConfig(
            seq_len=int(max_length) if max_length else None,
            batch_size=int(batch_size) if str(batch_size).isdigit() else 4,
            num_neighbours=int(neighbours),
        )
        if fam.streaming:  # memory on / off
            modes = list(fam.eval_variants(model)) or ["memory"]
            self.mode = modes[0] if self.retrieval or len(modes) == 1 else modes[-1]
            self.db = None
        elif self.db is not None:
            self.mode = "retrieval" if self.retrieval else "no_retrieval"
        else:
            self.mode = "no_retrieval"
        log.info("retrolm %s model from %s, scoring mode %s", self.family, ckpt, self.mode)

    # ---- scoring -------------------------------------------------------------------
    def _nll(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(L,) NLL and greedy flags of ``ids`` in this adapter's mode."""
        greedy: dict[str, np.ndarray] = {}
        nll = document_nll(
            self.model,
            ids,
            self.db if self.mode != "no_retrieval" else None,
            modes=[self.mode],
            config=self.config,
            family=self.family,
            pad_id=self.tok.pad_id,
            greedy=greedy,
        )
        return nll[self.mode], greedy[self.mode]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list:
        out = []
        for req in requests:
            (text,) = req.args
            ids = self.tok.encode(text) + [self.tok.eos_id]
            nll, _ = self._nll(ids)
            out.append(-float(nll[1:].sum()))
        return out

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids, the continuation taken from the encoding of the
        whole text (as lm-eval's own models do; trailing context spaces move over)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context)
        if whole[: len(ctx)] != ctx:  # a token straddles the boundary: encode apart
            return ctx, self.tok.encode(continuation)
        return ctx, whole[len(ctx) :]

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list:
        out = []
        for req in requests:
            context, continuation = req.args
            ctx, cont = self._encode_pair(context, continuation)
            if not cont:
                out.append((0.0, True))
                continue
            ids = ([self.tok.eos_id] if not ctx else ctx) + cont  # empty context: <eos>
            nll, greedy = self._nll(ids)
            n = len(cont)
            out.append((-float(nll[-n:].sum()), bool(greedy[-n:].all())))
        return out

    # ---- generation ----------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        max_len = int(self.model.config.max_seq_len)
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kwargs.pop("max_gen_toks", 64))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
            ids = self.tok.encode(context) or [self.tok.eos_id]  # empty context: <eos>
            ids = ids[-max(1, max_len - new) :]  # keep room for the answer
            res = generate(
                self.model,
                torch.tensor(ids),
                new,
                self.db if self.mode == "retrieval" else None,
                num_neighbours=self.config.num_neighbours,
                temperature=temperature,
                eos_id=self.tok.eos_id,
                pad_id=self.tok.pad_id,
                seed=0,
                family=self.family,
            )
            text = self.tok.decode(res.new_ids[0].tolist())
            cuts = [text.find(s) for s in until if s and s in text]
            out.append(text[: min(cuts)] if cuts else text)
        return out

    @property
    def tokenizer_name(self) -> str:
        return f"retrolm-{self.tok.hash[:12]}"


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``retrolm`` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
