// A whole decode step's transformer layers in one call (every sequence brings one new token).
//
// Same arithmetic as llama.py's Block with float32 activations: RMSNorm, fused qkv, RoPE (rotate-half,
// sin's first half negated), the new K/V written to the pool, attention over each sequence's context
// (softmax in float32, grouped-query heads), wo, residual, RMSNorm, fused gate/up, SiLU, w2, residual.
// Each (sequence, head) and each output element is computed in a fixed order whatever the batch, so a
// sequence's result does not depend on what it is batched with.
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "ls.h"

#define MAX_HEAD_DIM 512

static inline float dot_f32(const float *a, const float *b, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    float s = hsum8(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy_f32(float w, const float *v, float *out, int64_t n) {  // out += w * v
    const __m256 wv = _mm256_set1_ps(w);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(out + i)));
    for (; i < n; i++) out[i] += w * v[i];
}

// exp for 8 floats (Cephes' expf polynomial, about 1 ulp), x clamped to [-87.3, 88.3].
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static void rms_norm(const float *x, const float *w, float eps, int64_t B, int64_t dim, float *out) {
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * dim;
        float ss = 0.0f;
        for (int64_t i = 0; i < dim; i++) ss += xb[i] * xb[i];
        const float r = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) out[b * dim + i] = xb[i] * r * w[i];
    }
}

// Softmax-weighted sum over one sequence's context for one query head (keys and values in the pool).
static void attend(const float *q, const float *pool, const int64_t *slots, int64_t n, int64_t stride,
                   int64_t koff, int64_t voff, int64_t D, float scale, float *sc, float *out) {
    float mx = -INFINITY;
    for (int64_t t = 0; t < n; t++) {
        sc[t] = dot_f32(q, pool + slots[t] * stride + koff, D) * scale;
        mx = sc[t] > mx ? sc[t] : mx;
    }
    float sum = 0.0f;
    int64_t t = 0;
    for (; t + 8 <= n; t += 8)
        _mm256_storeu_ps(sc + t, exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + t), _mm256_set1_ps(mx))));
    for (; t < n; t++) sc[t] = expf(sc[t] - mx);
    for (t = 0; t < n; t++) sum += sc[t];
    for (int64_t i = 0; i < D; i++) out[i] = 0.0f;
    for (t = 0; t < n; t++) axpy_f32(sc[t] / sum, pool + slots[t] * stride + voff, out, D);
}

static void silu_mul(const float *h13, int64_t B, int64_t inter, float *act) {  // SiLU(gate) * up
    for (int64_t b = 0; b < B; b++) {
        const float *gate = h13 + b * 2 * inter, *up = gate + inter;
        float *a = act + b * inter;
        int64_t i = 0;
        for (; i + 8 <= inter; i += 8) {
            const __m256 g = _mm256_loadu_ps(gate + i);
            const __m256 sig = _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)));
            _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_div_ps(g, sig), _mm256_loadu_ps(up + i)));
        }
        for (; i < inter; i++) a[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}

enum { P_POOL, P_ATTN_NORM, P_FFN_NORM, P_WQKV, P_WO, P_W13, P_W2, PER_LAYER };

// cfg: layers, batch, dim, heads, kv heads, head dim, intermediate size, context columns (L). ptrs: per
// layer the PER_LAYER addresses above (the linears as ls_linear). Returns LS_OK, LS_ENOMEM or LS_EINVAL.
int ls_decode_layers(const int64_t *cfg, float eps, float *x, const float *cos, const float *sin,
                     const int64_t *slot, const int64_t *ctx_slots, const int64_t *ctx_lens,
                     const int64_t *ptrs) {
    const int64_t layers = cfg[0], B = cfg[1], dim = cfg[2], H = cfg[3], Hkv = cfg[4], D = cfg[5];
    const int64_t inter = cfg[6], Lctx = cfg[7];
    if (D < 2 || D > MAX_HEAD_DIM || D % 2 || Hkv < 1 || H % Hkv || B < 1 || Lctx < 1) return LS_EINVAL;
    const int64_t qkv_n = (H + 2 * Hkv) * D, group = H / Hkv, half = D / 2, stride = 2 * Hkv * D;
    const int64_t want[4][2] = {{dim, qkv_n}, {H * D, dim}, {dim, 2 * inter}, {inter, dim}};  // (k, n)
    for (int64_t l = 0; l < layers; l++)
        for (int i = 0; i < 4; i++) {
            const ls_linear *lin = (const ls_linear *)ptrs[l * PER_LAYER + P_WQKV + i];
            if (ls_linear_check(lin) || lin->k != want[i][0] || lin->n != want[i][1]) return LS_EINVAL;
        }
    for (int64_t b = 0; b < B; b++)
        if (ctx_lens[b] < 1 || ctx_lens[b] > Lctx) return LS_EINVAL;
    const float scale = 1.0f / sqrtf((float)D);
    const int threads = omp_get_max_threads();
    float *xn = malloc(sizeof(float) * (size_t)(B * dim));
    float *qkv = malloc(sizeof(float) * (size_t)(B * qkv_n));
    float *att = malloc(sizeof(float) * (size_t)(B * H * D));
    float *h13 = malloc(sizeof(float) * (size_t)(B * 2 * inter));
    float *act = malloc(sizeof(float) * (size_t)(B * inter));
    float *tmp = malloc(sizeof(float) * (size_t)(B * dim));
    float *scores = malloc(sizeof(float) * (size_t)(threads * Lctx));  // one row per OpenMP thread
    int rc = (xn && qkv && att && h13 && act && tmp && scores) ? LS_OK : LS_ENOMEM;
    for (int64_t l = 0; l < layers && rc == LS_OK; l++) {
        const int64_t *p = ptrs + l * PER_LAYER;
        float *pool = (float *)p[P_POOL];  // [slots, 2 Hkv, D]: keys, then values
        rms_norm(x, (const float *)p[P_ATTN_NORM], eps, B, dim, xn);
        if ((rc = ls_matmul((const ls_linear *)p[P_WQKV], xn, B, qkv))) break;
        for (int64_t b = 0; b < B; b++) {
            float *row = qkv + b * qkv_n;
            const float *c = cos + b * D, *s = sin + b * D;
            for (int64_t h = 0; h < H + Hkv; h++) {  // RoPE on the q and k heads
                float *v = row + h * D, r[MAX_HEAD_DIM];
                for (int64_t i = 0; i < D; i++) r[i] = v[i] * c[i] + v[(i + half) % D] * s[i];
                memcpy(v, r, sizeof(float) * (size_t)D);
            }
            memcpy(pool + slot[b] * stride, row + H * D, sizeof(float) * (size_t)stride);
        }
#pragma omp parallel for schedule(static) if (B * H * Lctx >= 4096)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t b = bh / H, h = bh % H, kvh = h / group;
            attend(qkv + b * qkv_n + h * D, pool, ctx_slots + b * Lctx, ctx_lens[b], stride, kvh * D,
                   (Hkv + kvh) * D, D, scale, scores + (int64_t)omp_get_thread_num() * Lctx,
                   att + b * H * D + h * D);
        }
        if ((rc = ls_matmul((const ls_linear *)p[P_WO], att, B, tmp))) break;
        for (int64_t i = 0; i < B * dim; i++) x[i] += tmp[i];
        rms_norm(x, (const float *)p[P_FFN_NORM], eps, B, dim, xn);
        if ((rc = ls_matmul((const ls_linear *)p[P_W13], xn, B, h13))) break;
        silu_mul(h13, B, inter, act);
        if ((rc = ls_matmul((const ls_linear *)p[P_W2], act, B, tmp))) break;
        for (int64_t i = 0; i < B * dim; i++) x[i] += tmp[i];
    }
    free(xn); free(qkv); free(att); free(h13); free(act); free(tmp); free(scores);
    return rc;
}
