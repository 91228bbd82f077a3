// Weight-only quantized matmuls for x86-64 CPUs with AVX2, FMA and F16C: y[M, N] = x[M, K] @ W[N, K]^T.
//
// The activations are quantized to int8 in blocks of 32 (one float scale per block, as GGML's Q8_1),
// so every block product is an integer dot product (vpmaddubsw); each block's result is scaled in
// float32. Weights are stored in groups of 8 rows, interleaved 4 values at a time, so that one 32-byte
// vector holds 4 consecutive values of 8 rows: multiplied by the same 4 activations (broadcast), each
// 32-bit lane sums one row. A block of 32 values of 8 rows is then 8 such products, and 8 rows' results
// come out in one vector with no horizontal sums. Two weight formats (see native.py's packers):
//   q4: per (group, block) 128 bytes; byte [c][r][e] holds row r's value 4c + e in its low nibble and
//       value 4 (c + 4) + e in its high nibble (c < 4); values 0..15 and w = d * q + m with float16 d, m
//       per row and block (GGUF Q4_1; for Q4_0, m = -8 d and m is passed as NULL);
//   q8: per (group, block) 256 bytes, [c][r][e] = row r's value 4c + e (c < 8), int8 in -127..127, and
//       w = d * q with a float16 d per row and block (GGUF Q8_0).
// Groups of rows are split between the OpenMP threads; libgomp is the one torch has loaded, so both
// share one thread pool. Built and loaded by llamaserve/model/native.py.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QK 32
#define MTILE 4     // activation rows that share one pass over a weight row's blocks
#define MCHUNK 128  // activation rows per pass over all weights (keeps them in L2 for long prompts)

static inline int hsum8i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

// One block of 32 floats -> 32 int8 values, its scale d and d * sum(q).
static inline void quantize_block(const float *x, int8_t *q, float *d, float *s) {
    __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8);
    __m256 v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                              _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float scale = amax / 127.0f;
    const __m256 inv = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
    __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, inv), _MM_FROUND_TO_NEAREST_INT));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, inv), _MM_FROUND_TO_NEAREST_INT));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, inv), _MM_FROUND_TO_NEAREST_INT));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, inv), _MM_FROUND_TO_NEAREST_INT));
    const int sum = hsum8i(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
    i0 = _mm256_packs_epi32(i0, i1);  // int16, lanes interleaved
    i2 = _mm256_packs_epi32(i2, i3);
    i0 = _mm256_packs_epi16(i0, i2);  // int8, 32-bit groups in order 0 4 1 5 2 6 3 7
    i0 = _mm256_permutevar8x32_epi32(i0, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)q, i0);
    *d = scale;
    *s = scale * (float)sum;
}

// Quantizes x [M, K] (K a multiple of 32) into q [M, K], d and s [M, K / 32].
static void quantize_rows(const float *x, int64_t M, int64_t K, int8_t *q, float *d, float *s) {
    const int64_t blocks = M * (K / QK);
#pragma omp parallel for schedule(static) if (blocks >= 2048)
    for (int64_t b = 0; b < blocks; b++) quantize_block(x + b * QK, q + b * QK, d + b, s + b);
}

#define AI static inline __attribute__((always_inline))
static inline __m256i bcast4(const int8_t *p) {  // 4 int8 activations to all 8 lanes
    int32_t v;
    memcpy(&v, p, sizeof v);  // (no aliasing of int8 memory through an int32 pointer)
    return _mm256_set1_epi32(v);
}
#define BCAST4(p) bcast4(p)

// 8 rows (one group) x MT activation rows: y[j][r] for r < 8.
AI void q4_group(const uint8_t *w, const uint16_t *wd, const uint16_t *wm, int64_t nb, const int8_t *aq,
                 const float *ad, const float *as, int64_t K, int MT, float *y, int64_t ldy) {
    const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0f);
    __m256 acc[MTILE], accm[MTILE];
    for (int j = 0; j < MTILE; j++) acc[j] = accm[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * 128;
        __m256i wv[8];
        for (int c = 0; c < 4; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(wb + 32 * c));
            wv[c] = _mm256_and_si256(v, low);
            wv[c + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        }
        const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + 8 * b)));
        const __m256 m8 = wm ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wm + 8 * b)))
                             : _mm256_mul_ps(d8, _mm256_set1_ps(-8.0f));  // Q4_0: m = -8 d, not stored
        for (int j = 0; j < MT; j++) {
            const int8_t *a = aq + j * K + b * QK;
            // Per 16-bit lane at most 8 chunks x 2 x 15 x 127 = 30480: no overflow before the widening.
            __m256i s = _mm256_maddubs_epi16(wv[0], BCAST4(a));
            for (int c = 1; c < 8; c++) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(wv[c], BCAST4(a + 4 * c)));
            const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(s, ones));
            acc[j] = _mm256_fmadd_ps(_mm256_mul_ps(d8, _mm256_set1_ps(ad[j * (K / QK) + b])), f, acc[j]);
            accm[j] = _mm256_fmadd_ps(m8, _mm256_set1_ps(as[j * (K / QK) + b]), accm[j]);
        }
    }
    for (int j = 0; j < MT; j++) _mm256_storeu_ps(y + j * ldy, _mm256_add_ps(acc[j], accm[j]));
}

AI void q8_group(const int8_t *w, const uint16_t *wd, int64_t nb, const int8_t *aq, const float *ad,
                 int64_t K, int MT, float *y, int64_t ldy) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[MTILE];
    for (int j = 0; j < MTILE; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *wb = w + b * 256;
        const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + 8 * b)));
        __m256i s[MTILE];
        for (int j = 0; j < MT; j++) s[j] = _mm256_setzero_si256();
        for (int c = 0; c < 8; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(wb + 32 * c));
            const __m256i av = _mm256_sign_epi8(v, v);  // |w|; the sign moves onto the activations
            for (int j = 0; j < MT; j++) {
                // A pair sums to at most 2 x 127 x 127 = 32258: widen after each chunk.
                const __m256i p = _mm256_maddubs_epi16(av, _mm256_sign_epi8(BCAST4(aq + j * K + b * QK + 4 * c), v));
                s[j] = _mm256_add_epi32(s[j], _mm256_madd_epi16(p, ones));
            }
        }
        for (int j = 0; j < MT; j++)
            acc[j] = _mm256_fmadd_ps(_mm256_mul_ps(d8, _mm256_set1_ps(ad[j * (K / QK) + b])),
                                     _mm256_cvtepi32_ps(s[j]), acc[j]);
    }
    for (int j = 0; j < MT; j++) _mm256_storeu_ps(y + j * ldy, acc[j]);
}

// Returns 0, or -1 when the scratch memory could not be allocated (y is then untouched). N % 8 == 0.
static int linear(int is_q4, const float *x, int64_t M, int64_t K, const void *wq, const uint16_t *wd,
                  const uint16_t *wm, int64_t N, float *y) {
    const int64_t nb = K / QK, groups = N / 8;
    int8_t *aq = malloc((size_t)(M * K));
    float *ad = malloc(sizeof(float) * (size_t)(M * nb)), *as = malloc(sizeof(float) * (size_t)(M * nb));
    if (!aq || !ad || !as) { free(aq); free(ad); free(as); return -1; }
    quantize_rows(x, M, K, aq, ad, as);
    for (int64_t c0 = 0; c0 < M; c0 += MCHUNK) {
        const int64_t c1 = c0 + MCHUNK < M ? c0 + MCHUNK : M;
#pragma omp parallel for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            for (int64_t m0 = c0; m0 < c1; m0 += MTILE) {
                const int64_t mt = c1 - m0 < MTILE ? c1 - m0 : MTILE;
                // A constant row count per call, so that the accumulators stay in registers.
#define GROUP(MT)                                                                                      \
    if (is_q4)                                                                                         \
        q4_group((const uint8_t *)wq + g * nb * 128, wd + g * nb * 8, wm ? wm + g * nb * 8 : NULL, nb,    \
                 aq + m0 * K, ad + m0 * nb, as + m0 * nb, K, MT, y + m0 * N + 8 * g, N);              \
    else                                                                                               \
        q8_group((const int8_t *)wq + g * nb * 256, wd + g * nb * 8, nb, aq + m0 * K, ad + m0 * nb, K, \
                 MT, y + m0 * N + 8 * g, N);                                                           \
    break;
                switch (mt) {
                    case 4: GROUP(4)
                    case 3: GROUP(3)
                    case 2: GROUP(2)
                    default: GROUP(1)
                }
#undef GROUP
            }
        }
    }
    free(aq); free(ad); free(as);
    return 0;
}

int ls_q4_linear(const float *x, int64_t M, int64_t K, const uint8_t *qs, const uint16_t *d,
                 const uint16_t *m, int64_t N, float *y) {
    return linear(1, x, M, K, qs, d, m, N, y);
}

int ls_q8_linear(const float *x, int64_t M, int64_t K, const int8_t *q, const uint16_t *d, int64_t N,
                 float *y) {
    return linear(0, x, M, K, q, d, NULL, N, y);
}

// ---- A whole decode step's transformer layers in one call (every sequence brings one new token) ----
//
// Same arithmetic as llama.py's Block with float32 activations: RMSNorm, fused qkv, RoPE (rotate-half,
// sin's first half negated), the new K/V written to the pool, attention over each sequence's context
// (softmax in float32, grouped-query heads), wo, residual, RMSNorm, fused gate/up, SiLU, w2, residual.
// Each (sequence, head) and each output element is computed in a fixed order whatever the batch, so a
// sequence's result does not depend on what it is batched with.

#include <math.h>
#include <omp.h>
#include <string.h>

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

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

enum { P_POOL, P_ATTN_NORM, P_FFN_NORM, P_LINEARS };  // per layer: then 4 x (kind, q, d, m)
#define PER_LAYER (P_LINEARS + 4 * 4)

static int run_linear(const int64_t *lin, const float *x, int64_t M, int64_t K, int64_t N, float *y) {
    return linear((int)lin[0], x, M, K, (const void *)lin[1], (const uint16_t *)lin[2],
                  (const uint16_t *)lin[3], N, y);
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

// cfg: layers, batch, dim, heads, kv heads, head dim, intermediate size, context columns (L).
int ls_decode_layers(const int64_t *cfg, float eps, float *x, const float *cos, const float *sin,
                     const int64_t *slot, const int64_t *ctx_slots, const int64_t *ctx_lens,
                     const int64_t *ptrs) {
    const int64_t layers = cfg[0], B = cfg[1], dim = cfg[2], H = cfg[3], Hkv = cfg[4], D = cfg[5];
    const int64_t inter = cfg[6], Lctx = cfg[7];
    const int64_t qkv_n = (H + 2 * Hkv) * D, group = H / Hkv, half = D / 2;
    const float scale = 1.0f / sqrtf((float)D);
    const int threads = omp_get_max_threads();
    float *xn = malloc(sizeof(float) * (size_t)(B * dim));
    float *qkv = malloc(sizeof(float) * (size_t)(B * qkv_n));
    float *att = malloc(sizeof(float) * (size_t)(B * H * D));
    float *h13 = malloc(sizeof(float) * (size_t)(B * 2 * inter));
    float *act = malloc(sizeof(float) * (size_t)(B * inter));
    float *tmp = malloc(sizeof(float) * (size_t)(B * dim));
    float *scores = malloc(sizeof(float) * (size_t)(threads * (Lctx > 0 ? Lctx : 1)));
    int rc = (xn && qkv && att && h13 && act && tmp && scores) ? 0 : -1;
    for (int64_t l = 0; l < layers && rc == 0; l++) {
        const int64_t *p = ptrs + l * PER_LAYER;
        float *pool = (float *)p[P_POOL];  // [slots, 2 Hkv, D]: keys, then values
        rms_norm(x, (const float *)p[P_ATTN_NORM], eps, B, dim, xn);
        if ((rc = run_linear(p + P_LINEARS, xn, B, dim, qkv_n, qkv))) break;
        for (int64_t b = 0; b < B; b++) {
            float *row = qkv + b * qkv_n;
            const float *c = cos + b * D, *s = sin + b * D;
            for (int64_t h = 0; h < H + Hkv; h++) {  // RoPE on the q and k heads
                float *v = row + h * D, r[512];
                for (int64_t i = 0; i < D; i++) r[i] = v[i] * c[i] + v[(i + half) % D] * s[i];
                memcpy(v, r, sizeof(float) * (size_t)D);
            }
            memcpy(pool + slot[b] * 2 * Hkv * D, row + H * D, sizeof(float) * (size_t)(2 * Hkv * D));
        }
#pragma omp parallel for schedule(static) if (B * H * Lctx >= 4096)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t b = bh / H, h = bh % H, kvh = h / group, n = ctx_lens[b];
            const float *q = qkv + b * qkv_n + h * D;
            float *sc = scores + (int64_t)omp_get_thread_num() * Lctx, *out = att + b * H * D + h * D;
            float mx = -INFINITY;
            for (int64_t t = 0; t < n; t++) {
                const float *k = pool + ctx_slots[b * Lctx + t] * 2 * Hkv * D + kvh * D;
                sc[t] = dot_f32(q, k, D) * scale;
                mx = sc[t] > mx ? sc[t] : mx;
            }
            float sum = 0.0f;
            int64_t t = 0;
            for (; t + 8 <= n; t += 8)
                _mm256_storeu_ps(sc + t, exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + t), _mm256_set1_ps(mx))));
            for (; t < n; t++) sc[t] = expf(sc[t] - mx);
            for (t = 0; t < n; t++) sum += sc[t];
            for (int64_t i = 0; i < D; i++) out[i] = 0.0f;
            for (int64_t t = 0; t < n; t++) {
                const float *v = pool + ctx_slots[b * Lctx + t] * 2 * Hkv * D + (Hkv + kvh) * D;
                const float w = sc[t] / sum;
                axpy_f32(w, v, out, D);
            }
        }
        if ((rc = run_linear(p + P_LINEARS + 4, att, B, H * D, dim, tmp))) break;
        for (int64_t i = 0; i < B * dim; i++) x[i] += tmp[i];
        rms_norm(x, (const float *)p[P_FFN_NORM], eps, B, dim, xn);
        if ((rc = run_linear(p + P_LINEARS + 8, xn, B, dim, 2 * inter, h13))) break;
        for (int64_t b = 0; b < B; b++) {  // SiLU(gate) * up
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
        if ((rc = run_linear(p + P_LINEARS + 12, act, B, inter, dim, tmp))) break;
        for (int64_t i = 0; i < B * dim; i++) x[i] += tmp[i];
    }
    free(xn); free(qkv); free(att); free(h13); free(act); free(tmp); free(scores);
    return rc;
}
