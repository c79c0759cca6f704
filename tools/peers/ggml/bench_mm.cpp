// Benchmark ggml CPU mul_mat: W [ne0=K=1024, ne1=N=1024] x X [ne0=K, ne1=B] -> Y [N, B]
// Weight types: F32 (CPU buffer), Q4_0 (plain CPU buffer), Q4_0 in CPU_REPACK buffer (runtime repack).
// Usage: bench_mm [min_seconds_per_rep=1.0] [reps=5]
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

static double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

static const int K = 1024, N = 1024;

struct Case {
    const char * name;
    ggml_tensor * w;
};

// compute y = mul_mat(w, x) with batch B, return output + timing stats
struct Runner {
    ggml_backend_t backend;
    ggml_context * ctx = nullptr;
    ggml_cgraph * gf = nullptr;
    ggml_gallocr_t galloc = nullptr;
    ggml_tensor * y = nullptr;
    ggml_tensor * x = nullptr;

    Runner(ggml_backend_t be, ggml_tensor * w, int B, const std::vector<float> & xdata) : backend(be) {
        ggml_init_params p = { ggml_tensor_overhead() * 8 + ggml_graph_overhead(), nullptr, true };
        ctx = ggml_init(p);
        x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, B);
        y = ggml_mul_mat(ctx, w, x);
        gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, y);
        galloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(be));
        if (!ggml_gallocr_alloc_graph(galloc, gf)) { fprintf(stderr, "alloc graph failed\n"); exit(1); }
        ggml_backend_tensor_set(x, xdata.data(), 0, sizeof(float) * (size_t) K * B);
    }
    ~Runner() { ggml_gallocr_free(galloc); ggml_free(ctx); }
    void run() {
        if (ggml_backend_graph_compute(backend, gf) != GGML_STATUS_SUCCESS) { fprintf(stderr, "compute failed\n"); exit(1); }
    }
    std::vector<float> out() {
        std::vector<float> r(ggml_nelements(y));
        ggml_backend_tensor_get(y, r.data(), 0, ggml_nbytes(y));
        return r;
    }
};

static double rel_err(const std::vector<float> & a, const std::vector<double> & ref) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); i++) { double d = a[i] - ref[i]; num += d * d; den += ref[i] * ref[i]; }
    return std::sqrt(num / den);
}
static double rel_err_f(const std::vector<float> & a, const std::vector<float> & b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); i++) { double d = (double) a[i] - b[i]; num += d * d; den += (double) b[i] * b[i]; }
    return std::sqrt(num / den);
}

// reference: Y[b][n] = sum_k W[n][k] * X[b][k], in double
static std::vector<double> ref_mm(const std::vector<float> & W, const std::vector<float> & X, int B) {
    std::vector<double> Y((size_t) N * B);
    for (int b = 0; b < B; b++)
        for (int n = 0; n < N; n++) {
            double s = 0;
            const float * w = &W[(size_t) n * K];
            const float * xx = &X[(size_t) b * K];
            for (int k = 0; k < K; k++) s += (double) w[k] * xx[k];
            Y[(size_t) b * N + n] = s;
        }
    return Y;
}

int main(int argc, char ** argv) {
    double min_s = argc > 1 ? atof(argv[1]) : 1.0;
    int reps = argc > 2 ? atoi(argv[2]) : 5;
    std::string only = argc > 3 ? argv[3] : "";

    ggml_backend_t backend = ggml_backend_cpu_init();
    ggml_backend_reg_t reg = ggml_backend_cpu_reg();
    ggml_backend_dev_t dev = ggml_backend_reg_dev_get(reg, 0);
    printf("# device: %s | %s\n", ggml_backend_dev_name(dev), ggml_backend_dev_description(dev));
    printf("# cpu feats: avx2=%d fma=%d f16c=%d avx512=%d avx_vnni=%d\n", ggml_cpu_has_avx2(), ggml_cpu_has_fma(),
           ggml_cpu_has_f16c(), ggml_cpu_has_avx512(), ggml_cpu_has_avx_vnni());
    {
        auto get_feats = (ggml_backend_get_features_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_get_features");
        if (get_feats) {
            printf("# backend features:");
            for (auto f = get_feats(reg); f && f->name; f++) printf(" %s=%s", f->name, f->value);
            printf("\n");
        }
    }

    // find CPU_REPACK extra buffer type
    ggml_backend_buffer_type_t repack_buft = nullptr;
    auto get_extra = (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    if (get_extra) {
        for (auto b = get_extra(dev); b && *b; b++) {
            printf("# extra buft: %s\n", ggml_backend_buft_name(*b));
            if (strcmp(ggml_backend_buft_name(*b), "CPU_REPACK") == 0) repack_buft = *b;
        }
    }

    // random data
    std::mt19937 rng(12345);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> W((size_t) N * K), X1(K), XB((size_t) K * 1024);
    for (auto & v : W) v = nd(rng) * 0.05f;
    for (auto & v : X1) v = nd(rng);
    for (auto & v : XB) v = nd(rng);

    // quantize
    size_t q_row = ggml_row_size(GGML_TYPE_Q4_0, K);
    std::vector<uint8_t> Wq(q_row * N);
    ggml_quantize_chunk(GGML_TYPE_Q4_0, W.data(), Wq.data(), 0, N, K, nullptr);
    std::vector<float> Wdq((size_t) N * K);
    ggml_get_type_traits(GGML_TYPE_Q4_0)->to_float(Wq.data(), Wdq.data(), (int64_t) N * K);

    // weight tensors, one context per buffer type
    ggml_init_params p = { ggml_tensor_overhead() * 4, nullptr, true };
    ggml_context * ctx_cpu = ggml_init(p);
    ggml_tensor * w_f32 = ggml_new_tensor_2d(ctx_cpu, GGML_TYPE_F32, K, N);
    ggml_tensor * w_q4 = ggml_new_tensor_2d(ctx_cpu, GGML_TYPE_Q4_0, K, N);
    ggml_backend_buffer_t buf_cpu = ggml_backend_alloc_ctx_tensors_from_buft(ctx_cpu, ggml_backend_cpu_buffer_type());
    ggml_backend_tensor_set(w_f32, W.data(), 0, ggml_nbytes(w_f32));
    ggml_backend_tensor_set(w_q4, Wq.data(), 0, ggml_nbytes(w_q4));

    ggml_tensor * w_q4r = nullptr;
    ggml_context * ctx_rp = nullptr;
    if (repack_buft) {
        ctx_rp = ggml_init(p);
        w_q4r = ggml_new_tensor_2d(ctx_rp, GGML_TYPE_Q4_0, K, N);
        ggml_backend_buffer_t buf_rp = ggml_backend_alloc_ctx_tensors_from_buft(ctx_rp, repack_buft);
        if (!buf_rp) { fprintf(stderr, "repack alloc failed\n"); return 1; }
        ggml_backend_buffer_set_usage(buf_rp, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        ggml_backend_tensor_set(w_q4r, Wq.data(), 0, ggml_nbytes(w_q4r));  // triggers repack to q4_0x8 (AVX2)
        printf("# repack tensor: buffer=%s extra(tensor_traits)=%p\n", ggml_backend_buffer_name(w_q4r->buffer), w_q4r->extra);
    }

    // references
    std::vector<double> R1, RB, R1dq, RBdq;
    bool do_check = only.empty();
    if (do_check) { R1 = ref_mm(W, X1, 1); RB = ref_mm(W, XB, 1024); R1dq = ref_mm(Wdq, X1, 1); RBdq = ref_mm(Wdq, XB, 1024); }

    std::vector<Case> cases = { { "f32", w_f32 }, { "q4_0", w_q4 } };
    if (w_q4r) cases.push_back({ "q4_0_repack", w_q4r });

    // correctness (2 threads)
    ggml_backend_cpu_set_n_threads(backend, 2);
    printf("# correctness (rel L2 err vs double ref with f32 W | vs double ref with dequantized-Q4_0 W):\n");
    std::vector<float> outF[2];
    for (auto & c : cases) {
        for (int bi = 0; bi < 2 && do_check; bi++) {
            int B = bi == 0 ? 1 : 1024;
            Runner r(backend, c.w, B, bi == 0 ? X1 : XB);
            r.run();
            auto o = r.out();
            if (std::string(c.name) == "f32") outF[bi] = o;
            printf("#   %-12s B=%4d  err_vs_f32ref=%.5f  err_vs_dqref=%.5f  err_vs_ggml_f32=%.5f\n", c.name, B,
                   rel_err(o, bi == 0 ? R1 : RB), rel_err(o, bi == 0 ? R1dq : RBdq), rel_err_f(o, outF[bi]));
        }
    }

    // timing
    printf("# timing: warmup >=0.3s, then %d reps of >=%.2fs each\n", reps, min_s);
    printf("RESULT case threads batch median_us min_us max_us GFLOPs_median iters_per_rep\n");
    int thr_list[2] = { 1, 2 };
    for (int t : thr_list) {
        ggml_backend_cpu_set_n_threads(backend, t);
        for (auto & c : cases) {
            for (int bi = 0; bi < 2; bi++) {
                int B = bi == 0 ? 1 : 1024;
                std::string key = std::string(c.name) + "/" + std::to_string(t) + "/" + std::to_string(B);
                if (!only.empty() && key != only) continue;
                Runner r(backend, c.w, B, bi == 0 ? X1 : XB);
                // warmup and calibrate
                double t0 = now_s();
                long it = 0;
                while (now_s() - t0 < 0.3 || it < 3) { r.run(); it++; }
                double per = (now_s() - t0) / it;
                long iters = std::max<long>(3, (long) std::ceil(min_s / per));
                std::vector<double> us;
                for (int rep = 0; rep < reps; rep++) {
                    double a = now_s();
                    for (long i = 0; i < iters; i++) r.run();
                    double b = now_s();
                    us.push_back((b - a) / iters * 1e6);
                }
                std::vector<double> s = us;
                std::sort(s.begin(), s.end());
                double med = s[s.size() / 2];
                double gflops = 2.0 * K * N * B / (med * 1e-6) / 1e9;
                printf("RESULT %-12s %d %4d %10.2f %10.2f %10.2f %8.2f %ld   reps:", c.name, t, B, med, s.front(), s.back(), gflops, iters);
                for (double u : us) printf(" %.2f", u);
                { char la[64] = {0}; FILE * f = fopen("/proc/loadavg", "r"); if (f) { if (!fgets(la, sizeof la, f)) la[0] = 0; fclose(f); }
                  la[strcspn(la, "\n")] = 0; printf("   loadavg: %s", la); }
                printf("\n");
                fflush(stdout);
            }
        }
    }
    ggml_backend_free(backend);
    return 0;
}
