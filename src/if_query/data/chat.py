"""Conversations -> labelled pieces of text, through the tokenizer's own chat template.

A conversation is a list of ``{"role", "content"}`` turns ending with an assistant turn. The rule:

1. render the whole conversation as text (``apply_chat_template(..., tokenize=False)``);
2. for each labelled assistant turn i, render the conversation up to it with the generation prompt
   (``messages[:i]``, ``add_generation_prompt=True``) and through it (``messages[:i + 1]``): both must be
   string prefixes of the whole (else the template rewrites earlier turns, and the record is refused);
3. between those two lies the turn: the text before its content (unlabelled), its content (labelled) and
   what the template closes it with (labelled unless ``--no-eos-in-loss``).

Every other stretch of the rendering is unlabelled. The caller tokenizes each piece separately with
``add_special_tokens=False``: the template writes BOS and the like itself, and nothing else is added.
Queries label their **last** assistant turn, train and fitting records **every** assistant turn (as
supervised fine-tuning trained them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from if_query.errors import InputError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Messages = tuple[tuple[str, str], ...]  # ((role, content), ...)


@dataclass(frozen=True)
class Piece:
    """A stretch of the rendered conversation: ``labelled`` content, or an assistant turn's ``closing``."""

    text: str
    labelled: bool = False
    closing: bool = False


@dataclass(frozen=True)
class Conversation:
    """A rendered conversation cut into pieces (they join to the rendering), and what the CSVs show of it:
    ``prompt``, the rendering before the last assistant turn's content, and ``completion``, that content."""

    pieces: tuple[Piece, ...]
    prompt: str
    completion: str


def as_messages(prompt: str, completion: str) -> Messages:
    """A prompt/completion record as one user turn and one assistant turn (``--chat-template``)."""
    return (("user", prompt), ("assistant", completion))


def check_template(tokenizer: PreTrainedTokenizerBase, where: str | None = None) -> None:
    """Refuse a tokenizer without a chat template, in one line: for ``--chat-template`` (``where`` None), or for
    the conversation ``where`` names (a record or document with ``messages``)."""
    if getattr(tokenizer, "chat_template", None):
        return
    if where is None:
        raise InputError("--chat-template needs the tokenizer's chat template, and this tokenizer has none (a base "
                         "model's has none: leave --chat-template out)", option="chat_template", flag_first=False)
    raise InputError(f"{where}: a conversation ('messages') needs the tokenizer's chat template, and this tokenizer "
                     "has none (a base model's has none: give prompt/completion records)")


def _render(tokenizer: PreTrainedTokenizerBase, messages: Messages, generation_prompt: bool, where: str) -> str:
    turns = [{"role": role, "content": content} for role, content in messages]
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # noqa: BLE001 - the template's own errors (raise_exception) become the record's
        raise InputError(f"{where}: the chat template cannot render this conversation ({first_line(exc)})") from exc


def render(tokenizer: PreTrainedTokenizerBase, messages: Messages, every_turn: bool, where: str) -> Conversation:
    """The conversation's pieces by the module's rule: the last assistant turn labelled, or every one."""
    check_template(tokenizer, where)
    whole = _render(tokenizer, messages, False, where)
    turns = [i for i, (role, _) in enumerate(messages) if role == "assistant"]
    labelled = turns if every_turn else turns[-1:]
    pieces: list[Piece] = []
    done = 0  # characters of ``whole`` already cut into pieces
    prompt = ""
    for i in labelled:
        before = _render(tokenizer, messages[:i], True, where) if i else ""
        through = _render(tokenizer, messages[: i + 1], False, where)
        for name, text in (("up to", before), ("through", through)):
            if not whole.startswith(text):
                raise InputError(f"{where}: the chat template renders the conversation {name} assistant turn {i} "
                                 "differently from the whole conversation (it rewrites earlier turns), so its "
                                 "tokens cannot be labelled")
        turn, content = whole[len(before) : len(through)], messages[i][1]
        at = turn.rfind(content) if content else 0  # from the end: a header may hold the same text
        if content and at < 0:
            at, content = turn.rfind(content.strip()), content.strip()
        if at < 0:
            raise InputError(f"{where}: the chat template changes the content of assistant turn {i}, so its tokens "
                             "cannot be found in the rendering")
        start, end = len(before) + at, len(before) + at + len(content)
        pieces += [Piece(whole[done:start]), Piece(whole[start:end], labelled=True),
                   Piece(whole[end : len(through)], labelled=True, closing=True)]
        done, prompt = len(through), whole[:start]
    pieces.append(Piece(whole[done:]))
    return Conversation(tuple(p for p in pieces if p.text), prompt, messages[labelled[-1]][1])
