"""Tiny, deterministic models and tokenizers for tests and the quick demo (no downloads).

The tokenizer is a byte-level BPE trained locally with `tokenizers` on a small built-in corpus; the
model is a 2-layer Llama with hidden size 64 and random (seeded) weights.

>>> tok = tiny_tokenizer()
>>> tok.decode(tok("12 + 30 = 42").input_ids)
'12 + 30 = 42'
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

_CORPUS = [
    "What is {a} + {b}? <think>{a} + {b} = {c}</think> The answer is {c}.",
    "Compute {a} - {b}. <think>{a} - {b} = {c}</think> {c}",
    "The quick brown fox jumps over the lazy dog while {a} cats watch {b} birds.",
    "Question: how many apples are left if you had {a} and ate {b}? Answer: {c}",
    "user: hello assistant: hi, how can I help you today? system: you are a helpful assistant",
]

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<think>", "</think>"]


@lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [t.format(a=a, b=b, c=a + b) for t in _CORPUS for a in range(0, 100, 7) for b in range(0, 50, 11)]
    tok.train_from_iterator(lines, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 512, chat_template: bool = False):
    """A small byte-level BPE tokenizer as a `transformers.PreTrainedTokenizerFast`.

    `chat_template=False` leaves it without a template so the documented fallback is exercised.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
    )
    if chat_template:
        tok.chat_template = (
            "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
        )
    return tok


def tiny_model(vocab_size: int = 512, hidden_size: int = 64, layers: int = 2, seed: int = 0, tie: bool = False):
    """A deterministic random 2-layer Llama (hidden 64) for tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.eval()


def save_tiny_model(out_dir: str | Path, seed: int = 0, chat_template: bool = False, **kw) -> Path:
    """Write a tiny model + tokenizer as a safetensors model directory loadable by `leantune`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(chat_template=chat_template)
    model = tiny_model(vocab_size=len(tok), seed=seed, **kw)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
