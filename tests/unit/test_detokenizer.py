"""Incremental detokenisation: multi-byte characters split over tokens, and stop strings that span
token boundaries are never emitted."""
from replica.detokenizer import IncrementalDetokenizer
from replica.tokenizer import ByteTokenizer


def stream(text_tokens, stop=()):
    d = IncrementalDetokenizer(ByteTokenizer(), stop)
    out = []
    for ids in text_tokens:
        d.add(ids)
        piece, matched = d.take(final=False)
        out.append(piece)
        if matched:
            return "".join(out), matched
    out.append(d.flush_all())
    return "".join(out), None


def test_multibyte_characters_split_across_tokens():
    data = "héllo wörld ✓".encode()
    text, _ = stream([[b] for b in data])
    assert text == "héllo wörld ✓"


def test_stop_string_across_tokens_is_cut_and_never_leaked():
    data = "the end. more text".encode()
    seen = []
    d = IncrementalDetokenizer(ByteTokenizer(), ["end."])
    for b in data:
        d.add([b])
        piece, matched = d.take(final=False)
        seen.append(piece)
        if matched:
            break
    assert "".join(seen) == "the " and matched == "end."


def test_no_stop_strings_flushes_everything():
    assert stream([list(b"abc"), list(b"def")])[0] == "abcdef"
