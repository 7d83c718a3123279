"""Tokenizers from a GGUF's BPE vocab and merges, or from an HF `tokenizer.json`.

Both end up as a `tokenizers.Tokenizer` wrapped with what generation needs: BOS/EOS ids, whether to
prepend BOS, the chat template (rendered with jinja2, as HF and llama.cpp do), and an incremental
detokenizer for streaming.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

# llama.cpp's token_type values: 3 = control (special) tokens, 4 = user-defined.
_GGUF_SPECIAL_TYPES = (3, 4)


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer, bos_id: int | None, eos_ids: list[int],
                 add_bos: bool, chat_template: str | None):
        self.tok = tok
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """Renders the chat with the model's own template, ready for the assistant's reply."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; use --prompt without --chat")
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True,
                                 lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        bos = self.tok.id_to_token(self.bos_id) if self.bos_id is not None else ""
        eos = self.tok.id_to_token(self.eos_ids[0]) if self.eos_ids else ""
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)


def _raise(message: str):
    raise ValueError(message)


class StreamDecoder:
    """Turns token ids into text pieces as they come, never splitting a multi-byte character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece


def from_gguf_fields(tokens: list[str], merges: list[str], token_types: list[int],
                     bos_id: int | None, eos_id: int | None, add_bos: bool,
                     chat_template: str | None, pre: str = "") -> Tokenizer:
    """A byte-level BPE tokenizer (llama.cpp's "gpt2" tokenizer model) from GGUF metadata."""
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                     fuse_unk=False)
    tok = tokenizers.Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "qwen2", "deepseek-llm"):
        # These pre-tokenizers split every digit on its own before the GPT-2 regex (llama.cpp).
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    special = [tokenizers.AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(token_types) if t in _GGUF_SPECIAL_TYPES]
    tok.add_special_tokens(special)
    return Tokenizer(tok, bos_id, [eos_id] if eos_id is not None else [], add_bos, chat_template)


def from_hf_dir(path: str | Path) -> Tokenizer:
    """tokenizer.json (+ tokenizer_config.json for BOS/EOS and the chat template)."""
    path = Path(path)
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}

    def token_id(entry) -> int | None:
        if isinstance(entry, dict):
            entry = entry.get("content")
        return tok.token_to_id(entry) if entry else None

    bos_id, eos_id = token_id(cfg.get("bos_token")), token_id(cfg.get("eos_token"))
    gen_file = path / "generation_config.json"
    eos_ids = [eos_id] if eos_id is not None else []
    if gen_file.exists():
        extra = json.loads(gen_file.read_text()).get("eos_token_id", [])
        eos_ids += [e for e in (extra if isinstance(extra, list) else [extra]) if e not in eos_ids]
    # HF tokenizers that add BOS do it in their post-processor; we add it ourselves instead.
    add_bos = bool(cfg.get("add_bos_token", False))
    tok.no_padding()
    return Tokenizer(tok, bos_id, eos_ids, add_bos, cfg.get("chat_template"))


def byte_tokenizer() -> Tokenizer:
    """One token per UTF-8 byte (ids 0-255): for random-weight runs that have no vocabulary."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # GPT-2's byte-to-unicode table, in byte order, so token id == byte value.
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    assert set(vocab) <= set(alphabet)
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return Tokenizer(tok, None, [], False, None)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
