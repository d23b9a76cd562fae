"""Model shapes and synthetic workloads shared by the training benchmarks (benchmarks/dpo.py, sft.py).

Models are random Mistral-architecture networks of a named shape, built in process (no hub): the speed of a
training step depends on the shape, not on the weights. Token ids are random too; what matters is the length
distribution, given per workload below with the published corpus it imitates.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Shapes: (vocab, hidden, intermediate, layers, heads, kv heads)
SHAPES: dict[str, tuple[int, int, int, int, int, int]] = {
    "mistral-7b": (32000, 4096, 14336, 32, 32, 8),  # Mistral-7B-v0.1: 7.24B parameters
    "1b": (32000, 2048, 5632, 22, 32, 4),  # TinyLlama-1.1B's shape: 1.1B parameters
    "tiny": (512, 64, 128, 2, 4, 2),  # CPU smoke tests: a training step in milliseconds
}


def model_config(shape: str):
    from transformers import MistralConfig

    vocab, hidden, intermediate, layers, heads, kv_heads = SHAPES[shape]
    return MistralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        sliding_window=None,  # sequences here are at most 2048 tokens: Mistral's 4096 window never applies
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )


def build_model(shape: str, *, device, dtype, attn_implementation: str, seed: int = 0):
    """A random model of `shape`, created directly on `device` in `dtype` (a 7B model initialised on the CPU
    would take minutes)."""
    import torch
    from transformers import MistralForCausalLM

    torch.manual_seed(seed)
    config = model_config(shape)
    config._attn_implementation = attn_implementation
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.config.use_cache = False
    return model


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def word_tokenizer(vocab_size: int):
    """A tokenizer over ids only ("t0" … "tN"): what TRL's trainers need as a processing class (pad and eos
    ids) when the data arrive already as token ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")),
        unk_token="t0",
        pad_token="t1",
        eos_token="t2",
        bos_token="t3",
    )


# ---------------------------------------------------------------------------------------------------------
# Workloads


@dataclass(frozen=True)
class PairLengths:
    """Preference pairs, UltraFeedback-like: prompt ~ U[prompt_min, prompt_max] tokens, chosen and rejected
    answers each ~ U[answer_min, answer_max], drawn independently; max_length = prompt_max + answer_max, so
    that no pair is truncated. At full scale (32–384, 32–640) a pair runs 2P + C + R ≈ 1,088 tokens on average,
    the figures of the H200 measurements of TRL in the design notes."""

    prompt_min: int
    prompt_max: int
    answer_min: int
    answer_max: int

    @property
    def max_length(self) -> int:
        return self.prompt_max + self.answer_max


@dataclass(frozen=True)
class ConversationLengths:
    """dSFT conversations, UltraChat-like: 1–4 turns (uniform), user messages ~ U[user_min, user_max] tokens,
    assistant answers ~ U[answer_min, answer_max]; loss on assistant tokens only; cut to `max_length` (keeping
    the start, as zephyr's SFT does). At full scale (16–256, 64–512, 2048) a conversation holds ≈ 1,060
    tokens on average, about 68% of them trained."""

    user_min: int
    user_max: int
    answer_min: int
    answer_max: int
    max_length: int


PAIRS = {
    "full": PairLengths(32, 384, 32, 640),  # max_length 1024, the recipe's
    "tiny": PairLengths(2, 24, 2, 40),
}
CONVERSATIONS = {
    "full": ConversationLengths(16, 256, 64, 512, 2048),  # packed to 2048, the recipe's
    "tiny": ConversationLengths(2, 16, 4, 32, 128),
}


def workload_scale(shape: str) -> str:
    return "tiny" if shape == "tiny" else "full"


def synthetic_pairs(n: int, lengths: PairLengths, vocab_size: int, seed: int) -> list[tuple[list[int], ...]]:
    """`n` (prompt, chosen, rejected) id lists, reproducible from `seed`. Ids avoid the tokenizer's specials."""
    rng = random.Random(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(4, vocab_size) for _ in range(rng.randint(lo, hi))]

    return [
        (
            ids(lengths.prompt_min, lengths.prompt_max),
            ids(lengths.answer_min, lengths.answer_max),
            ids(lengths.answer_min, lengths.answer_max),
        )
        for _ in range(n)
    ]


def synthetic_conversations(
    n_tokens: int, lengths: ConversationLengths, vocab_size: int, seed: int
) -> list[tuple[list[int], list[int]]]:
    """Conversations as (input_ids, loss_mask) until they hold at least `n_tokens`, reproducible from `seed`."""
    rng = random.Random(seed)
    docs: list[tuple[list[int], list[int]]] = []
    total = 0
    while total < n_tokens:
        ids: list[int] = []
        mask: list[int] = []
        for _ in range(rng.randint(1, 4)):
            user = rng.randint(lengths.user_min, lengths.user_max)
            answer = rng.randint(lengths.answer_min, lengths.answer_max)
            ids += [rng.randrange(4, vocab_size) for _ in range(user + answer)]
            mask += [0] * user + [1] * answer
        ids, mask = ids[: lengths.max_length], mask[: lengths.max_length]
        docs.append((ids, mask))
        total += len(ids)
    return docs
