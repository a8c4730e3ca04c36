"""Rough cost figures for the runtime engineer (not the Rust bench).

  python bench.py            # uses the cached normalized windows (train.py prep)

1. Candidate A in C (featc.c: hash every feature and add its int8 weight row
   into 8 int32 accumulators), per KiB of normalized text, for 2^18 and 2^20
   buckets: this is close to what the Rust port will cost.
2. Candidate B: the word -> pieces cache hit rate on dev text (static table of
   the N most frequent training words, and a runtime cache that also learns
   from what it has seen), per script; Python Viterbi cost per KiB of misses.
"""
import collections
import ctypes
import os
import pickle
import time
import unicodedata

import numpy as np

import common
from common import CACHE


def script_of(word):
    for ch in word:
        if ch.isalpha():
            n = unicodedata.name(ch, "")
            for s in ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "THAI", "ARABIC", "HEBREW", "CYRILLIC",
                      "DEVANAGARI", "BENGALI", "GREEK", "LATIN"):
                if s in n:
                    return {"HIRAGANA": "KANA", "KATAKANA": "KANA"}.get(s, s)
            return "OTHER"
    return "DIGITS"


def bench_a(texts):
    from features import _build
    so = _build("featc.so", ["gcc", "-O2", "-shared", "-fPIC"])
    lib = ctypes.CDLL(so)
    lib.feat_score.restype = ctypes.c_long
    lib.feat_score.argtypes = [ctypes.c_char_p, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_long]
    bs = [t.encode("utf-8") for t in texts]
    total = sum(len(b) for b in bs)
    out = {}
    for k in (18, 20):
        W = np.random.default_rng(0).integers(-127, 127, size=(1 << k, 8), dtype=np.int8)
        acc = np.zeros(8, np.int32)
        scratch = np.zeros(max(len(b) for b in bs) * 6 + 16, np.int32)
        nf = 0
        t0 = time.perf_counter()
        for b in bs:
            nf += lib.feat_score(b, len(b), k, 1, 4, 7, W.ctypes.data, 8, acc.ctypes.data, scratch.ctypes.data,
                                 len(scratch))
        dt = time.perf_counter() - t0
        out[k] = {"us_per_kib": dt / (total / 1024) * 1e6, "features_per_kib": nf / (total / 1024)}
    return out


def bench_b(data):
    from features import Unigram
    with open(os.path.join(CACHE, "distil.pkl"), "rb") as f:
        res = pickle.load(f)
    items = data["items"]
    train_words = collections.Counter()
    dev_words = []
    dev_bytes = 0
    for t, i in zip(data["win_norm"], data["win_item"]):
        ws = [w for w in t.split(" ") if w]
        if items[i]["split"] == "dev":
            dev_words.extend(ws)
            dev_bytes += len(t.encode("utf-8"))
        else:
            train_words.update(ws)
    ranked = [w for w, _ in train_words.most_common()]
    out = {"distinct_train_words": len(ranked), "dev_word_tokens": len(dev_words)}
    for N in (50_000, 200_000, len(ranked)):
        table = set(ranked[:N])
        seen = set()
        hit_static = hit_rt = 0
        by_script = collections.defaultdict(lambda: [0, 0])
        for w in dev_words:
            s = w in table
            hit_static += s
            hit_rt += s or (w in seen)
            seen.add(w)
            bs = by_script[script_of(w)]
            bs[0] += s
            bs[1] += 1
        out[f"static_top_{N}"] = {"hit_rate": hit_static / len(dev_words),
                                  "hit_rate_with_runtime_cache": hit_rt / len(dev_words),
                                  "by_script": {k: round(v[0] / v[1], 3) for k, v in by_script.items() if v[1] >= 200},
                                  "approx_bytes": sum(len(w.encode()) + 8 for w in ranked[:N])}
    # Python Viterbi on misses (rough; the Rust one will be ~50-100x faster)
    uni = Unigram(res["pieces"], res["scores"])
    sample = dev_words[:20000]
    t0 = time.perf_counter()
    for w in sample:
        uni.cache.pop(w, None)
        uni.word(w)
    dt = time.perf_counter() - t0
    sb = sum(len(w.encode()) + 1 for w in sample)
    out["python_viterbi_us_per_kib_all_miss"] = dt / (sb / 1024) * 1e6
    return out


def main():
    with open(os.path.join(CACHE, "prep.pkl"), "rb") as f:
        data = pickle.load(f)
    dev = [t for t, i in zip(data["win_norm"], data["win_item"]) if data["items"][i]["split"] == "dev"]
    print("A (C, per KiB of normalized dev text):", bench_a(dev))
    print("B:", bench_b(data))


if __name__ == "__main__":
    main()
