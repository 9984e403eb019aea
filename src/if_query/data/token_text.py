"""Token ids -> the text each token adds (its *piece*), and the groups of tokens that show one piece.

A byte-level BPE token (GPT-2, Llama 3, Qwen, the demo model) is bytes, not characters: ``é`` can be two tokens
and an emoji four, and each of them decoded alone is U+FFFD. :class:`TokenText` gives each token the characters
whose last byte it holds, ``""`` to a token that ends inside a character, so that the pieces join to the
sequence's text (``"".join(pieces) == tokenizer.decode(ids)``, without clean-up of spaces) and stay one per
token, aligned with the per-token scores. train.csv's ``tokens`` column holds these pieces.

:func:`piece_groups` is the one home of the grouping: a run of tokens that add no text, with the token after it
that completes their text, is one group, shown once (report.html draws it with the group's summed score).

Byte-level tokenizers are read without decoding, in one pass: each token's bytes (through GPT-2's byte
alphabet) into an incremental UTF-8 decoder. Other tokenizers (SentencePiece, WordPiece...) are decoded a few
tokens at a time: a token's piece is what decoding it adds to the text of the tokens before it (up to
``CONTEXT`` of them, which settle the spaces a decoder strips or adds), and a token whose text ends in an
unfinished character (U+FFFD: a byte-fallback character not yet complete) adds nothing until a later token
completes it. Bytes that never form a character (a sequence cut inside one) stay U+FFFD, as they decode.
Neither torch nor transformers is imported here.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CONTEXT = 4  # tokens decoded before a token to tell what it adds (non-byte-level tokenizers)
MAX_GROUP = 8  # tokens a non-byte-level piece may wait for its character before it is shown as it decodes
REPLACEMENT = "\ufffd"


def byte_alphabet() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode`` reversed: {printable character a byte-level token is written in: its byte}."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + k): b for k, b in enumerate(others)}}


def is_byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer's decoder is byte-level (a fast tokenizer's ``ByteLevel`` decoder, or a slow GPT-2
    tokenizer's ``byte_decoder``)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is not None:
        return type(decoder).__name__ == "ByteLevel"
    return isinstance(getattr(tokenizer, "byte_decoder", None), dict)


class TokenText:
    """The pieces of token ids under one tokenizer (see the module docstring)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.byte_level = is_byte_level(tokenizer)
        self.alphabet = byte_alphabet() if self.byte_level else {}
        # Added tokens (EOS, chat markers...) are their text as written, not byte-level symbols.
        self.added = {i: str(getattr(t, "content", t)) for i, t in getattr(tokenizer, "added_tokens_decoder",
                                                                           {}).items()}

    def __call__(self, ids: Sequence[int]) -> list[str]:
        """One piece per id: the text the token completes, ``""`` for a token ending inside a character."""
        ids = [int(i) for i in ids]
        return self._bytes(ids) if self.byte_level else self._decoded(ids)

    def _bytes(self, ids: list[int]) -> list[str]:
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces = []
        for token_id, symbols in zip(ids, self.tokenizer.convert_ids_to_tokens(ids), strict=True):
            literal = self.added.get(token_id)
            if literal is None and symbols is not None and not all(s in self.alphabet for s in symbols):
                literal = symbols  # not written in the byte alphabet: its text as it is
            if literal is not None:
                pieces.append(utf8.decode(b"", final=True) + literal)  # unfinished bytes before it: U+FFFD
                utf8.reset()
            else:
                pieces.append(utf8.decode(bytes(self.alphabet[s] for s in symbols or "")))
        tail = utf8.decode(b"", final=True)
        if tail and pieces:
            pieces[-1] += tail
        return pieces

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _decoded(self, ids: list[int]) -> list[str]:
        pieces: list[str] = []
        start = 0  # the first token whose text is not given out yet
        before = ""  # the text of ids[left:start]
        for i in range(len(ids)):
            left = max(0, start - CONTEXT)
            after = self._decode(ids[left : i + 1])
            if after.startswith(before) and not after.endswith(REPLACEMENT):
                pieces.append(after[len(before):])
            elif i + 1 - start >= MAX_GROUP or i + 1 == len(ids):
                pieces.append(after[len(before):] if after.startswith(before) else self._decode(ids[start : i + 1]))
            else:
                pieces.append("")  # waits for the token completing its character
                continue
            start = i + 1
            before = self._decode(ids[max(0, start - CONTEXT) : start])
        return pieces


def piece_groups(pieces: Sequence[str]) -> list[range]:
    """The token positions shown together: each token with text, with the run of tokens without text just
    before it (the bytes of a character it completes); a token without text at the end stands alone."""
    groups, start = [], 0
    for index, piece in enumerate(pieces):
        if piece:
            groups.append(range(start, index + 1))
            start = index + 1
    groups.extend(range(index, index + 1) for index in range(start, len(pieces)))
    return groups
