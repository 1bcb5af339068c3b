"""Byte-level BPE tokenizer and chat template, both built from the GGUF metadata."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

CONTROL_TOKEN_TYPE = 3  # gguf TokenType.CONTROL


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


class Tokenizer:
    """encode/decode text and render chat prompts exactly as the model was trained to see them."""

    def __init__(self, meta: dict):
        tokens: list[str] = meta["tokens"]
        vocab = {tok: i for i, tok in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
        bpe = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        bpe.pre_tokenizer = self._pre_tokenizer(meta.get("pre"))
        bpe.decoder = decoders.ByteLevel()
        self.special_ids = {i for i, t in enumerate(meta["token_types"]) if t == CONTROL_TOKEN_TYPE}
        bpe.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(self.special_ids)])
        self._bpe = bpe
        self.vocab_size = len(tokens)
        self.bos_token_id = int(meta["bos_token_id"])
        self.eos_token_id = int(meta["eos_token_id"])
        self.add_bos = bool(meta.get("add_bos_token", False))
        self.tokens = tokens
        template = meta.get("chat_template")
        self.chat_template: str | None = template
        self._template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
            template) if template else None
        # token ids that end a generation: the GGUF's EOS plus <|endoftext|> / <|im_end|> when present
        self.stop_token_ids = frozenset(
            {self.eos_token_id} | {vocab[t] for t in ("<|endoftext|>", "<|im_end|>") if t in vocab})

    @staticmethod
    def _pre_tokenizer(pre: str | None):
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
        if pre in ("smollm", "starcoder", "refact"):
            # these tokenizers split every digit into its own token before the byte-level regex
            return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        return byte_level

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text to token ids; control tokens written in the text (chat markup) map to their ids."""
        ids = self._bpe.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._bpe.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, directory: Path) -> Path:
        """Write this tokenizer as a Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json)
        that `transformers.AutoTokenizer.from_pretrained(directory)` loads offline: for third-party tools
        that count tokens with one (bench/loadgen.py). Returns the directory."""
        directory.mkdir(parents=True, exist_ok=True)
        self._bpe.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.add_bos,
                  "bos_token": self.tokens[self.bos_token_id], "eos_token": self.tokens[self.eos_token_id],
                  "model_max_length": None, "clean_up_tokenization_spaces": False}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
        return directory

    def apply_chat_template(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError("messages: this model has no chat template")
        for i, m in enumerate(messages):
            if not m.role or not isinstance(m.content, str):
                raise ValueError(f"messages[{i}]: need a role and text content")
        return self._template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.tokens[self.bos_token_id], eos_token=self.tokens[self.eos_token_id])

    def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        return self.encode(self.apply_chat_template(messages))


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas without splitting UTF-8 characters.

    Decodes only a short window (from the last emitted boundary) per token, so streaming a long
    answer costs O(n), not O(n^2).
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids before it are fully emitted
        self._read = 0  # ids before this index are reflected in the emitted text

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""  # nothing printable yet, or an incomplete multi-byte character
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text):]

    @property
    def text(self) -> str:
        return self._tok.decode(self._ids)
