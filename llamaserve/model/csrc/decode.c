// A whole decode step's transformer layers in one call (every sequence brings one new token).
//
// Same arithmetic as llama.py's Block with float32 activations: RMSNorm, fused qkv, RoPE (rotate-half,
// sin's first half negated), the new K/V stored in the pool's dtype and attention over each sequence's
// context (attention.c, shared with prefill), wo, residual, RMSNorm, fused gate/up, SiLU, w2, residual.
// Each output element is computed in a fixed order whatever the batch, so a sequence's result does not
// depend on what it is batched with.
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "ls.h"

#define MAX_HEAD_DIM 512

// Rows of the per-row steps below (norms, RoPE, SiLU, residuals) run on all threads from this batch on;
// each row's arithmetic is the same either way.
#ifndef PAR_ROWS
#define PAR_ROWS 4
#endif

static void rms_norm(const float *x, const float *w, float eps, int64_t B, int64_t dim, float *out) {
#pragma omp parallel for schedule(static) if (B >= PAR_ROWS)
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * dim;
        float ss = 0.0f;
        for (int64_t i = 0; i < dim; i++) ss += xb[i] * xb[i];
        const float r = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) out[b * dim + i] = xb[i] * r * w[i];
    }
}

static void silu_mul(const float *h13, int64_t B, int64_t inter, float *act) {  // SiLU(gate) * up
#pragma omp parallel for schedule(static) if (B >= PAR_ROWS)
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

// RoPE of one head in place: v[i] cos[i] + v[(i + D/2) mod D] sin[i] (rotate-half; sin's first half is
// negated by the caller), as two products and a sum like torch's x * cos + rotate_half(x) * sin.
static void rope(float *v, const float *c, const float *s, int64_t D, int64_t half) {
    float r[MAX_HEAD_DIM];
    int64_t i = 0;
    if (half % 8 == 0)
        for (; i < D; i += 8) {
            const int64_t j = i < half ? i + half : i - half;
            const __m256 a = _mm256_mul_ps(_mm256_loadu_ps(v + i), _mm256_loadu_ps(c + i));
            const __m256 b = _mm256_mul_ps(_mm256_loadu_ps(v + j), _mm256_loadu_ps(s + i));
            _mm256_storeu_ps(r + i, _mm256_add_ps(a, b));
        }
    for (; i < D; i++) {
        const float a = v[i] * c[i], b = v[i < half ? i + half : i - half] * s[i];
        r[i] = a + b;
    }
    memcpy(v, r, sizeof(float) * (size_t)D);
}

enum { P_KV, P_ATTN_NORM, P_FFN_NORM, P_WQKV, P_WO, P_W13, P_W2, PER_LAYER };

static void add_rows(float *x, const float *y, int64_t B, int64_t dim) {  // x += y, row by row
#pragma omp parallel for schedule(static) if (B >= PAR_ROWS)
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = b * dim; i < (b + 1) * dim; i++) x[i] += y[i];
}

// cfg: layers, batch, dim, heads, kv heads, head dim, intermediate size, context columns (L), and the
// address of the final norm's weight (float32 [dim]; 0: x is returned before it). ptrs: per layer the
// PER_LAYER addresses above (the pool as ls_kv, the linears as ls_linear). Returns LS_OK, LS_ENOMEM or
// LS_EINVAL.
int ls_decode_layers(const int64_t *cfg, float eps, float *x, const float *cos, const float *sin,
                     const int64_t *slot, const int64_t *ctx_slots, const int64_t *ctx_lens,
                     const int64_t *ptrs) {
    const int64_t layers = cfg[0], B = cfg[1], dim = cfg[2], H = cfg[3], Hkv = cfg[4], D = cfg[5];
    const int64_t inter = cfg[6], Lctx = cfg[7];
    const float *final_norm = (const float *)cfg[8];
    if (D < 2 || D > MAX_HEAD_DIM || D % 2 || Hkv < 1 || H % Hkv || B < 1 || Lctx < 1) return LS_EINVAL;
    const int64_t qkv_n = (H + 2 * Hkv) * D, half = D / 2;
    const int64_t want[4][2] = {{dim, qkv_n}, {H * D, dim}, {dim, 2 * inter}, {inter, dim}};  // (k, n)
    for (int64_t l = 0; l < layers; l++) {
        const ls_kv *kv = (const ls_kv *)ptrs[l * PER_LAYER + P_KV];
        if (ls_kv_check(kv) || kv->heads != 2 * Hkv || kv->dim != D) return LS_EINVAL;
        for (int i = 0; i < 4; i++) {
            const ls_linear *lin = (const ls_linear *)ptrs[l * PER_LAYER + P_WQKV + i];
            if (ls_linear_check(lin) || lin->k != want[i][0] || lin->n != want[i][1]) return LS_EINVAL;
        }
    }
    for (int64_t b = 0; b < B; b++)
        if (ctx_lens[b] < 1 || ctx_lens[b] > Lctx) return LS_EINVAL;
    float *xn = malloc(sizeof(float) * (size_t)(B * dim));
    float *qkv = malloc(sizeof(float) * (size_t)(B * qkv_n));
    float *att = malloc(sizeof(float) * (size_t)(B * H * D));
    float *h13 = malloc(sizeof(float) * (size_t)(B * 2 * inter));
    float *act = malloc(sizeof(float) * (size_t)(B * inter));
    float *tmp = malloc(sizeof(float) * (size_t)(B * dim));
    int64_t *ones = malloc(sizeof(int64_t) * (size_t)B);  // every sequence brings one query
    int rc = (xn && qkv && att && h13 && act && tmp && ones) ? LS_OK : LS_ENOMEM;
    for (int64_t b = 0; rc == LS_OK && b < B; b++) ones[b] = 1;
    for (int64_t l = 0; l < layers && rc == LS_OK; l++) {
        const int64_t *p = ptrs + l * PER_LAYER;
        const ls_kv *kv = (const ls_kv *)p[P_KV];
        rms_norm(x, (const float *)p[P_ATTN_NORM], eps, B, dim, xn);
        if ((rc = ls_matmul((const ls_linear *)p[P_WQKV], xn, B, qkv))) break;
#pragma omp parallel for schedule(static) if (B >= PAR_ROWS)
        for (int64_t b = 0; b < B; b++) {
            float *row = qkv + b * qkv_n;
            const float *c = cos + b * D, *s = sin + b * D;
            for (int64_t h = 0; h < H + Hkv; h++) rope(row + h * D, c, s, D, half);  // q and k heads
        }
        if ((rc = ls_kv_store(kv, qkv + H * D, qkv_n, slot, B))) break;
        if ((rc = ls_attention(kv, qkv, qkv_n, H, B, ones, ctx_slots, Lctx, ctx_lens, att, H * D))) break;
        if ((rc = ls_matmul((const ls_linear *)p[P_WO], att, B, tmp))) break;
        add_rows(x, tmp, B, dim);
        rms_norm(x, (const float *)p[P_FFN_NORM], eps, B, dim, xn);
        if ((rc = ls_matmul((const ls_linear *)p[P_W13], xn, B, h13))) break;
        silu_mul(h13, B, inter, act);
        if ((rc = ls_matmul((const ls_linear *)p[P_W2], act, B, tmp))) break;
        add_rows(x, tmp, B, dim);
    }
    if (rc == LS_OK && final_norm) rms_norm(x, final_norm, eps, B, dim, x);  // (in place: a row is read first)
    free(xn); free(qkv); free(att); free(h13); free(act); free(tmp); free(ones);
    return rc;
}
