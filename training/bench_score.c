/* bench_score.c - standalone timing (process CPU time) of candidate A scoring (featc.c) in C.
 *   gcc -O2 -o out/bench_score bench_score.c && out/bench_score out/dev_norm.txt 18
 * Input: one normalized window per line. Prints microseconds per KiB. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "featc.c"

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: %s file kbits [reps]\n", argv[0]); return 1; }
    int kbits = atoi(argv[2]), reps = argc > 3 ? atoi(argv[3]) : 5;
    FILE *f = fopen(argv[1], "rb"); if (!f) return 1;
    fseek(f, 0, SEEK_END); long n = ftell(f); fseek(f, 0, SEEK_SET);
    char *buf = malloc(n + 1); if (fread(buf, 1, n, f) != (size_t)n) return 1; buf[n] = 0; fclose(f);
    size_t V = (size_t)1 << kbits; int8_t *W = malloc(V * 8);
    for (size_t i = 0; i < V * 8; i++) W[i] = (int8_t)((i * 2654435761u) >> 24);
    int32_t acc[8]; int32_t *scratch = malloc(sizeof(int32_t) * 8 * 65536);
    long bytes = 0, feats = 0; volatile long sink = 0;
    struct timespec t0, t1; clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t0);
    for (int r = 0; r < reps; r++) {
        char *p = buf;
        while (*p) {
            char *e = strchr(p, '\n'); long len = e ? e - p : (long)strlen(p);
            if (len > 0 && len < 65536) {
                feats += feat_score((unsigned char *)p, len, kbits, 1, 4, 7, W, 8, acc, scratch, 8 * 65536);
                bytes += len; sink += acc[0];
            }
            p = e ? e + 1 : p + len;
        }
    }
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t1);
    double us = (t1.tv_sec - t0.tv_sec) * 1e6 + (t1.tv_nsec - t0.tv_nsec) / 1e3;
    printf("kbits %d: %.1f us/KiB, %.0f features/KiB\n", kbits, us / (bytes / 1024.0), feats / (bytes / 1024.0));
    return (int)(sink & 0);
}
