"""A token's bytes, as logprobs report them: joined over a text's tokens they are the text's bytes
(each word's leading space included, characters split over tokens whole again), for both decoder
families real checkpoints use (BPE vocabularies trained in tests/hf_fixtures.py)."""
from __future__ import annotations

import pytest

from deployments.openai_format import TokenText, chat_logprobs, completion_logprobs
from hf_fixtures import MULTILINGUAL, trained_tokenizer
from replica.sampling_params import TokenLogprob
from replica.token_bytes import byte_level_alphabet
from replica.tokenizer import ByteTokenizer, HFTokenizer

TEXTS = ["The paged KV cache, in blocks of 16 tokens.", MULTILINGUAL, "a\tb\n\n  c \U0001D11E d",
         open(__file__).read()[:600]]


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tok(request, tmp_path_factory) -> HFTokenizer:
    path = tmp_path_factory.mktemp(request.param)
    trained_tokenizer(request.param).save_pretrained(path)
    return HFTokenizer(str(path))


def added_text(tok, ids) -> str:
    """What `ids` add to a text after a word: the whole-text decode's difference."""
    ctx = tok.encode("x")
    return tok.decode(ctx + ids)[len(tok.decode(ctx)):]


def test_byte_level_alphabet_is_gpt2s():
    alphabet = byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert alphabet["A"] == 65 and alphabet["Ġ"] == 32 and alphabet["Ċ"] == 10 and alphabet["ð"] == 0xF0


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_join_into_the_text(tok, text):
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == added_text(tok, ids).encode()


def test_a_character_split_over_tokens_gives_each_token_its_own_bytes(tok):
    ids = tok.encode("\U0001D11E")                        # not in the vocabulary: 4 byte tokens
    parts = [tok.token_bytes(i) for i in ids]
    assert b"".join(parts).strip() == "\U0001D11E".encode()
    assert sum(len(p) == 1 and p[0] >= 0x80 for p in parts) >= 2
    tt = TokenText(tok)
    assert tt.text(ids[-1]) == "\ufffd"                   # not decodable alone
    assert bytes(tt.bytes(ids[-1])) == parts[-1]


def test_special_tokens_and_ids_past_the_vocabulary_add_nothing(tok):
    size = tok._tok.backend_tokenizer.get_vocab_size()
    for i in [*tok._tok.all_special_ids, size, size + 7]:
        assert tok.token_bytes(i) == b""


def test_logprobs_tokens_rebuild_the_completion_text(tok):
    """Completions: tokens joined are the text and text_offset counts them (every word after the
    first starts with its space); chat: bytes joined are the text's bytes, characters split over
    tokens included."""
    tt = TokenText(tok)

    def logprobs(ids):
        return [TokenLogprob(i, -0.5, ((i, -0.5),)) for i in ids]
    ids = tok.encode(" forty two, and then the paged cache.")
    comp = completion_logprobs(logprobs(ids), tt)
    assert "".join(comp["tokens"]) == added_text(tok, ids)
    assert comp["text_offset"] == [len("".join(comp["tokens"][:k])) for k in range(len(ids))]
    assert sum(t.startswith(" ") for t in comp["tokens"]) >= 5
    ids = tok.encode(" and then 日本語 ✓ \U0001D11E")
    chat = chat_logprobs(logprobs(ids), tt)
    assert bytes(b for entry in chat["content"] for b in entry["bytes"]) == added_text(tok, ids).encode()


def test_byte_tokenizer_tokens_are_their_bytes():
    tok = ByteTokenizer()
    assert [tok.token_bytes(i) for i in "é".encode()] == [b"\xc3", b"\xa9"]
    assert tok.token_bytes(300) == b"" and TokenText(tok).text(65) == "A"
