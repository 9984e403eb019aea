"""Token pieces (if_query.data.token_text): the text each token adds, so that a character whose bytes span several
tokens (``é``, an emoji, with a byte-level tokenizer or a SentencePiece one's byte fallback) is shown once, whole,
and never as U+FFFD; one piece per token, joining to the sequence's text."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from if_query.data.token_text import TokenText, is_byte_level, piece_groups
from if_query.demo.run_demo import DEMO_MODEL

TEXTS = ["Le café", "Le café 🙂🙂 naïve", "🙂"]
SPLIT = ("é", "🙂")  # characters each tokenizer below writes as several tokens


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """Llama 2's kind: Metaspace-style "▁" words, characters outside the vocabulary as byte tokens <0xNN>."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for symbol in ("▁", "a", "c", "L", "e", "f", "n", "v"):
        vocab.setdefault(symbol, len(vocab))
    merges = [("▁", "L"), ("▁L", "e"), ("▁", "c"), ("▁c", "a"), ("▁ca", "f")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


TOKENIZERS = {
    "byte-level": lambda: AutoTokenizer.from_pretrained(Path(str(DEMO_MODEL))),  # the demo's GPT-2-style BPE
    "sentencepiece": sentencepiece_tokenizer,
}


def sequence(tokenizer, text: str) -> list[int]:
    """A scored sequence's shape: a special start token, the text's tokens, the EOS."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [start, *tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]()


def test_pieces_join_to_the_text_with_each_split_character_whole(tokenizer):
    for text in TEXTS:
        ids = sequence(tokenizer, text)
        alone = [tokenizer.decode([i]) for i in ids]
        assert "\ufffd" in "".join(alone)  # the premise: some character's bytes span several tokens
        pieces = TokenText(tokenizer)(ids)
        assert len(pieces) == len(ids)
        assert "".join(pieces) == tokenizer.decode(ids) and text in "".join(pieces)
        assert "\ufffd" not in "".join(pieces)
        for character in SPLIT:  # each split character whole in one piece, after "" for its earlier tokens
            assert sum(piece.count(character) for piece in pieces) == text.count(character)
        for group in piece_groups(pieces):
            assert all(pieces[i] == "" for i in group[:-1]) and (pieces[group[-1]] or len(group) == 1)


def test_byte_level_read_and_decoding_agree():
    """The byte-level tokenizer's one-pass reading of bytes gives what the generic prefix decoding gives."""
    tokenizer = TOKENIZERS["byte-level"]()
    assert is_byte_level(tokenizer) and not is_byte_level(sentencepiece_tokenizer())
    decoded = TokenText(tokenizer)
    decoded.byte_level = False
    for text in TEXTS:
        ids = sequence(tokenizer, text)
        assert TokenText(tokenizer)(ids) == decoded(ids)


def test_a_sequence_cut_inside_a_character_keeps_one_piece_per_token(tokenizer):
    ids = tokenizer("🙂 Le café", add_special_tokens=False)["input_ids"]
    first = next(k for k, i in enumerate(ids) if "\ufffd" in tokenizer.decode([i]))  # the emoji's first token
    assert "\ufffd" in tokenizer.decode([ids[first + 1]])
    ids = ids[first + 1 :]  # as --max-length cuts a prompt from the left, inside the emoji
    pieces = TokenText(tokenizer)(ids)
    assert len(pieces) == len(ids) and "".join(pieces).endswith(" Le café")


def test_groups_end_at_the_completing_token():
    assert piece_groups(["a", "", "é", "", "", "", "🙂", " b", ""]) == [
        range(0, 1), range(1, 3), range(3, 7), range(7, 8), range(8, 9)]
    assert piece_groups([]) == [] and piece_groups(["", ""]) == [range(0, 1), range(1, 2)]
