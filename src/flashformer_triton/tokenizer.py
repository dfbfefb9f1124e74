"""Tokenizers for the CLI and the notebook: bytes for the tiny default, the model's own files
otherwise, and an incremental detokenizer for streaming text.

The built-in ``tiny`` model has a vocabulary of 263 byte-level tokens:

=========  ==================
id         meaning
=========  ==================
0          ``<pad>``
1          ``<bos>``
2          ``<eos>`` (``config.PRESETS["tiny"].eos_token_id == [2]``)
3 .. 6     reserved
7 + b      the byte ``b`` (0..255)
=========  ==================
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["ByteTokenizer", "TextStreamer", "TokenizerNotFoundError", "load_tokenizer"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class TokenizerNotFoundError(FileNotFoundError):
    """The checkpoint has no tokenizer files (or transformers is not installed)."""


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 7..262) plus pad/bos/eos; same method names as transformers."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    byte_offset = 7
    vocab_size = 263
    special_tokens = {0: "<pad>", 1: "<bos>", 2: "<eos>"}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids, with ``<bos>`` first unless ``add_special_tokens=False``."""
        ids = [self.byte_offset + b for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text. Invalid UTF-8 (a cut multi-byte character) becomes U+FFFD."""
        out = bytearray()
        text: list[str] = []
        for i in (int(t) for t in ids):
            if i >= self.byte_offset:
                out.append(i - self.byte_offset)
                continue
            if out:
                text.append(out.decode("utf-8", errors="replace"))
                out.clear()
            if not skip_special_tokens:
                text.append(self.special_tokens.get(i, f"<reserved{i}>"))
        if out:
            text.append(out.decode("utf-8", errors="replace"))
        return "".join(text)


def load_tokenizer(name_or_path: str | os.PathLike, *, revision: str | None = None):
    """The tokenizer of a model: ``ByteTokenizer`` for ``tiny``, else transformers'
    ``AutoTokenizer`` on the checkpoint's own tokenizer files (local dir or hub id).

    Raises TokenizerNotFoundError when there are no tokenizer files or transformers is not
    installed; the message says what to do instead.
    """
    name = os.fspath(name_or_path)
    if name == "tiny" and not Path(name).is_dir():
        return ByteTokenizer()
    from flashformer_triton.loading import resolve_checkpoint

    path = resolve_checkpoint(name, revision=revision)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise TokenizerNotFoundError(
            f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); pass the prompt as "
            "token ids instead (--prompt-ids 1,2,3 on the command line)"
        )
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise TokenizerNotFoundError(
            "reading the model's tokenizer needs the transformers package: "
            "`pip install transformers` (or pass token ids with --prompt-ids)"
        ) from exc
    return AutoTokenizer.from_pretrained(str(path))


class TextStreamer:
    """Turns a stream of token ids into printable text pieces.

    Decodes the prompt and everything generated so far together and returns what was not
    returned yet, so the tokenizer sees each token next to its neighbours (SentencePiece
    spaces, byte-level merges). Text ending in U+FFFD (a multi-byte character cut in the
    middle) is held back until it completes. Works with ``ByteTokenizer`` and transformers
    tokenizers.
    """

    def __init__(self, tokenizer, prompt: Iterable[int] = (), *, skip_special_tokens=True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = [int(t) for t in prompt]
        self.prompt_text = self._decode()
        self.emitted = len(self.prompt_text)

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)

    def put(self, token: int) -> str:
        """Add a generated token; the new printable text (may be empty)."""
        self.ids.append(int(token))
        text = self._decode()
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece

    def flush(self) -> str:
        """Whatever is still held back (a cut character comes out as U+FFFD)."""
        text = self._decode()
        piece, self.emitted = text[self.emitted :], len(text)
        return piece
