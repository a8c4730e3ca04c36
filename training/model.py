"""Multi-label heads trained jointly with L-BFGS (numpy/scipy only).

score z[l] = b[l] + s(n_A) * sum_{hashed features f} WA[f, l]            (part A, linear)
                  + head_B(v)                                               (part B)
where v is the standardized mean-pooled piece embedding of the window and
head_B is either linear (v @ WB) or a one-hidden-layer MLP
(relu(v @ W1 + b1) @ W2). Loss: weighted, masked binary cross-entropy
(alt labels are masked out), positives up-weighted per label, L2 penalties.
"""
import numpy as np
import scipy.optimize as opt

from common import log


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


class Heads:
    def __init__(self, n_labels, V=0, D=0, hidden=0, l2_a=1e-6, l2_b=1e-4, maxiter=150, bias0=None):
        self.L, self.V, self.D, self.H = n_labels, V, D, hidden
        self.bias0 = bias0   # if set: the bias is fixed at this logit (no evidence => benign)
        self.l2_a, self.l2_b, self.maxiter = l2_a, l2_b, maxiter

    # parameter vector layout: WA (V*L) | WB (D*L) or W1 (D*H), b1 (H), W2 (H*L) | b (L)
    def _shapes(self):
        L, V, D, H = self.L, self.V, self.D, self.H
        s = []
        if V:
            s.append(("WA", (V, L)))
        if D and not H:
            s.append(("WB", (D, L)))
        if D and H:
            s += [("W1", (D, H)), ("b1", (H,)), ("W2", (H, L))]
        if self.bias0 is None:
            s.append(("b", (L,)))
        return s

    def _unpack(self, theta):
        p, k = {}, 0
        for name, shp in self._shapes():
            n = int(np.prod(shp))
            p[name] = theta[k:k + n].reshape(shp).astype(np.float32)
            k += n
        if self.bias0 is not None:
            p["b"] = np.full(self.L, self.bias0, np.float32)
        return p

    def _forward(self, p, XA, XB):
        z = np.broadcast_to(p["b"], (XA.shape[0] if XA is not None else XB.shape[0], self.L)).copy()
        cache = {}
        if XA is not None and "WA" in p:
            z += XA @ p["WA"]
        if XB is not None and "WB" in p:
            z += XB @ p["WB"]
        if XB is not None and "W1" in p:
            a = XB @ p["W1"] + p["b1"]
            h = np.maximum(a, 0)
            cache["h"] = h
            z += h @ p["W2"]
        return z, cache

    def fit(self, XA, XB, Y, M, sw, pos_w):
        """XA: scaled CSR (N x V) or None; XB: dense (N x D) or None; Y, M: (N x L) 0/1;
        sw: sample weights (N); pos_w: per-label positive weight (L)."""
        N = Y.shape[0]
        XAT = XA.T.tocsr() if XA is not None else None
        shapes = self._shapes()
        sizes = [int(np.prod(s)) for _, s in shapes]
        rng = np.random.default_rng(0)
        theta0 = np.zeros(sum(sizes))
        k = 0
        for (name, shp), n in zip(shapes, sizes):
            if name in ("W1", "W2"):
                theta0[k:k + n] = rng.normal(0, 0.1, n)
            k += n
        # prior log-odds for the bias
        pr = np.clip((Y * M * sw[:, None]).sum(0) / np.maximum((M * sw[:, None]).sum(0), 1e-9), 1e-4, 1 - 1e-4)
        if self.bias0 is None:
            theta0[-self.L:] = np.log(pr / (1 - pr))
        Wt = (M * sw[:, None] * np.where(Y > 0, pos_w[None, :], 1.0)).astype(np.float32)
        Wt /= Wt.sum() / self.L
        Yf = Y.astype(np.float32)
        it = [0]

        def f(theta):
            p = self._unpack(theta)
            z, cache = self._forward(p, XA, XB)
            # BCE with logits
            loss = (Wt * (np.logaddexp(0, z) - Yf * z)).sum()
            G = (Wt * (_sigmoid(z) - Yf)).astype(np.float32)
            grads = {}
            if "WA" in p:
                grads["WA"] = XAT @ G + 2 * self.l2_a * p["WA"]
                loss += self.l2_a * float((p["WA"] ** 2).sum())
            if "WB" in p:
                grads["WB"] = XB.T @ G + 2 * self.l2_b * p["WB"]
                loss += self.l2_b * float((p["WB"] ** 2).sum())
            if "W1" in p:
                h = cache["h"]
                grads["W2"] = h.T @ G + 2 * self.l2_b * p["W2"]
                dh = (G @ p["W2"].T) * (h > 0)
                grads["W1"] = XB.T @ dh + 2 * self.l2_b * p["W1"]
                grads["b1"] = dh.sum(0)
                loss += self.l2_b * float((p["W1"] ** 2).sum() + (p["W2"] ** 2).sum())
            grads["b"] = G.sum(0)
            g = np.concatenate([np.asarray(grads[name], np.float64).ravel() for name, _ in shapes])
            it[0] += 1
            if it[0] % 25 == 0:
                log(f"    iter {it[0]} loss {loss:.5f}")
            return float(loss), g

        res = opt.minimize(f, theta0, jac=True, method="L-BFGS-B",
                           options={"maxiter": self.maxiter, "maxcor": 10})
        self.p = self._unpack(res.x)
        return self

    def decision(self, XA, XB):
        z, _ = self._forward(self.p, XA, XB)
        return z
