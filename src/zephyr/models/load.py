"""Model and tokenizer loading from zephyr's model specs.

Specs: `asset:NAME` (an offline asset folder, see `zephyr.models.assets`), `transformers:PATH_OR_HUB_ID`, or a bare
path (= `transformers:`). `openai:` and `vllm:` name generation backends, not local weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zephyr.core.errors import ZephyrError
from zephyr.core.specs import parse_model_spec
from zephyr.data import chat
from zephyr.models import assets


def resolve_model_path(spec: str) -> str:
    """A local folder (or a hub id) that `from_pretrained` can load for a model spec."""
    parsed = parse_model_spec(spec)
    if parsed.backend != "transformers":
        raise ZephyrError(f"{spec!r} is a generation backend spec, not a local model")
    if parsed.asset is not None:
        return str(assets.fetch(parsed.asset))
    assert parsed.location is not None  # a transformers spec names an asset or a location
    local = Path(parsed.location).expanduser()
    if local.exists():
        return str(local)
    if parsed.may_be_hub_id:
        return parsed.location
    raise ZephyrError(
        f"model {spec!r}: no such folder {str(local)!r} (and it is not a hub id of the form namespace/name)"
    )


def load_tokenizer(spec: str, chat_template: str = "auto", trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model spec with the chat template zephyr renders with.

    `chat_template`: "auto" keeps the tokenizer's own template and falls back to Zephyr's when it has none;
    "zephyr" or "chatml" use zephyr's; a path ending in `.jinja` uses that file. A missing pad token is
    set to an existing token (unk, else eos); no token is ever added to the vocabulary.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:  # missing files (ValueError for a folder without any), no hub
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        if Path(path).is_dir() and not any(Path(path).glob("tokenizer*")):
            lines = [f"no tokenizer files (tokenizer.json, tokenizer_config.json) in {path}"]
        raise ZephyrError(f"cannot load a tokenizer from {spec!r}: {lines[0].rstrip(': ')}") from exc
    template = _template_text(chat_template, has_own=bool(getattr(tokenizer, "chat_template", None)))
    if template is not None:
        tokenizer.chat_template = template
    _ensure_pad_token(tokenizer, spec)
    return tokenizer


def _template_text(choice: str, has_own: bool) -> str | None:
    """The Jinja text to install, or None to keep the tokenizer's own template."""
    if choice == "auto":
        return None if has_own else chat.builtin_template("zephyr")
    if choice in chat.BUILTIN_TEMPLATES:
        return chat.builtin_template(choice)
    if choice.endswith(".jinja"):
        path = Path(choice).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ZephyrError(f"chat template file {choice}: {exc.strerror or exc}") from exc
    options = ", ".join(("auto", *chat.BUILTIN_TEMPLATES))
    raise ZephyrError(f"chat_template {choice!r}: expected one of {options} or a path to a .jinja file")


def _ensure_pad_token(tokenizer: Any, spec: str) -> None:
    # unk before eos: a pad id equal to eos invites collators that mask padding to mask the real EOS too.
    if tokenizer.pad_token is not None:
        return
    for candidate in (tokenizer.unk_token, tokenizer.eos_token):
        if candidate is not None:
            tokenizer.pad_token = candidate
            return
    raise ZephyrError(f"tokenizer of {spec!r} has no pad, unk or eos token to pad with")


def load_model(
    spec: str,
    *,
    dtype: Any = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> Any:
    """An AutoModelForCausalLM from safetensors weights (pickled .bin weights are refused). Default fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(spec)
    local = Path(path)
    if local.is_dir() and not any(local.glob("*.safetensors")):
        raise ZephyrError(
            f"{spec!r}: no .safetensors weights in {path} (zephyr does not load pickled .bin weights, "
            "which can run code on load)"
        )
    kwargs: dict[str, Any] = {"dtype": dtype if dtype is not None else torch.float32, "use_safetensors": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as exc:
        raise ZephyrError(f"cannot load a model from {spec!r}: {exc}") from exc
