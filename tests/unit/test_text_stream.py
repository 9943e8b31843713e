"""Streamed text equals the whole-text decode, for both decoder families real checkpoints use.

Reference: the text the output ids add after the prompt's last tokens,
`decode(context + ids)[len(decode(context)):]` with Hugging Face's own `decode` (the whole text
at once); with no context, `decode(ids)`. Streams are fed one id at a time and in random groups,
on natural text (English prose, code, six scripts and emoji) and on random ids (special tokens
mid-text; byte-fallback garbage has its own test, where no stream can match the whole text).
"""
from __future__ import annotations

import difflib
import functools
import inspect
import random

import pytest

from engine_helpers import detokenize
from hf_fixtures import MULTILINGUAL, trained_tokenizer
from replica.text_stream import CONTEXT_TOKENS, DecodeStreamText, Utf8Stream, WindowStream
from replica.tokenizer import ByteTokenizer, HFTokenizer

KINDS = ("byte_level", "sentencepiece")


@functools.lru_cache(maxsize=None)
def saved(kind: str, root: str) -> HFTokenizer:
    trained_tokenizer(kind).save_pretrained(f"{root}/{kind}")
    return HFTokenizer(f"{root}/{kind}")


@pytest.fixture(params=KINDS)
def tok(request, tmp_path_factory) -> HFTokenizer:
    return saved(request.param, str(tmp_path_factory.getbasetemp()))


def byte_tokens(tok: HFTokenizer) -> list[int]:
    """The SentencePiece byte-fallback tokens <0x00>..<0xFF> (none in a byte-level vocabulary)."""
    return sorted(i for t, i in tok._tok.backend_tokenizer.get_vocab().items() if t.startswith("<0x"))


def cases(tok: HFTokenizer, seed: int = 0, n: int = 12):
    """(context, ids): natural prompts and answers, and random ids after a natural prompt (byte
    tokens left out: garbage bytes are `test_byte_fallback_garbage_never_raises`'s)."""
    rng = random.Random(seed)
    text = inspect.getsource(difflib) + MULTILINGUAL * 3     # prose and code, fixed per Python
    excluded = set(byte_tokens(tok))
    vocab = [i for i in range(tok._tok.backend_tokenizer.get_vocab_size()) if i not in excluded]
    for _ in range(n):
        a = rng.randrange(len(text) - 400)
        ctx = tok.encode(text[a:a + 80])
        ids = tok.encode(text[a + 80:a + 400])
        yield ctx, ids
        yield ctx, [rng.choice(vocab) for _ in range(120)]
    yield [], tok.encode(MULTILINGUAL)


def streamed(stream, ids, rng) -> str:
    out, i = [], 0
    while i < len(ids):
        k = rng.choice((1, 1, 1, 2, 3))
        out.append(stream.step(ids[i:i + k]))
        i += k
    return "".join(out) + stream.finish()


def reference(decode, ctx, ids) -> str:
    base, full = decode(ctx), decode(ctx + ids)
    assert full.startswith(base)
    return full[len(base):]


def test_fast_tokenizers_stream_through_decode_stream(tok):
    assert isinstance(tok.stream(), DecodeStreamText)


def test_decode_stream_text_equals_the_whole_text_decode(tok):
    rng = random.Random(1)
    for ctx, ids in cases(tok):
        ctx = ctx[-CONTEXT_TOKENS:]
        assert streamed(tok.stream(ctx), ids, rng) == reference(tok.decode, ctx, ids)


def test_the_first_token_keeps_its_leading_space_after_the_prompt():
    tok = trained_tokenizer("sentencepiece")
    hf = HFTokenizer.__new__(HFTokenizer)
    hf._tok, hf._backend = tok, tok.backend_tokenizer
    ctx = tok.encode("The answer is", add_special_tokens=False)
    ids = tok.encode("The answer is forty two", add_special_tokens=False)[len(ctx):]
    assert tok.decode(ids).startswith("forty")          # decoded alone, the space is stripped
    assert streamed(hf.stream(ctx), ids, random.Random(0)) == " forty two"


def test_window_stream_equals_the_whole_text_decode_on_natural_text(tok):
    rng = random.Random(2)
    for ctx, ids in list(cases(tok))[::2]:               # the natural-text cases
        ctx = ctx[-CONTEXT_TOKENS:]
        assert streamed(WindowStream(tok.decode, ctx), ids, rng) == reference(tok.decode, ctx, ids)


def test_window_stream_on_byte_level_random_ids(tmp_path_factory):
    tok = saved("byte_level", str(tmp_path_factory.getbasetemp()))
    rng = random.Random(3)
    for ctx, ids in list(cases(tok))[1::2]:
        assert streamed(WindowStream(tok.decode), ids, rng) == tok.decode(ids)


def test_utf8_stream_equals_bytes_decode_with_invalid_sequences():
    tok, rng = ByteTokenizer(), random.Random(4)
    for _ in range(200):
        data = list("aé✓😀".encode()) * 3 + [rng.randrange(300) for _ in range(20)]
        rng.shuffle(data)
        assert streamed(tok.stream(), data, rng) == tok.decode(data)
    assert isinstance(tok.stream(), Utf8Stream)


def test_detokenizer_holds_stop_strings_over_a_real_tokenizer(tok):
    """Stop strings span tokens of a merged vocabulary; the text ends before the first match."""
    ctx = tok.encode("Question: what comes next?")
    ids = tok.encode(" The paged KV cache. Answer: done and more text after it")
    text, matched = detokenize(tok, [[i] for i in ids], ["Answer:"], context=ctx)
    assert matched == "Answer:"
    assert text == reference(tok.decode, ctx[-CONTEXT_TOKENS:], ids).split("Answer:")[0]


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_an_incomplete_last_character_is_flushed_as_the_whole_text_decode_has_it(tok, cut):
    """A 4-byte character the vocabulary lacks, cut after `cut` of its byte tokens: `finish` gives
    what the whole-text decode gives for the held bytes (with the space before them)."""
    ctx = tok.encode("The clef is")
    ids = tok._tok.encode(" \U0001D11E", add_special_tokens=False)
    b = tok._tok.backend_tokenizer
    bytes_at = next(j for j, i in enumerate(ids) if b.id_to_token(i) not in ("▁", "Ġ"))
    ids = ids[:bytes_at + cut]
    stream = tok.stream(ctx[-CONTEXT_TOKENS:])
    assert stream.step(ids) in ("", " ")                 # held: the character is incomplete
    assert stream.step([]) == ""
    assert stream.finish() != ""
    assert streamed(tok.stream(ctx[-CONTEXT_TOKENS:]), ids, random.Random(cut)) == \
        reference(tok.decode, ctx[-CONTEXT_TOKENS:], ids)


def test_byte_fallback_garbage_never_raises(tmp_path_factory):
    """Random ids, half of them byte tokens. Byte-fallback decoding is not monotonic there (a
    run of bytes that is not UTF-8 becomes U+FFFD as a whole, after its valid first bytes went
    out alone), so DecodeStream itself raises; ours starts over. Only characters of byte tokens
    may differ from the whole-text decode."""
    from tokenizers.decoders import DecodeStream

    tok = saved("sentencepiece", str(tmp_path_factory.getbasetemp()))
    backend, byte_ids = tok._tok.backend_tokenizer, byte_tokens(tok)
    rng, raised = random.Random(5), 0
    for _ in range(60):
        ids = [rng.choice(byte_ids) if rng.random() < 0.5 else rng.randrange(backend.get_vocab_size())
               for _ in range(40)]
        try:
            bare = DecodeStream(skip_special_tokens=True)
            for i in ids:
                bare.step(backend, i)
        except Exception:  # noqa: BLE001
            raised += 1
        out, ref = streamed(tok.stream(), ids, rng), tok.decode(ids)
        ops = difflib.SequenceMatcher(None, out, ref, autojunk=False).get_opcodes()
        differing = sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in ops if tag != "equal")
        assert differing <= sum(i in byte_ids for i in ids), (out, ref)
    assert raised > 10          # the recovery ran


def test_utf8_stream_completes_a_character_the_context_left_open():
    data = "a✓b".encode()                                   # ✓ is 3 bytes: 2 in the prompt
    stream = ByteTokenizer().stream(list(data[:3]))
    assert stream.step(list(data[3:4])) == "✓"
    assert stream.step(list(data[4:])) + stream.finish() == "b"


def test_engine_text_is_what_the_tokens_add_after_the_prompt(tmp_path):
    """A checkpoint with a SentencePiece-style tokenizer, end to end: the engine's streamed text is
    the whole-text decode of the output after the prompt's last tokens, first space included.
    Byte-fallback tokens are banned (logit bias -100): a random model would otherwise emit bytes
    that are no UTF-8, where no stream matches the whole text (the garbage test's case), and
    whether it does depends on the vocabulary, which BPE training does not reproduce exactly."""
    from engine_helpers import collect, run
    from hf_fixtures import save_tiny_llama
    from replica import Engine, EngineConfig

    tok = trained_tokenizer("sentencepiece")
    save_tiny_llama(tmp_path, seed=2, tokenizer=tok)
    eng = Engine(EngineConfig(model=str(tmp_path), device="cpu", dtype="float32", batch_buckets=(1, 2),
                              max_seq_len=128))
    no_bytes = {i: -100.0 for i in byte_tokens(eng.tokenizer)}
    try:
        for prompt in ("The paged KV cache holds", "Größe und"):
            ctx = eng.tokenizer.encode(prompt)[-CONTEXT_TOKENS:]
            toks, text, _ = run(collect(eng, prompt=prompt, max_tokens=24, temperature=0.0, ignore_eos=True,
                                        logit_bias=no_bytes))
            assert text == reference(eng.tokenizer.decode, ctx, toks)
            assert len(toks) == 24 and text
    finally:
        eng.shutdown()


def test_clean_up_tokenization_spaces_is_not_applied(tmp_path):
    """Llama 3's tokenizer_config sets clean_up_tokenization_spaces; transformers' clean-up would
    turn " ." into "." and " 's" into "'s" in BPE text. Neither decode nor the stream applies it."""
    trained_tokenizer("byte_level").save_pretrained(tmp_path)
    hf = HFTokenizer(str(tmp_path))
    hf._tok.clean_up_tokenization_spaces = True
    # recent transformers skip the clean-up for BPE unless this is set too; older ones do not
    hf._tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    ids = hf.encode("a list . of it 's words , kept")
    assert hf.decode(ids) == "a list . of it 's words , kept"
    assert isinstance(hf.stream(), DecodeStreamText)
    assert streamed(hf.stream(), ids, random.Random(6)) == "a list . of it 's words , kept"


def test_ids_past_the_tokenizer_vocabulary_decode_to_nothing(tok):
    """Checkpoints pad the embedding past the tokenizer (Qwen2: 151936 rows, 151646 tokens), so a
    sampled id may have no token: the stream skips it, as the whole-text decode does."""
    size = tok._tok.backend_tokenizer.get_vocab_size()
    ids = tok.encode("one two") + [size, size + 100] + tok.encode(" three")
    assert streamed(tok.stream(), ids, random.Random(7)) == tok.decode(ids) == "one two three"
