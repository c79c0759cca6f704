// amx_unit16.c: what AMX tiles can do for Q4's units of 16 columns (and, built with
// -DUNIT=128, for the int8 format's and lower's units of 128), one thread.
//
// Q4 keeps an f16 norm per 16 codes of a row, so an exact integer dot product can run over at
// most 16 columns before its sum must be scaled in f32. On AMX that means one `tdpbssd` of
// depth 16 per C tile (16 vectors x 16 rows of W, a quarter of the tile unit's depth), then a
// `tilestored` of the tile and an AVX-512 fold (load, convert, multiply-add by the norms) of
// its 256 sums. This program times, on 32 vectors x 1024 rows x 1024 columns (x and W in L1/L2),
// the tile schedule of nibble's AMX driver (2 x 2 C tiles: 4 zeroings, 2 + 2 tile loads, 4 dot
// products, 4 stores per unit, the fold of 8 units after each 8) with parts left out, against the
// AVX-512 VNNI micro-kernel's loop (8 vectors x 16 rows, 4 `vpdpbusd` per unit, then the fold's
// convert and multiply-add):
//   full              every instruction;
//   no fold           the tiles and their stores only;
//   no store/fold     zeroings, loads and dot products only;
//   vnni              the VNNI loop (units of 16 only);
//   amx interleaved   the full schedule with each chunk's 8 folds spread over the next chunk's
//                     8 units, one after each unit's tile instructions (as nibble's driver runs
//                     them, with two buffers of sums).
// Multiply-adds per second, best of 200 passes, two rounds. The sums are not checked (timing
// only; nibble's tests check its kernels).
//
//   gcc -O3 -march=native -mamx-tile -mamx-int8 amx_unit16.c -o amx_unit16 && ./amx_unit16
//   gcc -O3 -march=native -mamx-tile -mamx-int8 -DUNIT=128 amx_unit16.c -o amx_unit128
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define M 32
#define N 1024
#define K 1024
#ifndef UNIT
#define UNIT 16
#endif
#define U UNIT
// Depth of one tile dot product: the unit, at most 64 bytes.
#define D (U < 64 ? U : 64)
#define NU (K / U)
static int8_t xq[M * K];
static int8_t wp[N / 16 * K * 16] __attribute__((aligned(64)));  // panels [p][k/4][16][4]
static float scale[N / 16][NU][16];
static float y[M][N];
static int32_t sums[8][M][32] __attribute__((aligned(64)));
static int32_t sums2[2][8][M][32] __attribute__((aligned(64)));

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

typedef struct {
    uint8_t palette, start, res[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} cfg_t;

static void config(void) {
    cfg_t c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 4; t++) c.colsb[t] = 64, c.rows[t] = 16;  // C: 16 x 16 i32
    for (int t = 4; t < 6; t++) c.colsb[t] = D, c.rows[t] = 16;   // A: 16 vectors x D bytes
    for (int t = 6; t < 8; t++) c.colsb[t] = 64, c.rows[t] = D / 4;  // B: D / 4 rows x 64 bytes
    _tile_loadconfig(&c);
}

// The fold of 8 stored units of a 32 x 32 block into y.
static void fold(int p0, int u0) {
    for (int p = 0; p < 2; p++)
        for (int v0 = 0; v0 < M; v0 += 8) {
            __m512 a[8];
            for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();
            for (int j = 0; j < 8; j++) {
                __m512 sc = _mm512_loadu_ps(scale[p0 + p][u0 + j]);
                for (int i = 0; i < 8; i++)
                    a[i] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(_mm512_load_si512(&sums[j][v0 + i][p * 16])), sc, a[i]);
            }
            for (int i = 0; i < 8; i++) {
                float *o = &y[v0 + i][(p0 + p) * 16];
                _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), a[i]));
            }
        }
}

// Unit u's dot products for panels pb, pb + 1 into the four (zeroed) C tiles.
static inline void unit_tiles(int pb, int u) {
    for (int h = 0; h < U; h += D) {
        _tile_loadd(4, xq + u * U + h, K);
        _tile_loadd(5, xq + 16 * K + u * U + h, K);
        _tile_loadd(6, wp + (size_t)pb * K * 16 + (u * U + h) * 16, 64);
        _tile_loadd(7, wp + (size_t)(pb + 1) * K * 16 + (u * U + h) * 16, 64);
        _tile_dpbssd(0, 4, 6); _tile_dpbssd(1, 4, 7);
        _tile_dpbssd(2, 5, 6); _tile_dpbssd(3, 5, 7);
    }
}

// what: 0 full, 1 no fold, 2 no store and no fold.
static void run_amx(int what) {
    for (int pb = 0; pb < N / 16; pb += 2)
        for (int c = 0; c < NU / 8; c++) {
            for (int j = 0; j < 8; j++) {
                int u = c * 8 + j;
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                unit_tiles(pb, u);
                if (what < 2) {
                    _tile_stored(0, &sums[j][0][0], 128); _tile_stored(1, &sums[j][0][16], 128);
                    _tile_stored(2, &sums[j][16][0], 128); _tile_stored(3, &sums[j][16][16], 128);
                }
            }
            if (what == 0) fold(pb, c * 8);
        }
}


// One fold task k (0..8) of a chunk's stored sums s (panel k / 4, vectors 8 (k % 4) ..).
static inline void fold_task(int32_t (*s)[M][32], int p0, int u0, int k) {
    int p = k / 4, v0 = (k % 4) * 8;
    __m512 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();
    for (int j = 0; j < 8; j++) {
        __m512 sc = _mm512_loadu_ps(scale[p0 + p][u0 + j]);
        for (int i = 0; i < 8; i++)
            a[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(&s[j][v0 + i][p * 16])), sc, a[i]);
    }
    for (int i = 0; i < 8; i++) {
        float *o = &y[v0 + i][(p0 + p) * 16];
        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), a[i]));
    }
}

// Chunk c's units, each followed by one fold task of chunk c - 1 (two buffers).
static void run_interleaved(void) {
    for (int pb = 0; pb < N / 16; pb += 2)
        for (int c = 0; c <= NU / 8; c++) {
            int32_t (*cur)[M][32] = sums2[c & 1], (*prev)[M][32] = sums2[(c + 1) & 1];
            for (int j = 0; j < 8; j++) {
                if (c < NU / 8) {
                    int u = c * 8 + j;
                    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                    unit_tiles(pb, u);
                    _tile_stored(0, &cur[j][0][0], 128); _tile_stored(1, &cur[j][0][16], 128);
                    _tile_stored(2, &cur[j][16][0], 128); _tile_stored(3, &cur[j][16][16], 128);
                }
                if (c > 0) fold_task(prev, pb, (c - 1) * 8, j);
            }
        }
}

static void run_vnni(void) {
#if UNIT == 16
    for (int pb = 0; pb < N / 16; pb++)
        for (int v0 = 0; v0 < M; v0 += 8) {
            __m512 g[8];
            for (int i = 0; i < 8; i++) g[i] = _mm512_setzero_ps();
            const int8_t *w = wp + (size_t)pb * K * 16;
            for (int u = 0; u < NU; u++) {
                __m512 sc = _mm512_loadu_ps(scale[pb][u]);
                __m512i w0 = _mm512_load_si512(w + u * 256), w1 = _mm512_load_si512(w + u * 256 + 64);
                __m512i w2 = _mm512_load_si512(w + u * 256 + 128);
                __m512i w3 = _mm512_load_si512(w + u * 256 + 192);
                for (int i = 0; i < 8; i++) {
                    const int32_t *xr = (const int32_t *)(xq + (v0 + i) * K + u * U);
                    __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi32(xr[0]), w0);
                    s = _mm512_dpbusd_epi32(s, _mm512_set1_epi32(xr[1]), w1);
                    s = _mm512_dpbusd_epi32(s, _mm512_set1_epi32(xr[2]), w2);
                    s = _mm512_dpbusd_epi32(s, _mm512_set1_epi32(xr[3]), w3);
                    g[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, g[i]);
                }
            }
            for (int i = 0; i < 8; i++) _mm512_storeu_ps(&y[v0 + i][pb * 16], g[i]);
        }
#endif
}

int main(void) {
    // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    if (syscall(SYS_arch_prctl, 0x1023, 18)) {
        printf("AMX tiles not permitted here\n");
        return 1;
    }
    for (int i = 0; i < M * K; i++) xq[i] = (int8_t)(rand() % 255 - 127);
    for (size_t i = 0; i < sizeof wp; i++) wp[i] = (int8_t)(rand() % 31 - 15);
    for (size_t i = 0; i < sizeof scale / 4; i++) ((float *)scale)[i] = 0.01f;
    const char *names[] = {"amx full", "amx no fold", "amx no store/fold", "vnni", "amx interleaved"};
    for (int round = 0; round < 2; round++)
        for (int v = 0; v < 5; v++) {
            if (v == 3 && U != 16) continue;
            if (v != 3) config();
            double best = 1e9;
            for (int r = 0; r < 200; r++) {
                double t0 = now();
                if (v < 3) run_amx(v); else if (v == 3) run_vnni(); else run_interleaved();
                double t = now() - t0;
                if (t < best) best = t;
            }
            if (v != 3) _tile_release();
            printf("%-18s %7.1f us  %6.1f G multiply-adds/s\n", names[v], best * 1e6,
                   (double)M * N * K / best * 1e-9);
        }
    return 0;
}
