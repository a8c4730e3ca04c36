"""A vs A0 (fixed negative bias) on the folds xcopa, udhr, davidson_en, cold_zh:
threshold for 001 at 1% FPR on the OOF benign items of davidson_en + cold_zh
(en + zh), then recall there and benign FPR on the held-out xcopa / udhr languages."""
import pickle, sys, numpy as np
import train as T
d = T.Data(pickle.load(open("out/cache/prep.pkl", "rb")))
for tag in sys.argv[1:]:
    Z = np.load(f"out/results/oof_{tag}.npy")
    cal = np.isin(d.group, ["davidson_en", "cold_zh"]) & d.benign & np.isfinite(Z[:, 0])
    for fpr in (0.01, 0.03):
        s = np.sort(Z[cal, 0])[::-1]; t = s[int(fpr * len(s))]
        pos = np.isin(d.group, ["davidson_en", "cold_zh"]) & (d.Y[:, 0] > 0)
        rec = {g: float((Z[pos & (d.group == g), 0] >= t).mean()) for g in ["davidson_en", "cold_zh"]}
        out = []
        for g in ["xcopa", "udhr"]:
            b = (d.group == g) & d.benign
            out.append(f"{g} FPR {float((Z[b, 0] >= t).mean()):.3f}")
            if g == "xcopa":
                out.append("worst " + ", ".join(f"{l} {float((Z[b & (d.lang == l), 0] >= t).mean()):.2f}"
                                                 for l in sorted(set(d.lang[b]), key=lambda l: -float((Z[b & (d.lang == l), 0] >= t).mean()))[:4]))
        print(f"{tag} @{fpr:.0%} en+zh benign FPR: 001 recall davidson {rec['davidson_en']:.2f} cold {rec['cold_zh']:.2f}; " + "; ".join(out))
