"""A request's text, step by step: host time per token of the old window decode against the
text streams the engine uses now (CPU; the front end runs this for every token of every request).

    python benchmarks/detok_bench.py              # three seeds, writes results/detok-cpu-<date>.json

Tokenizers: two BPE vocabularies trained here (tests/hf_fixtures.py: byte-level as Llama 3 and
Qwen have it, SentencePiece-style with byte fallback as Llama 2 and Mistral), 2k and 16k entries,
and the random presets' byte tokenizer. Text: stretches of this repository's docs and code and a
multilingual line, each fed one token at a time after its first 16 characters as the prompt, through
`IncrementalDetokenizer` (add + take, as `Engine._to_chunk` calls it, with one stop string).
"old" is the window decode (`WindowStream` over the tokenizer's `decode`, what the detokenizer did
before); "new" is `tokenizer.stream()` (DecodeStream for HF fast tokenizers, an incremental UTF-8
decoder for bytes). Reported: microseconds per token for each, new / old, and whether the texts
are equal (they must be on this natural text).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import common as C  # noqa: E402
from replica.detokenizer import IncrementalDetokenizer  # noqa: E402
from replica.text_stream import WindowStream  # noqa: E402
from replica.tokenizer import ByteTokenizer, HFTokenizer  # noqa: E402


class WindowDecoding:
    """The tokenizer as before: its text streams are window decodes."""

    def __init__(self, tok):
        self.tok = tok

    def stream(self, context=()):
        return WindowStream(self.tok.decode, context)


def texts(seed: int, n: int, length: int) -> list[str]:
    from hf_fixtures import MULTILINGUAL

    rng = random.Random(seed)
    sources = [open(os.path.join(ROOT, p)).read() for p in
               ("README.md", "docs/perf-notes.md", "replica/scheduler.py", "router/policy.py")]
    sources.append(MULTILINGUAL * 40)
    out = []
    for _ in range(n):
        src = rng.choice(sources)
        a = rng.randrange(len(src) - length)
        out.append(src[a:a + length])
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def run_one(tok, requests, repeats: int) -> tuple[float, str]:
    """Best-of-`repeats` microseconds per token, and the texts (joined) of the last repeat."""
    best, joined = float("inf"), ""
    n = sum(len(ids) for _, ids in requests)
    for _ in range(repeats):
        pieces = []
        t0 = time.perf_counter()
        for prompt, ids in requests:
            d = IncrementalDetokenizer(tok, stop=["<|stop|>"], context=prompt)
            for i in ids:
                d.add([i])
                pieces.append(d.take(final=False)[0])
            pieces.append(d.flush_all())
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
        joined = "".join(pieces)
    return best, joined


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--texts", type=int, default=40, help="texts per seed")
    ap.add_argument("--chars", type=int, default=1500, help="characters per text")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from hf_fixtures import trained_tokenizer
    import tempfile
    import tokenizers

    tokenizers_under_test = {"bytes (random presets)": ByteTokenizer()}
    with tempfile.TemporaryDirectory() as d:
        for kind in ("byte_level", "sentencepiece"):
            for vocab in (2000, 16000):
                path = os.path.join(d, f"{kind}-{vocab}")
                trained_tokenizer(kind, vocab_size=vocab).save_pretrained(path)
                tokenizers_under_test[f"{kind} {vocab}"] = HFTokenizer(path)
        rows = []
        for name, tok in tokenizers_under_test.items():
            for seed in range(a.seeds):
                requests = [(tok.encode(t[:16]), tok.encode(t[16:])) for t in texts(seed, a.texts, a.chars)]
                old_us, old_text = run_one(WindowDecoding(tok), requests, a.repeats)
                new_us, new_text = run_one(tok, requests, a.repeats)
                row = {"tokenizer": name, "seed": seed, "tokens": sum(len(i) for _, i in requests),
                       "old_us_per_token": old_us, "new_us_per_token": new_us,
                       "new_over_old": new_us / old_us, "same_text": old_text == new_text}
                rows.append(row)
                C.log(f"{name:<24} seed {seed}: old {old_us:5.2f} us/token, new {new_us:5.2f}, "
                      f"new/old x{row['new_over_old']:.3f}, same text {row['same_text']}")
    summary = {}
    for name in tokenizers_under_test:
        mine = [r for r in rows if r["tokenizer"] == name]
        summary[name] = {"new_over_old_median": statistics.median(r["new_over_old"] for r in mine),
                         "old_us_median": statistics.median(r["old_us_per_token"] for r in mine),
                         "new_us_median": statistics.median(r["new_us_per_token"] for r in mine),
                         "same_text": all(r["same_text"] for r in mine)}
        C.log(f"{name:<24} new/old x{summary[name]['new_over_old_median']:.3f} (median of {len(mine)})")
    env = {"date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "tokenizers": tokenizers.__version__,
           "cpu": cpu_model(), "cpus": os.cpu_count(), "card": "cpu"}
    date = _dt.date.today().isoformat()
    C.write_json(C.out_path(a.out, f"detok-cpu-{date}.json"),
                 {"benchmark": "detok_bench", "env": env, "args": vars(a), "summary": summary, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
