/* Fused MiniLMv2 relation kernels (CPU): one (seq, seq) relation matrix at a time,
 * one row at a time, so the scores, the softmax and the gradient of a row never leave L1.
 *
 * A relation matrix m is given by its X transposed, xt (d, L) row-major: the relation
 * logits of query r are s_k = bias_k + scale * sum_c xt[c][r] * xt[c][k]. Built at
 * run time by kernels/__init__.py (gcc -O3 -ffast-math: vectorised expf from libmvec);
 * called through ctypes with the GIL released, one call per range of matrices.
 *
 * The Python side (losses.py) keeps the eager PyTorch path; tests check both agree. */

#include <math.h>
#include <stddef.h>
#include <string.h>
#if defined(__SSE__)
#include <xmmintrin.h>
/* Denormals flushed to zero inside a call only (tiny probabilities would otherwise take
 * slow microcode paths); the caller's floating-point mode is restored on return. */
#define FTZ_BEGIN unsigned int saved_csr = _mm_getcsr(); _mm_setcsr(saved_csr | 0x8040);
#define FTZ_END _mm_setcsr(saved_csr);
#else
#define FTZ_BEGIN
#define FTZ_END
#endif

/* exp(x) for x <= 0 (softmax rows: s - max): 2^(x log2 e) split into 2^i * 2^f, f in
 * [-0.5, 0.5], 2^f by its Taylor polynomial to degree 6 (relative error < 2e-7, about
 * one float ulp). Inline, so the row loops vectorise; exactly 0 below -87 (padded keys). */
static inline float exp_neg(float x) {
    const float t = x * 1.44269504088896341f;
    const float fi = floorf(t + 0.5f);
    const float f = (t - fi) * 0.693147180559945309f;
    float p = 1.f / 720.f;
    p = p * f + 1.f / 120.f;
    p = p * f + 1.f / 24.f;
    p = p * f + 1.f / 6.f;
    p = p * f + 0.5f;
    p = p * f + 1.f;
    p = p * f + 1.f;
    const int i = (int)(fi < -126.f ? -126.f : fi);
    union { unsigned u; float f; } two_i = {.u = (unsigned)(i + 127) << 23};
    return x < -87.f ? 0.f : p * two_i.f;
}

/* s[0..L) = bias + scale * X X^T row r; returns max_k s_k. */
static inline __attribute__((always_inline)) float scores_row(
    const float *restrict xt, const float *restrict bias, int L, int d, int r, float scale,
    float *restrict s) {
    float a[d];
    for (int c = 0; c < d; c++) a[c] = xt[(size_t)c * L + r] * scale;
    for (int k = 0; k < L; k++) {
        float acc = bias[k];
        for (int c = 0; c < d; c++) acc += a[c] * xt[(size_t)c * L + k];
        s[k] = acc;
    }
    float mx = s[0];
    for (int k = 1; k < L; k++) mx = fmaxf(mx, s[k]);
    return mx;
}

/* e = exp(s - mx); returns sum e. */
static inline __attribute__((always_inline)) float exp_row(
    const float *restrict s, float mx, int L, float *restrict e) {
    float sum = 0.f;
    for (int k = 0; k < L; k++) {
        e[k] = exp_neg(s[k] - mx);
        sum += e[k];
    }
    return sum;
}

/* Teacher side: probs (n, L, L) = softmax rows, neg_entropy (n, L) = sum_k p log p. */
static inline __attribute__((always_inline)) void target_d(
    const float *xt, const float *bias, int n, int L, int d, float scale, float *probs,
    float *neg_entropy) {
    float s[L];
    for (int m = 0; m < n; m++) {
        const float *xm = xt + (size_t)m * d * L, *bm = bias + (size_t)m * L;
        for (int r = 0; r < L; r++) {
            float *restrict p = probs + ((size_t)m * L + r) * L;
            const float mx = scores_row(xm, bm, L, d, r, scale, s);
            const float sum = exp_row(s, mx, L, p);
            const float inv = 1.f / sum;
            float h = 0.f; /* log p = s - mx - log sum, relative to the max: exact
                              on rows of only padded keys too */
            for (int k = 0; k < L; k++) {
                p[k] *= inv;
                h += p[k] * (s[k] - mx);
            }
            neg_entropy[(size_t)m * L + r] = h - logf(sum);
        }
    }
}

/* Student side: for each matrix m, cross[m] = sum_r w_r sum_k p_rk log q_rk with
 * q = softmax(s); when dxt is not NULL, dxt (n, d, L) = d cross' / d xt / scale where
 * cross' = -cross (the gradient of the KL's cross term: (q - p) w, through s = X X^T).
 * Rows with w_r == 0 (padded queries) are skipped: they count nowhere. */
static inline __attribute__((always_inline)) void kl_d(
    const float *xt, const float *bias, const float *weights, const float *target, int n,
    int L, int d, float scale, float *dxt, double *cross) {
    float s[L], e[L];
    for (int m = 0; m < n; m++) {
        const float *xm = xt + (size_t)m * d * L, *bm = bias + (size_t)m * L;
        const float *wm = weights + (size_t)m * L;
        float *dm = dxt ? dxt + (size_t)m * d * L : NULL;
        if (dm) memset(dm, 0, sizeof(float) * (size_t)d * L);
        double total = 0.0;
        for (int r = 0; r < L; r++) {
            const float w = wm[r];
            if (w == 0.f) continue;
            const float *restrict p = target + ((size_t)m * L + r) * L;
            const float mx = scores_row(xm, bm, L, d, r, scale, s);
            const float sum = exp_row(s, mx, L, e);
            const float inv = 1.f / sum;
            float c = 0.f, mass = 0.f; /* sum_k p log q = sum_k p (s - mx) - log sum */
            for (int k = 0; k < L; k++) {
                c += p[k] * (s[k] - mx);
                mass += p[k];
                e[k] = (e[k] * inv - p[k]) * w; /* the row's gradient wrt s */
            }
            total += (double)w * (c - logf(sum) * mass);
            if (!dm) continue;
            for (int j = 0; j < d; j++) {
                const float *restrict xrow = xm + (size_t)j * L;
                float *restrict drow = dm + (size_t)j * L;
                const float xr = xrow[r];
                float acc = 0.f;
                for (int k = 0; k < L; k++) {
                    drow[k] += e[k] * xr;  /* s_rk through x_k */
                    acc += e[k] * xrow[k]; /* s_rk through x_r */
                }
                drow[r] += acc;
            }
        }
        cross[m] = total;
    }
}

/* The relation head width d is a compile-time constant in the common cases (384 or 768
 * wide, R = 48), so the loops over it unroll and a score's sum stays in a register. Wider
 * heads are left to the PyTorch path (kernels.MAX_WIDTH). */
#define DISPATCH(call, d)            \
    switch (d) {                     \
    case 8: call(8); break;          \
    case 16: call(16); break;        \
    default: call(d); break;         \
    }

void relation_target(const float *xt, const float *bias, int n, int L, int d, float scale,
                     float *probs, float *neg_entropy) {
#define TARGET(D) target_d(xt, bias, n, L, D, scale, probs, neg_entropy)
    FTZ_BEGIN
    DISPATCH(TARGET, d)
    FTZ_END
#undef TARGET
}

void relation_kl(const float *xt, const float *bias, const float *weights,
                 const float *target, int n, int L, int d, float scale, float *dxt,
                 double *cross) {
#define KL(D) kl_d(xt, bias, weights, target, n, L, D, scale, dxt, cross)
    FTZ_BEGIN
    DISPATCH(KL, d)
    FTZ_END
#undef KL
}
