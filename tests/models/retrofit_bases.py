"""Tiny bases for the RETRO-fit tests: random-weight GPT-2 and Llama folders (with a
byte-level BPE tokenizer trained here on a few sentences, saved as a
``PreTrainedTokenizerFast`` folder) and a retrolm RETRO run trained without retrieval."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SENTENCES = [
    "In the beginning was the word, and the word was with the chunk.",
    "Retrieval reads the neighbours of every chunk before the next one starts.",
    "A frozen decoder keeps its weights; only the new layers learn to read.",
    "The quick brown fox jumps over the lazy dog, again and again.",
] * 4
END = {"gpt2": "<|endoftext|>", "llama": "</s>"}
SPECIALS = {"gpt2": ["<|endoftext|>"], "llama": ["<unk>", "<s>", "</s>"]}


def make_tokenizer(folder: Path, arch: str, vocab: int = 300):
    """A byte-level BPE with the architecture's special tokens, saved into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIALS[arch],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=END[arch])
    fast.save_pretrained(folder)
    return tok


def make_hf_base(folder: Path, arch: str = "gpt2", layers: int = 3, width: int = 32) -> Path:
    """A random-weight causal LM of ``arch`` (gpt2 | llama) with its tokenizer in ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder, arch)
    vocab, eos = tok.get_vocab_size(), tok.token_to_id(END[arch])
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = GPT2Config(
            n_layer=layers, n_embd=width, n_head=2, vocab_size=vocab, n_positions=64,
            bos_token_id=eos, eos_token_id=eos,
        )  # fmt: skip
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(
            num_hidden_layers=layers, hidden_size=width, num_attention_heads=2,
            num_key_value_heads=1, intermediate_size=2 * width, vocab_size=vocab,
            max_position_embeddings=64, bos_token_id=1, eos_token_id=eos,
        )  # fmt: skip
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    return folder


def make_bert_folder(folder: Path) -> Path:
    """An encoder (not a decoder): BERT's config.json, for the refusal."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "bert",
                "architectures": ["BertModel"],
                "vocab_size": 50,
                "hidden_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 1,
                "intermediate_size": 8,
            }
        )  # fmt: skip
    )
    return folder


def make_retrolm_base(run: Path, vocab: int = 64, seed: int = 0, retrieval: bool = False) -> Path:
    """A retrolm RETRO run folder (retro-tiny, chunks of 4) as ``train --no-retrieval``
    leaves it: random weights, no training needed."""
    from retrolm.checkpoint import save_checkpoint
    from retrolm.models.registry import config_to_dict
    from retrolm.models.retro import RETRO, RetroConfig

    torch.manual_seed(seed)
    cfg = RetroConfig.from_name("retro-tiny", num_tokens=vocab, dec_depth=4,
                                dec_cross_attn_layers=(2, 4))  # fmt: skip
    model = RETRO(config=cfg)
    meta = {
        "family": "retro",
        "model_config": config_to_dict(cfg),
        "train_config": {"retrieval": retrieval},
        "database": {"path": None, "tokenizer_hash": "t" * 64, "chunk_size": 4},
        "step": 1,
    }
    save_checkpoint(run, model, meta)
    return run
