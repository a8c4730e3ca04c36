"""The model file format (writer, reader) and the reference scorer.

File layout (all integers little-endian):

  offset 0   magic        8 bytes  b"MGMODEL\\0"
  offset 8   version      u32      1
  offset 12  header_len   u32      length in bytes of the JSON header
  offset 16  header       JSON (UTF-8), header_len bytes
  ...        zero padding to a multiple of 16
  data       tensor bytes; each tensor starts at a multiple of 16 relative to
             the start of the data section (its `offset` in the header)
  last 32    BLAKE3-256 of every byte before it

The JSON header holds: labels, thresholds (flag/act per label, probabilities),
calibration (a, c per label), the feature configuration, and the tensor table
[{name, dtype: i8|f32|u32|i32|u8, shape, scale (i8 only), offset, nbytes}].
A dequantized i8 tensor is q * scale: `scale` is one float, or for `hash.w` a list with one
float per label (column).

Scoring (see RESEARCH.md "Scoring formula" for the normative text): for a
window with normalized text t,
  part A:  n_A = number of hashed features of t (with repeats);
           acc[l] = sum over features f of hash.w[bucket(f), l] (int32 sum of int8)
           zA[l] = hash.w.scale[l] * acc[l] / sqrt(max(n_A, 1))
  part B:  pieces = unigram tokenization of every word of t; n_B = len(pieces)
           v = emb.scale * (sum of emb rows of the pieces; unknown piece = 0) / max(n_B, 1)
           linear: zB = v @ headB.w (dequantized)
           mlp:    h = relu(v @ mlp.w1 + mlp.b1); zB = h @ mlp.w2
  z[l] = bias[l] + zA[l] + zB[l]
  p[l] = 1 / (1 + exp(-(calib.a[l] * z[l] + calib.c[l])))
"""
import json
import struct

import numpy as np

MAGIC = b"MGMODEL\0"
VERSION = 1
DT = {"i8": np.int8, "f32": np.float32, "u32": np.uint32, "i32": np.int32, "u8": np.uint8}


def quantize(w):
    w = np.asarray(w, np.float32)
    m = float(np.abs(w).max())
    scale = m / 127.0 if m > 0 else 1.0
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return q, np.float32(scale)


def quantize_cols(w):
    """int8 with one scale per column (per label): q[:, l] * scale[l]."""
    w = np.asarray(w, np.float32)
    m = np.abs(w).max(0)
    scale = np.where(m > 0, m / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return q, scale


def write(path, header, tensors):
    """tensors: list of (name, ndarray, scale-or-None)."""
    import blake3
    table, blobs, off = [], [], 0
    for name, arr, scale in tensors:
        arr = np.ascontiguousarray(arr)
        dt = {v: k for k, v in DT.items()}[arr.dtype.type]
        b = arr.tobytes()
        ent = {"name": name, "dtype": dt, "shape": list(arr.shape), "offset": off, "nbytes": len(b)}
        if scale is not None:
            ent["scale"] = [float(x) for x in scale] if np.ndim(scale) else float(scale)
        table.append(ent)
        pad = (-len(b)) % 16
        blobs.append(b + b"\0" * pad)
        off += len(b) + pad
    header = dict(header, tensors=table)
    hj = json.dumps(header, ensure_ascii=False, sort_keys=True).encode("utf-8")
    head = MAGIC + struct.pack("<II", VERSION, len(hj)) + hj
    head += b"\0" * ((-len(head)) % 16)
    body = head + b"".join(blobs)
    digest = blake3.blake3(body).digest()
    with open(path, "wb") as f:
        f.write(body + digest)
    return len(body) + 32


def read(path, verify=True):
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:8] != MAGIC:
        raise ValueError("bad magic")
    ver, hl = struct.unpack("<II", raw[8:16])
    if ver != VERSION:
        raise ValueError(f"unsupported version {ver}")
    if verify:
        import blake3
        if blake3.blake3(raw[:-32]).digest() != raw[-32:]:
            raise ValueError("checksum mismatch")
    header = json.loads(raw[16:16 + hl].decode("utf-8"))
    start = 16 + hl
    start += (-start) % 16
    T = {}
    for e in header["tensors"]:
        a = np.frombuffer(raw, dtype=DT[e["dtype"]], count=int(np.prod(e["shape"])) if e["shape"] else 1,
                          offset=start + e["offset"]).reshape(e["shape"])
        T[e["name"]] = (a, e.get("scale"))
    return header, T


class Reference:
    """Scores normalized window texts from a model file, exactly as specified."""

    def __init__(self, path):
        from features import Unigram
        self.h, self.T = read(path)
        self.L = len(self.h["labels"])
        fa = self.h["features"].get("hash")
        self.fa = fa
        if "hash.w" in self.T:
            q, s = self.T["hash.w"]
            s = np.asarray(s, np.float32)          # one scale per label
            self.WA = q.astype(np.float32) * s
            self.WAq, self.WAs = q, s
        fb = self.h["features"].get("embedding")
        self.fb = fb
        if fb:
            blob = self.T["vocab.blob"][0].tobytes()
            offs = self.T["vocab.offsets"][0]
            pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(len(offs) - 1)]
            self.uni = Unigram(pieces, self.T["vocab.scores"][0])
            q, s = self.T["emb"]
            self.embq, self.embs = q, np.float32(s)
            self.B = {k: (v[0].astype(np.float32) * np.float32(v[1]) if v[1] is not None else v[0].astype(np.float32))
                      for k, v in self.T.items() if k.startswith("head") or k.startswith("mlp")}
        self.bias = self.T["bias"][0].astype(np.float32)
        self.a = np.array(self.h["calibration"]["a"], np.float32)
        self.c = np.array(self.h["calibration"]["c"], np.float32)

    def logits(self, norm):
        from features import hashed_features_py
        z = self.bias.copy()
        info = {}
        if self.fa:
            ids = hashed_features_py(norm, self.fa["kbits"], self.fa["nmin"], self.fa["nmax"], self.fa["flags"])
            acc = self.WAq[ids].astype(np.int32).sum(0) if ids else np.zeros(self.L, np.int32)
            z += self.WAs * acc.astype(np.float32) / np.float32(np.sqrt(max(len(ids), 1)))
            info["n_hash_features"] = len(ids)
        if self.fb:
            toks = self.uni.text(norm)
            known = [p for p in toks if p >= 0]
            s = self.embq[known].astype(np.int32).sum(0) if known else np.zeros(self.embq.shape[1], np.int32)
            v = self.embs * s.astype(np.float32) / np.float32(max(len(toks), 1))
            if "mlp.w1" in self.B:
                hdn = np.maximum(v @ self.B["mlp.w1"] + self.B["mlp.b1"], 0)
                z += hdn @ self.B["mlp.w2"]
            else:
                z += v @ self.B["headB.w"]
            info["n_pieces"] = len(toks)
        return z, info

    def probs(self, norm):
        z, info = self.logits(norm)
        return 1.0 / (1.0 + np.exp(-(self.a * z + self.c))), z, info
