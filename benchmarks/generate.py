"""Generation throughput: zephyr's local backend (batched) vs a one-prompt-at-a-time `model.generate` loop.

Same model, same prompts, greedy, same token limit; both stop at the chat template's end-of-turn token.
Prints wall time, generated tokens and tokens/s side by side, the speed-up, and how many of the answers are
identical (greedy decoding should give the same text either way).

    python benchmarks/generate.py                       # SmolLM2-135M-Instruct, 16 prompts, 64 new tokens
    python benchmarks/generate.py --threads 2 --batch-size 16 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import time

PROMPTS = [
    "Explain how a bicycle stays upright while moving.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of the French Revolution?",
    "Describe the water cycle to a ten-year-old.",
    "Give me five tips for learning a new language as an adult, with a sentence on each.",
    "Why is the sky blue? Explain in detail.",
    "Write a poem about autumn leaves falling in a quiet park.",
    "Compare cats and dogs as pets: list the advantages of each.",
    "How does a refrigerator keep food cold?",
    "Summarize the plot of a detective novel you would like to read.",
    "What should I pack for a week-long hiking trip in the mountains?",
    "Explain the difference between weather and climate.",
    "Write a friendly email inviting a colleague to a team lunch next Friday.",
    "Describe how bread is made, from flour to loaf.",
    "What are the benefits of regular exercise for the brain?",
    "Tell me about the history of the printing press.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="asset:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args()

    import torch

    from zephyr.data import chat
    from zephyr.generation import SamplingParams
    from zephyr.generation.local import LocalGenerator
    from zephyr.models.generation_config import configure_generation

    if args.threads:
        torch.set_num_threads(args.threads)
    generator = LocalGenerator.from_spec(args.model, batch_size=args.batch_size)
    model, tokenizer = generator.model, generator.tokenizer
    configure_generation(model, tokenizer)
    conversations = [[{"role": "user", "content": p}] for p in (PROMPTS * 8)[: args.prompts]]
    params = SamplingParams(max_tokens=args.max_new_tokens)
    generator.generate(conversations[:2], SamplingParams(max_tokens=4))  # warm-up

    start = time.perf_counter()
    batched = generator.generate(conversations, params)
    zephyr_s = time.perf_counter() - start
    zephyr_tokens = sum(c.completion_tokens for c in batched)

    eos = set(
        model.generation_config.eos_token_id
        if isinstance(model.generation_config.eos_token_id, list)
        else [model.generation_config.eos_token_id]
    )
    baseline_texts, baseline_tokens = [], 0
    start = time.perf_counter()
    with torch.inference_mode():
        for conversation in conversations:
            ids = torch.tensor([chat.render_prompt(tokenizer, conversation)])
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens, do_sample=False
            )
            new = out[0, ids.shape[1] :].tolist()
            stop = next((i for i, t in enumerate(new) if t in eos), None)
            baseline_tokens += len(new) if stop is None else stop + 1
            baseline_texts.append(tokenizer.decode(new[:stop], skip_special_tokens=True))
    baseline_s = time.perf_counter() - start

    same = sum(a.text == b for a, b in zip(batched, baseline_texts, strict=True))
    print(
        f"model {args.model}, {len(conversations)} prompts, max {args.max_new_tokens} new tokens, "
        f"greedy, torch threads {torch.get_num_threads()}, device {model.device}"
    )
    print(f"{'method':<40} {'wall s':>8} {'tokens':>7} {'tok/s':>8}")
    print(
        f"{'model.generate, one prompt at a time':<40} {baseline_s:8.1f} {baseline_tokens:7d} {baseline_tokens / baseline_s:8.1f}"
    )
    label = f"zephyr local backend, batch {args.batch_size}"
    print(f"{label:<40} {zephyr_s:8.1f} {zephyr_tokens:7d} {zephyr_tokens / zephyr_s:8.1f}")
    speedup = (zephyr_tokens / zephyr_s) / (baseline_tokens / baseline_s)
    print(
        f"speed-up (tokens/s): {speedup:.1f}x; wall-time ratio {baseline_s / zephyr_s:.1f}x; "
        f"identical answers {same}/{len(conversations)}"
    )


if __name__ == "__main__":
    main()
