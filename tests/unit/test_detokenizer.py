"""Incremental detokenisation: multi-byte characters split over tokens, and stop strings that span
token boundaries are never emitted."""
from engine_helpers import detokenize
from replica.tokenizer import ByteTokenizer


def stream(text_tokens, stop=()):
    return detokenize(ByteTokenizer(), text_tokens, stop)


def test_multibyte_characters_split_across_tokens():
    data = "héllo wörld ✓".encode()
    text, _ = stream([[b] for b in data])
    assert text == "héllo wörld ✓"


def test_stop_string_across_tokens_is_cut_and_never_leaked():
    text, matched = stream([[b] for b in "the end. more text".encode()], ["end."])
    assert text == "the " and matched == "end."


def test_no_stop_strings_flushes_everything():
    assert stream([list(b"abc"), list(b"def")])[0] == "abcdef"
