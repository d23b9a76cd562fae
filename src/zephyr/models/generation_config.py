"""Where generation stops: a model's generation config set from its tokenizer's chat template.

Below `load` and `assets` (both use it), so that neither imports the other to reach it.
"""

from __future__ import annotations

from typing import Any

from zephyr.data import chat


def configure_generation(model: Any, tokenizer: Any) -> Any:
    """Make generation stop at the template's end-of-turn token and pad with the tokenizer's pad token.

    eos_token_id becomes [end-of-turn id] (+ the tokenizer's eos id when different, so a model that
    emits plain EOS still stops). Returns the model's generation config.
    """
    _, eot_id = chat.end_of_turn(tokenizer)
    eos_ids = [eot_id]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id != eot_id:
        eos_ids.append(tokenizer.eos_token_id)
    config = model.generation_config
    config.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config.pad_token_id = pad_id
    if getattr(tokenizer, "bos_token_id", None) is not None:
        config.bos_token_id = tokenizer.bos_token_id
    return config
