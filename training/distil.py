"""Candidate B: distil a static piece-embedding table from multilingual-e5-small.

Model2Vec-style: every kept vocabulary piece is run alone through the encoder
(<s> piece </s>, mean-pooled last hidden state, 384-d); the table is reduced by
PCA to D dims and optionally weighted by a SIF prior a / (a + p(piece)) with
p estimated on the training corpus.

Vocabulary pruning: the pieces that the full XLM-R tokenizer uses on the
normalized training corpus (train.jsonl incl. UDHR/XCOPA, and our synthetic
files; never dev) plus every single-character piece (with and without the
U+2581 word marker).
"""
import os
import pickle

import numpy as np

from common import CACHE, log
from features import E5, META

RAW = os.path.join(CACHE, "e5_raw.pkl")


def piece_counts(e5, texts):
    cnt = np.zeros(e5.n, np.int64)
    for i, t in enumerate(texts):
        ids = e5.tokenize(t)
        np.add.at(cnt, ids, 1)
        if i % 20000 == 0:
            log(f"  tokenized {i}/{len(texts)}")
    return cnt


def distil(data, threads=2):
    """Embed the kept pieces (incrementally cached) -> dict with raw vectors."""
    e5 = E5(threads=threads)
    pieces, scores = e5.vocab()
    items = data["items"]
    texts = [t for t, i in zip(data["win_norm"], data["win_item"]) if items[i]["split"] != "dev"]
    log(f"counting pieces over {len(texts)} non-dev windows")
    cnt = piece_counts(e5, texts)
    single = np.array([len(p) == 1 or (len(p) == 2 and p[0] == META) for p in pieces])
    special = np.zeros(e5.n, bool)
    special[:4] = True
    keep = ((cnt > 0) | single) & ~special
    keep_ids = np.nonzero(keep)[0]
    log(f"kept {len(keep_ids)} of {e5.n} pieces ({int((cnt > 0).sum())} seen in the corpus, "
        f"{int(single.sum())} single-char)")
    raw = {}
    if os.path.exists(RAW):
        with open(RAW, "rb") as f:
            raw = pickle.load(f)
    todo = [i for i in keep_ids if i not in raw]
    log(f"embedding {len(todo)} new pieces ({len(raw)} cached)")
    if todo:
        vecs = e5.embed_pieces(todo)
        for i, v in zip(todo, vecs):
            raw[int(i)] = v
        with open(RAW, "wb") as f:
            pickle.dump(raw, f)
    res = {"ids": keep_ids, "pieces": [pieces[i] for i in keep_ids], "scores": scores[keep_ids],
           "counts": cnt[keep_ids], "raw": np.stack([raw[int(i)] for i in keep_ids])}
    with open(os.path.join(CACHE, "distil.pkl"), "wb") as f:
        pickle.dump(res, f)
    return res


def reduce(res, dim=64, sif_a=1e-3, center=True):
    """PCA to `dim` dims (fit on the kept pieces), then SIF weighting. -> float32 table."""
    X = res["raw"].astype(np.float64)
    mu = X.mean(0) if center else np.zeros(X.shape[1])
    Xc = X - mu
    U, S, Vt = np.linalg.svd(Xc, full_matrices=False)
    T = Xc @ Vt[:dim].T
    if sif_a:
        c = res["counts"].astype(np.float64)
        p = c / max(c.sum(), 1)
        T = T * (sif_a / (sif_a + p))[:, None]
    return T.astype(np.float32)
