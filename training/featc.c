/* featc.c - hashed n-gram features for the mistguard learned tier (candidate A).
 *
 * This is the fast twin of features.py:hashed_features(); both must agree
 * bit for bit (train.py selftest checks it). The Rust runtime ports THIS.
 *
 * Input: the normalized text (UTF-8), as `mistguard normalize` prints it:
 * " w1 w2 ... wn " (single spaces, a leading and a trailing space).
 *
 * Features (each one emits one bucket id):
 *   kind 1  char n-grams, n = 1..4, over Unicode scalar values, every start
 *           position; the 1-gram " " is skipped.  Bytes hashed: the UTF-8
 *           bytes of the n-gram.
 *   kind 2  word unigrams: maximal runs of non-space chars.
 *   kind 3  word bigrams: two adjacent words; bytes hashed are
 *           w1 + 0x20 + w2 (i.e. the slice "w1 w2" of the text).
 * Hash: FNV-1a 64 (offset 0xcbf29ce484222325, prime 0x100000001b3) over the
 * byte sequence [kind] ++ bytes; bucket = (h ^ (h >> 32)) & ((1 << kbits) - 1).
 *
 * Build: gcc -O2 -shared -fPIC -o featc.so featc.c
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline uint64_t fnv_kind(int kind, const unsigned char *s, long n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    h ^= (uint8_t)kind; h *= 0x100000001b3ULL;
    for (long i = 0; i < n; i++) { h ^= s[i]; h *= 0x100000001b3ULL; }
    return h;
}
static inline int32_t bucket(uint64_t h, int kbits) {
    return (int32_t)((h ^ (h >> 32)) & ((1ULL << kbits) - 1ULL));
}

/* flags: bit0 char n-grams, bit1 word unigrams, bit2 word bigrams.
 * Returns the number of features written to out (<= cap). */
long feat_hash(const unsigned char *s, long nb, int kbits, int nmin, int nmax,
               int flags, int32_t *out, long cap) {
    long *off = (long *)malloc(sizeof(long) * (nb + 2));
    long nc = 0;
    for (long i = 0; i < nb; ) {
        off[nc++] = i;
        unsigned char c = s[i];
        int adv = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
        i += adv; if (i > nb) i = nb;
    }
    off[nc] = nb;
    long k = 0;
    if (flags & 1) {
        /* FNV-1a is a streaming hash: the state after feeding the first n
         * characters of the n-gram starting at i IS the hash of the n-gram,
         * so each start position costs nmax character extensions. */
        for (long i = 0; i < nc; i++) {
            uint64_t h = 0xcbf29ce484222325ULL;
            h ^= 1; h *= 0x100000001b3ULL;
            for (int n = 1; n <= nmax && i + n <= nc; n++) {
                for (long b = off[i + n - 1]; b < off[i + n]; b++) { h ^= s[b]; h *= 0x100000001b3ULL; }
                if (n < nmin || (n == 1 && s[off[i]] == ' ')) continue;
                if (k < cap) out[k++] = bucket(h, kbits);
            }
        }
    }
    if (flags & 6) {
        long pa = -1, pb = -1;          /* previous word [pa, pb) in bytes */
        long i = 0;
        while (i < nb) {
            while (i < nb && s[i] == ' ') i++;
            if (i >= nb) break;
            long a = i;
            while (i < nb && s[i] != ' ') i++;
            long b = i;
            if ((flags & 2) && k < cap) out[k++] = bucket(fnv_kind(2, s + a, b - a), kbits);
            if ((flags & 4) && pa >= 0 && k < cap)
                out[k++] = bucket(fnv_kind(3, s + pa, b - pa), kbits);
            pa = a; pb = b;
        }
        (void)pb;
    }
    free(off);
    return k;
}

/* Batch: texts concatenated in `buf`, text t is buf[offs[t], offs[t+1]).
 * Features of text t go to out[ooffs[t], ooffs[t+1]). Returns total. */
long feat_batch(const unsigned char *buf, const int64_t *offs, long n, int kbits,
                int nmin, int nmax, int flags, int32_t *out, int64_t *ooffs, long cap) {
    long k = 0;
    ooffs[0] = 0;
    for (long t = 0; t < n; t++) {
        long got = feat_hash(buf + offs[t], offs[t + 1] - offs[t], kbits, nmin, nmax,
                             flags, out + k, cap - k);
        k += got;
        ooffs[t + 1] = k;
    }
    return k;
}

/* Timing helper: score a text with an int8 weight table [2^kbits][L] the way
 * the runtime would (sum weight rows per feature into int32 accumulators). */
long feat_score(const unsigned char *s, long nb, int kbits, int nmin, int nmax, int flags,
                const int8_t *W, int L, int32_t *acc, int32_t *scratch, long cap) {
    long nf = feat_hash(s, nb, kbits, nmin, nmax, flags, scratch, cap);
    for (int l = 0; l < L; l++) acc[l] = 0;
    for (long i = 0; i < nf; i++) {
        const int8_t *w = W + (size_t)scratch[i] * L;
        for (int l = 0; l < L; l++) acc[l] += w[l];
    }
    return nf;
}
