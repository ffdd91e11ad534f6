"""Tokenizer loading (from the model directory, never downloaded), chat templates, and batched encoding.

Chat messages go through the model's chat template first, so the prefix tree sees the tokens the model sees.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from batchrun.errors import UserError
from batchrun.model.spec import ModelSpec
from batchrun.requests import ParsedLine


def load_tokenizer(spec: ModelSpec) -> Any:
    """The model directory's tokenizer (a transformers fast tokenizer); UserError when it cannot be loaded."""
    # Nothing is ever fetched from a hub (a model is a local directory or a built-in name), and batched
    # encoding uses every core.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from transformers import AutoTokenizer  # slow import: only when a tokenizer is needed

    try:
        # trust_remote_code=False: never run code from the model directory (resolve_model refuses auto_map).
        return AutoTokenizer.from_pretrained(str(spec.path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"model {spec.name!r}: its tokenizer cannot be loaded from {spec.path} ({e})") from None


def token_bytes_of(tokenizer: Any) -> Callable[[int], bytes]:
    """token id → the token's own bytes (OpenAI's logprobs `bytes`): byte-level BPE tokens mapped back through
    GPT-2's byte alphabet, SentencePiece byte tokens (`<0xNN>`) as their byte, any other as its text's UTF-8."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    is_byte_level = backend is not None and '"ByteLevel"' in backend.to_str()
    byte_of = {c: b for b, c in _byte_alphabet().items()}

    def token_bytes(token_id: int) -> bytes:
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if is_byte_level and all(c in byte_of for c in piece):
            return bytes(byte_of[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return tokenizer.decode([token_id]).encode()

    return token_bytes


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class EncodeError(Exception):
    """A prompt that cannot be encoded (for instance, its messages break the chat template)."""


def encode_lines(tokenizer: Any, lines: Sequence[ParsedLine], *, chat_template: str | None = None
                 ) -> list[list[int] | EncodeError]:
    """Token ids for each line, in order; a line whose prompt cannot be encoded gets an EncodeError instead.

    Plain prompts get the tokenizer's special tokens (BOS); chat prompts are rendered by the chat template
    (`chat_template`, else the model's, with the line's chat_template_kwargs), which writes its own, then
    tokenized without adding more. Encoding is batched (the Rust tokenizer).
    """
    results: list[list[int] | EncodeError] = [EncodeError("not encoded")] * len(lines)
    plain: list[tuple[int, str]] = []
    chat: list[tuple[int, str]] = []
    for i, parsed in enumerate(lines):
        if isinstance(parsed.prompt, str):
            plain.append((i, parsed.prompt))
        else:
            rendered = _render_chat(tokenizer, parsed.prompt, chat_template=chat_template,
                                    kwargs=parsed.chat_template_kwargs or {})
            if isinstance(rendered, EncodeError):
                results[i] = rendered
            else:
                chat.append((i, rendered))
    for batch, add_special in ((plain, True), (chat, False)):
        if batch:
            encoded = tokenizer([text for _, text in batch], add_special_tokens=add_special)["input_ids"]
            for (i, _), ids in zip(batch, encoded, strict=True):
                results[i] = ids
    return results


def _render_chat(tokenizer: Any, messages: list[dict[str, str]], *, chat_template: str | None,
                 kwargs: dict[str, Any]) -> str | EncodeError:
    if not (chat_template or getattr(tokenizer, "chat_template", None)):
        return EncodeError("the model's tokenizer has no chat template: use 'prompt' instead of 'messages', "
                           "or give one with `plan --chat-template FILE`")
    # The line's kwargs are template variables (e.g. enable_thinking); they cannot replace these arguments.
    if reserved := sorted(_TEMPLATE_ARGUMENTS & kwargs.keys()):
        return EncodeError(f"chat_template_kwargs cannot set {', '.join(reserved)}")
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, chat_template=chat_template, add_generation_prompt=True,
                                             tokenize=False, **kwargs)
    except TemplateError as e:  # templates reject messages with raise_exception(...)
        return EncodeError(f"the chat template refused these messages: {e}")
    except Exception as e:  # noqa: BLE001 - a template is the model's code: any failure is this line's alone
        return EncodeError(f"the chat template failed on these messages ({type(e).__name__}: {e})")


_TEMPLATE_ARGUMENTS = frozenset({"conversation", "chat_template", "add_generation_prompt", "tokenize", "tools",
                                 "documents", "return_dict", "return_tensors", "padding", "truncation",
                                 "max_length", "tokenizer_kwargs", "continue_final_message"})
