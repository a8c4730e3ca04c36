#!/usr/bin/env python3
"""Refreshes models/parity.json for the shipped model when the normalizer changes.

The runtime's parity test (tests/learned.rs) checks that `mistguard normalize` gives each text's
`normalized` form and that the runtime scores it as the trainer's reference scorer does. When the
normalizer folds more (look-alike runs, separators inside words, leetspeak words), the texts are
normalized again here by the project's binary and scored again by `modelfile.Reference` from the
same model file: the model is unchanged, only what it reads.

    cargo build --release && .venv/bin/python parity.py   # rewrites ../models/parity.json
"""
import argparse
import json
import os

import blake3

import common
import modelfile

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=os.path.join(HERE, "..", "models"))
    ap.add_argument("--mg", help="the mistguard binary (default: ../target/release/mistguard)")
    args = ap.parse_args()
    model_path = os.path.join(args.models, "mistguard-model.bin")
    parity_path = os.path.join(args.models, "parity.json")
    parity = json.load(open(parity_path, encoding="utf-8"))
    digest = blake3.blake3(open(model_path, "rb").read()).hexdigest()
    if digest != parity["model_blake3"]:
        raise SystemExit("parity.json was written for another model file: run train.py export")
    header, _ = modelfile.read(model_path)
    ref = modelfile.Reference(model_path)
    labels = header["labels"]
    norms = common.normalize_texts([t["text"] for t in parity["texts"]], common.find_normalizer(args.mg))
    changed = 0
    for t, norm in zip(parity["texts"], norms):
        changed += norm != t["normalized"]
        pr, z, info = ref.probs(norm)
        t.update({"normalized": norm, **info, "logits": [float(x) for x in z],
                  "scores": {lab: float(pr[l]) for l, lab in enumerate(labels)}})
        for l, lab in enumerate(labels):
            if t["verdicts"].get(lab) == "off":
                continue
            th = header["thresholds"][lab]
            t["verdicts"][lab] = "act" if pr[l] >= th["act"] else "flag" if pr[l] >= th["flag"] else "none"
    with open(parity_path, "w", encoding="utf-8") as f:
        json.dump(parity, f, ensure_ascii=False, indent=1)
    print(f"{len(norms)} texts, {changed} normalized differently; wrote {parity_path}")


if __name__ == "__main__":
    main()
