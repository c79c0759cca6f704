// weight_stream.c: the memory bound of a batch-1 forward through BigNet's f32 weights.
//
// A batch-1 forward reads every weight once: 18 layers of 1024 x 1024 f32 (75.5 MB). This
// program times `threads` threads reading those bytes the way nibble's batch-1 team does (each
// thread its blocks of 16 rows of every layer, blocks interleaved across threads, a dot
// product per row with a 1024-float x), in two ways:
//   barrier: a spin barrier after each layer (as the team waits for each layer's output);
//   free:    each thread reads all its rows of all layers with no barrier (the bandwidth bound).
// Medians (min / max) over `passes` passes of all 18 layers, after 3 warm-up passes. The third
// argument picks the layout and the input: `dense` (row-major W, one row at a time), `packed`
// (nibble's packed panels, the 4 K blocks of a panel side by side, as its panel GEMV), and
// `chain` (each layer's x is the previous layer's output, which the threads wrote: a line of x
// comes from another core's cache, as in a real forward) combined with either.
//
//   gcc -O3 -march=native -pthread weight_stream.c -o weight_stream
//   ./weight_stream 16 41 dense; ./weight_stream 16 41 packed,chain; ./weight_stream 2 41 int8,chain
#include <immintrin.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define DIM 1024
#define LAYERS 18
#define BLOCK 16

static float *weights;
static float xvec[DIM];
static int nthreads, passes;
static double *times_barrier, *times_free;
static _Alignas(128) atomic_long arrivals[256 * 16];

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

// Each thread's counter on a line of its own; a waiter reads all of them.
static void barrier(int me, long epoch) {
    atomic_store_explicit(&arrivals[me * 16], epoch, memory_order_release);
    for (;;) {
        int behind = 0;
        for (int t = 0; t < nthreads; t++)
            behind += atomic_load_explicit(&arrivals[t * 16], memory_order_acquire) < epoch;
        if (!behind) return;
        _mm_pause();
    }
}

// y[r] = W[r] . x for the 16 rows of one block, W row-major.
static void block_dense(const float *w, const float *x, float *y) {
    for (int r = 0; r < BLOCK; r++) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int k = 0; k < DIM; k += 32) {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + r * DIM + k), _mm512_loadu_ps(x + k), a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + r * DIM + k + 16), _mm512_loadu_ps(x + k + 16),
                                 a1);
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

// The same 16 outputs from nibble's packed layout: K blocks of 256, each holding every panel of
// 16 rows as 256 steps of 16 floats; the 4 K blocks side by side (4 accumulators).
static void block_packed(const float *w, int panel, const float *x, float *y) {
    const float *p[4];
    for (int b = 0; b < 4; b++) p[b] = w + (size_t)b * 256 * DIM + (size_t)panel * 256 * 16;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    for (int k = 0; k < 256; k++)
        for (int b = 0; b < 4; b++)
            acc[b] = _mm512_fmadd_ps(_mm512_loadu_ps(p[b] + k * 16), _mm512_set1_ps(x[b * 256 + k]),
                                     acc[b]);
    _mm512_storeu_ps(y, _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

// The same 16 outputs from one byte per weight (row-major codes), integer dot products with
// x's bytes as the int8 format's fused GEMV takes them.
static void block_int8(const unsigned char *w, const signed char *xq, float *y) {
    for (int r = 0; r < BLOCK; r++) {
        __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
        for (int k = 0; k < DIM; k += 128) {
            __m512i c0 = _mm512_loadu_si512(w + r * DIM + k), c1 = _mm512_loadu_si512(w + r * DIM + k + 64);
            __m512i x0 = _mm512_loadu_si512(xq + k), x1 = _mm512_loadu_si512(xq + k + 64);
#ifdef __AVX512VNNI__
            a0 = _mm512_dpbusd_epi32(a0, c0, x0);
            a1 = _mm512_dpbusd_epi32(a1, c1, x1);
#else
            __m512i ones = _mm512_set1_epi16(1);
            a0 = _mm512_add_epi32(a0, _mm512_madd_epi16(_mm512_maddubs_epi16(c0, x0), ones));
            a1 = _mm512_add_epi32(a1, _mm512_madd_epi16(_mm512_maddubs_epi16(c1, x1), ones));
#endif
        }
        y[r] = (float)_mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1));
    }
}

static int packed_layout, chained, int8_layout;
static signed char xbytes[DIM];
static float ybuf[2][DIM];

// This thread's blocks of one layer; x is the fixed vector or, chained, the previous layer's y.
static void layer_share(int me, int layer) {
    const float *w = weights + (size_t)layer * DIM * DIM;
    const float *x = chained ? ybuf[layer & 1] : xvec;
    float *y = ybuf[(layer + 1) & 1];
    for (int r0 = me * BLOCK; r0 < DIM; r0 += BLOCK * nthreads) {
        if (int8_layout)
            block_int8((const unsigned char *)weights + (size_t)layer * DIM * DIM + (size_t)r0 * DIM,
                       xbytes, y + r0);
        else if (packed_layout)
            block_packed(w, r0 / BLOCK, x, y + r0);
        else
            block_dense(w + (size_t)r0 * DIM, x, y + r0);
    }
}

static void *worker(void *arg) {
    int me = (int)(long)arg;
    long epoch = 0;
    for (int p = -3; p < passes; p++) {
        barrier(me, ++epoch);
        double t0 = now();
        for (int l = 0; l < LAYERS; l++) {
            layer_share(me, l);
            barrier(me, ++epoch);
        }
        if (me == 0 && p >= 0) times_barrier[p] = now() - t0;
    }
    for (int p = -3; p < passes; p++) {
        barrier(me, ++epoch);
        double t0 = now();
        for (int l = 0; l < LAYERS; l++) layer_share(me, l);
        barrier(me, ++epoch);
        if (me == 0 && p >= 0) times_free[p] = now() - t0;
    }
    return NULL;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void report(const char *name, double *t) {
    char label[64];
    snprintf(label, sizeof label, "%s%s%s", name,
             int8_layout ? "/int8" : packed_layout ? "/packed" : "/dense", chained ? "/chain" : "");
    name = label;
    qsort(t, passes, sizeof(double), cmp);
    double bytes = (double)LAYERS * DIM * DIM * (int8_layout ? 1 : 4);
    printf("weight_stream %-21s threads %2d: %.3f ms (min %.3f, max %.3f) = %.0f GB/s\n", name,
           nthreads, t[passes / 2] * 1e3, t[0] * 1e3, t[passes - 1] * 1e3,
           bytes / t[passes / 2] * 1e-9);
}

int main(int argc, char **argv) {
    nthreads = argc > 1 ? atoi(argv[1]) : 16;
    passes = argc > 2 ? atoi(argv[2]) : 41;
    packed_layout = argc > 3 && strstr(argv[3], "packed") != NULL;
    chained = argc > 3 && strstr(argv[3], "chain") != NULL;
    int8_layout = argc > 3 && strstr(argv[3], "int8") != NULL;
    for (int i = 0; i < DIM; i++) xbytes[i] = (signed char)(i % 255 - 127);
    if (nthreads < 1 || nthreads > 256 || passes < 1) return 1;
    size_t n = (size_t)LAYERS * DIM * DIM;
    weights = aligned_alloc(64, n * sizeof(float));
    for (size_t i = 0; i < n; i++) weights[i] = (float)(i % 7) * 0.01f;
    for (int i = 0; i < DIM; i++) xvec[i] = 1.0f;
    times_barrier = calloc(passes, sizeof(double));
    times_free = calloc(passes, sizeof(double));
    pthread_t th[256];
    for (long t = 0; t < nthreads; t++) pthread_create(&th[t], NULL, worker, (void *)t);
    for (int t = 0; t < nthreads; t++) pthread_join(th[t], NULL);
    report("barrier", times_barrier);
    report("free", times_free);
    return 0;
}
