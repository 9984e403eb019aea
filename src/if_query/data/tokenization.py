"""Validated examples -> token ids and labels -> dynamically padded batches.

Prompt and completion are tokenized separately (no special tokens) and concatenated. Prompt
tokens get label -100; completion tokens and the end-of-sequence token are labelled, so the
loss (and the influence measurement) covers exactly the completion. Without the EOS
(``eos_in_loss=False``, run-query's ``--no-eos-in-loss``) the sequence ends with the completion. Every labelled token is
predicted from a token before it: the tokenizer's BOS when it adds one, else the prompt's last
token, else (empty prompt, no BOS: GPT-2 and friends) the EOS token as a start token, as GPT-2
does. Batches are padded on the right to their own longest sequence, padding positions labelled
-100 and masked.

Conversations (records with ``messages``, or every record under ``--chat-template``) are tokenized through
the tokenizer's chat template instead (:mod:`if_query.data.chat`): its pieces tokenized one by one, no BOS
or EOS added, the assistant turns' content and closing labelled (the closing not under
``--no-eos-in-loss``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from transformers import PreTrainedTokenizerBase

from if_query.data.chat import Conversation, as_messages, check_template, render
from if_query.data.records import Example
from if_query.data.token_text import TokenText
from if_query.errors import InputError

IGNORE_INDEX = -100
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and labels of one sequence (labels are -100 where no loss is taken)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_labelled(self) -> int:
        """Labelled tokens that are predicted (``labels[1:]``: nothing predicts the first token); the
        loss is averaged over these."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token (its EOS) when it has none; padding is always masked."""
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no end-of-sequence token; if-query needs one to end completions")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """``[bos_token_id]`` when the tokenizer itself adds a BOS token to encoded text, else ``[]``."""
    if tokenizer.bos_token_id is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    if with_special and with_special[0] == tokenizer.bos_token_id:
        return [tokenizer.bos_token_id]
    return []


def capped_length(max_length: int, position_limit: int | None) -> int:
    """The token limit in effect: ``--max-length``, at most the model's position limit (when it has one)."""
    return max_length if position_limit is None else min(max_length, position_limit)


def warn_capped(max_length: int, position_limit: int | None, cut: Sequence[str], total: int) -> None:
    """The one warning of a run whose ``--max-length`` exceeded the model's positions and cut records."""
    if not cut or capped_length(max_length, position_limit) == max_length:
        return
    shown = ", ".join(cut[:3]) + (f" and {len(cut) - 3} more" if len(cut) > 3 else "")
    logger.warning("--max-length %d is more than the model's %d positions, so sequences are capped at %d tokens: "
                   "%d of %d records were cut, losing tokens from the left (%s)",
                   max_length, position_limit, position_limit, len(cut), total, shown)


class ExampleTokenizer:
    """Tokenizes examples the same way for fitting, scoring and loss measurement.

    ``position_limit`` (the model's, :func:`if_query.model.loading.position_limit`) caps ``max_length``: a
    longer sequence would index past the position embeddings. Records cut under the cap are not
    warned about one by one but listed in ``cut`` for :meth:`warn_capped` (one warning per run); records
    cut by ``max_length`` itself are warned about as they are cut.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, eos_in_loss: bool = True,
                 position_limit: int | None = None, chat_template: bool = False):
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.chat_template = chat_template  # --chat-template: prompt/completion records as conversations
        if chat_template:
            check_template(tokenizer)
        self.requested_length = max_length
        self.position_limit = position_limit
        self.max_length = capped_length(max_length, position_limit)
        self.capped = self.max_length < max_length
        self.eos_in_loss = eos_in_loss
        self.bos = bos_prefix(tokenizer)
        self.cut: list[str] = []  # "source: pair_id 'x'" of every record that lost prompt tokens
        self.seen = 0

    def _limit(self) -> str:
        return (f"the model's {self.max_length} positions (--max-length {self.requested_length})" if self.capped
                else f"--max-length {self.max_length}")

    def warn_capped(self) -> None:
        """Warn once about the records the position cap cut (see the class docstring)."""
        warn_capped(self.requested_length, self.position_limit, self.cut, self.seen)

    def again(self) -> ExampleTokenizer:
        """This tokenizer for another run: the same tokenizer and limits, no record counted or cut yet."""
        fresh = copy.copy(self)
        fresh.cut, fresh.seen = [], 0
        return fresh

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _messages(self, example: Example):
        if example.messages is not None:
            return example.messages
        return as_messages(example.prompt, example.completion) if self.chat_template else None

    def _conversation(self, example: Example, where: str, every_turn: bool) -> Conversation:
        return render(self.tokenizer, self._messages(example), every_turn, f"{where}pair_id {example.pair_id!r}")

    def shown(self, example: Example, source: str = "", every_turn: bool = True) -> Example:
        """The example as the CSVs show it: a conversation's ``prompt`` is its rendering up to the last
        assistant turn's content (the template's text included), its ``completion`` that content."""
        if self._messages(example) is None:
            return example
        conversation = self._conversation(example, f"{source}: " if source else "", every_turn)
        return dataclasses.replace(example, prompt=conversation.prompt, completion=conversation.completion)

    def conversation_tokens(self, messages, where: str) -> TokenizedExample:
        """A corpus document's conversation, every assistant turn labelled, uncut (the corpus cuts it into
        windows)."""
        return self._tokenize_conversation(Example("", "", "", messages=tuple(messages)), where, True, cut=False)

    def _tokenize_conversation(self, example: Example, where: str, every_turn: bool,
                               cut: bool = True) -> TokenizedExample:
        input_ids: list[int] = []
        labels: list[int] = []
        last_turn = 0  # where the last labelled turn starts
        for piece in self._conversation(example, where, every_turn).pieces:
            ids = self._ids(piece.text)
            if piece.labelled and not piece.closing:
                last_turn = len(input_ids)
            scored = piece.labelled and (self.eos_in_loss or not piece.closing)
            input_ids += ids
            labels += ids if scored else [IGNORE_INDEX] * len(ids)
        if all(label == IGNORE_INDEX for label in labels[1:]):
            raise InputError(f"{where}pair_id {example.pair_id!r}: no assistant token to score (an empty turn, and "
                             "its closing left out by --no-eos-in-loss)")
        drop = len(input_ids) - self.max_length
        if cut and drop > 0:  # cut from the left, keeping one token before the last labelled turn
            if drop > last_turn - 1:
                raise InputError(f"{where}pair_id {example.pair_id!r}: the last assistant turn is "
                                 f"{len(input_ids) - last_turn} tokens with what closes it, and needs one token "
                                 f"before it: longer than {self._limit()}")
            self.cut.append(f"{where}pair_id {example.pair_id!r}")
            if not self.capped:
                logger.warning("%spair_id %r: %d tokens exceed --max-length %d; dropping %d tokens from the left",
                               where, example.pair_id, len(input_ids), self.max_length, drop)
            input_ids, labels = input_ids[drop:], labels[drop:]
        return TokenizedExample(tuple(input_ids), tuple(labels))

    def __call__(self, example: Example, source: str = "", every_turn: bool = True) -> TokenizedExample:
        """The example's tokens and labels. A conversation labels every assistant turn, or only its last one
        (``every_turn=False``: queries)."""
        where = f"{source}: " if source else ""
        if self._messages(example) is not None:
            self.seen += 1
            return self._tokenize_conversation(example, where, every_turn)
        prompt = self._ids(example.prompt)
        completion = self._ids(example.completion) + ([self.tokenizer.eos_token_id] if self.eos_in_loss else [])
        self.seen += 1
        if not completion:
            raise InputError(f"{where}pair_id {example.pair_id!r}: the completion has no tokens, and without "
                             "the EOS token (--no-eos-in-loss) nothing would be scored")
        # One token must precede the completion so that its first token is predicted: the BOS, or the
        # prompt's last token, or (empty prompt, no BOS) the EOS token as a start token.
        budget = self.max_length - len(self.bos) - len(completion)
        if budget < (0 if self.bos else 1):
            raise InputError(
                f"{where}pair_id {example.pair_id!r}: completion is {len(completion)} tokens"
                f"{' with EOS' if self.eos_in_loss else ''} and needs "
                f"one token before it ({'BOS' if self.bos else 'the last prompt token or a start token'}): "
                f"{len(completion) + 1} tokens, longer than {self._limit()}"
            )
        if len(prompt) > budget:
            self.cut.append(f"{where}pair_id {example.pair_id!r}")
            if not self.capped:
                logger.warning("%spair_id %r: %d tokens exceed --max-length %d; dropping %d prompt tokens from "
                               "the left", where, example.pair_id, len(self.bos) + len(prompt) + len(completion),
                               self.max_length, len(prompt) - budget)
            prompt = prompt[len(prompt) - budget :]
        start = self.bos or ([] if prompt else [self.tokenizer.eos_token_id])
        input_ids = start + prompt + completion
        labels = [IGNORE_INDEX] * (len(start) + len(prompt)) + completion
        return TokenizedExample(tuple(input_ids), tuple(labels))

    def template_digest(self, examples: Sequence[Example]) -> str | None:
        """The first 16 hex digits of the chat template's sha256 when any of ``examples`` is rendered with it."""
        if not any(self._messages(example) is not None for example in examples):
            return None
        return hashlib.sha256(self.tokenizer.chat_template.encode()).hexdigest()[:16]

    def tokenize_all(self, examples: Sequence[Example], source: str = "", every_turn: bool = True
                     ) -> list[TokenizedExample]:
        return [self(example, source, every_turn) for example in examples]

    @cached_property
    def token_text(self) -> TokenText:
        return TokenText(self.tokenizer)

    def token_strings(self, tokenized: TokenizedExample) -> list[str]:
        """The text each token adds, aligned with ``input_ids`` (``""`` for a token ending inside a character:
        see :mod:`if_query.data.token_text`); the strings join to the sequence's text."""
        return self.token_text(tokenized.input_ids)


def collate(examples: Sequence[TokenizedExample], pad_token_id: int, pad_to: int | None = None) -> dict:
    """Right-pad a batch to its longest sequence (or ``pad_to``); padding gets label -100, mask 0."""
    length = max(len(example) for example in examples)
    if pad_to is not None:
        length = max(length, pad_to)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class Collator:
    """A picklable ``collate_fn`` for DataLoaders."""

    def __init__(self, pad_token_id: int, pad_to: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to = pad_to

    def __call__(self, examples: Sequence[TokenizedExample]) -> dict:
        return collate(examples, self.pad_token_id, self.pad_to)


def distinct(sequences: list[TokenizedExample]) -> tuple[list[TokenizedExample], list[int]]:
    """Distinct sequences and, for each input, the index of its distinct sequence."""
    index: dict[TokenizedExample, int] = {}
    for sequence in sequences:
        index.setdefault(sequence, len(index))
    return list(index), [index[s] for s in sequences]
