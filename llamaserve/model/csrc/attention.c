// Attention over the paged KV pool, reading keys and values in the pool's own dtype (float32, bfloat16,
// float16 or int8 with a scale per token and head): no float32 copy of a context is ever made.
//
// Queries are float32 rows, one per new token, sequence after sequence; row j of a sequence whose step
// brings q_len tokens to a context of ctx_len sits at position ctx_len - q_len + j and sees context columns
// 0 .. that position (causal). Work is split into (sequence, head, tile of up to QTILE rows); a tile reads
// each key and value once for all its rows. A row's arithmetic (the order of every sum) depends on its own
// context only, never on the tile, the batch or the thread: results are batch invariant, and a decode
// step (one row) computes exactly what a prefill row at the same position computes.
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "ls.h"

#define QTILE 8
#define MAX_DIM 512

int ls_kv_check(const ls_kv *kv) {
    if (!kv || kv->dtype < 0 || kv->dtype >= LS_KV_NUM_DTYPES || kv->slots < 1 || kv->heads < 2 ||
        kv->heads % 2 || kv->dim < 8 || kv->dim > MAX_DIM || kv->dim % 8 || !kv->data)
        return LS_EINVAL;
    if ((kv->dtype == LS_KV_I8) != (kv->scale != NULL)) return LS_EINVAL;
    return LS_OK;
}

// 8 stored values at p (element offset i) as float32.
AI __m256 load8(int64_t dtype, const void *p, int64_t i) {
    switch (dtype) {
    case LS_KV_BF16:
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))), 16));
    case LS_KV_F16:
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    case LS_KV_I8:
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)p + i))));
    default:
        return _mm256_loadu_ps((const float *)p + i);
    }
}

AI const void *row_at(const ls_kv *kv, int64_t slot, int64_t head) {
    static const int64_t size[LS_KV_NUM_DTYPES] = {4, 2, 2, 1};
    return (const char *)kv->data + (slot * kv->heads + head) * kv->dim * size[kv->dtype];
}

AI float row_scale(const ls_kv *kv, int64_t slot, int64_t head) {
    return kv->scale ? kv->scale[slot * kv->heads + head] : 1.0f;
}

// q . row, a fixed summation order for every D.
AI float dot_row(int64_t dtype, const float *q, const void *row, int64_t D) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= D; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(dtype, row, i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), load8(dtype, row, i + 8), acc1);
    }
    if (i < D) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(dtype, row, i), acc0);
    return hsum8(_mm256_add_ps(acc0, acc1));
}

AI void axpy_row(int64_t dtype, float w, const void *row, float *out, int64_t D) {  // out += w * row
    const __m256 wv = _mm256_set1_ps(w);
    for (int64_t i = 0; i < D; i += 8)
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(wv, load8(dtype, row, i), _mm256_loadu_ps(out + i)));
}

static inline uint16_t to_bf16(float f) {  // round to nearest even, as torch's float -> bfloat16
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// src: T rows of `heads x dim` float32 values, `src_stride` floats apart; row t goes to slot[t].
int ls_kv_store(const ls_kv *kv, const float *src, int64_t src_stride, const int64_t *slot, int64_t T) {
    if (ls_kv_check(kv) || T < 0 || src_stride < kv->heads * kv->dim) return LS_EINVAL;
    for (int64_t t = 0; t < T; t++)
        if (slot[t] < 0 || slot[t] >= kv->slots) return LS_EINVAL;
    const int64_t D = kv->dim;
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < kv->heads; h++) {
            const float *x = src + t * src_stride + h * D;
            void *dst = (void *)row_at(kv, slot[t], h);
            switch (kv->dtype) {
            case LS_KV_BF16:
                for (int64_t i = 0; i < D; i++) ((uint16_t *)dst)[i] = to_bf16(x[i]);
                break;
            case LS_KV_F16:
                for (int64_t i = 0; i < D; i += 8)
                    _mm_storeu_si128((__m128i *)((uint16_t *)dst + i),
                                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
                break;
            case LS_KV_I8: {  // a scale per token and head: amax / 127; values rounded half to even
                float amax = 0.0f;
                for (int64_t i = 0; i < D; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
                const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
                for (int64_t i = 0; i < D; i++) {
                    float v = nearbyintf(x[i] * inv);
                    v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
                    ((int8_t *)dst)[i] = (int8_t)v;
                }
                kv->scale[slot[t] * kv->heads + h] = amax / 127.0f;
                break;
            }
            default:
                memcpy(dst, x, sizeof(float) * (size_t)D);
            }
        }
    return LS_OK;
}

// One tile: rows q[0..nq-1] (row i sees columns 0 .. n0 + i - 1) of one head against kv head `kvh`.
static void attend_tile(const ls_kv *kv, const float *const *q, float *const *out, int nq, int64_t n0,
                        const int64_t *slots, int64_t kvh, float scale, float *sc, int64_t L) {
    const int64_t D = kv->dim, dt = kv->dtype, vh = kv->heads / 2 + kvh, nmax = n0 + nq - 1;
    for (int64_t t = 0; t < nmax; t++) {
        const void *k = row_at(kv, slots[t], kvh);
        const float ks = row_scale(kv, slots[t], kvh) * scale;
        for (int i = t < n0 ? 0 : (int)(t - n0 + 1); i < nq; i++) sc[i * L + t] = dot_row(dt, q[i], k, D) * ks;
    }
    float inv_sum[QTILE];
    for (int i = 0; i < nq; i++) {
        float *s = sc + i * L, mx = -INFINITY, sum = 0.0f;
        const int64_t n = n0 + i;
        for (int64_t t = 0; t < n; t++) mx = s[t] > mx ? s[t] : mx;
        int64_t t = 0;
        for (; t + 8 <= n; t += 8)
            _mm256_storeu_ps(s + t, exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), _mm256_set1_ps(mx))));
        for (; t < n; t++) s[t] = expf(s[t] - mx);
        for (t = 0; t < n; t++) sum += s[t];
        inv_sum[i] = sum;
        memset(out[i], 0, sizeof(float) * (size_t)D);
    }
    for (int64_t t = 0; t < nmax; t++) {
        const void *v = row_at(kv, slots[t], vh);
        const float vs = row_scale(kv, slots[t], vh);
        for (int i = t < n0 ? 0 : (int)(t - n0 + 1); i < nq; i++)
            axpy_row(dt, sc[i * L + t] / inv_sum[i] * vs, v, out[i], D);
    }
}

int ls_attention(const ls_kv *kv, const float *q, int64_t q_stride, int64_t H, int64_t B,
                 const int64_t *q_lens, const int64_t *ctx_slots, int64_t L, const int64_t *ctx_lens,
                 float *out, int64_t out_stride) {
    if (ls_kv_check(kv) || B < 1 || L < 1 || H < 1) return LS_EINVAL;
    const int64_t Hkv = kv->heads / 2, D = kv->dim;
    if (H % Hkv || q_stride < H * D || out_stride < H * D) return LS_EINVAL;
    int64_t *first = malloc(sizeof(int64_t) * (size_t)(2 * B + 1));  // per sequence: first row, first item
    if (!first) return LS_ENOMEM;
    int64_t *item0 = first + B, rows = 0, work = 0;
    for (int64_t b = 0; b < B; b++) {
        const int64_t ql = q_lens[b], cl = ctx_lens[b];
        if (ql < 1 || ql > cl || cl > L) { free(first); return LS_EINVAL; }
        for (int64_t t = 0; t < cl; t++)
            if (ctx_slots[b * L + t] < 0 || ctx_slots[b * L + t] >= kv->slots) { free(first); return LS_EINVAL; }
        first[b] = rows;
        rows += ql;
        work += H * ((ql + QTILE - 1) / QTILE) * (ql + cl);  // (cost weight only for the threshold)
    }
    int64_t items = 0;  // items: (sequence, head, tile), sequence-major
    for (int64_t b = 0; b < B; b++) {
        item0[b] = items;
        items += H * ((q_lens[b] + QTILE - 1) / QTILE);
    }
    item0[B] = items;
    const int threads = omp_get_max_threads();
    float *scores = malloc(sizeof(float) * (size_t)threads * QTILE * (size_t)L);
    if (!scores) { free(first); return LS_ENOMEM; }
    const float scale = 1.0f / sqrtf((float)D);
    const int64_t group = H / Hkv;
#pragma omp parallel for schedule(dynamic, 1) if (work * D >= 1 << 18)
    for (int64_t it = 0; it < items; it++) {
        int64_t b = 0;
        while (item0[b + 1] <= it) b++;
        const int64_t tiles = (q_lens[b] + QTILE - 1) / QTILE, local = it - item0[b];
        const int64_t h = local / tiles, r0 = (local % tiles) * QTILE;
        const int nq = (int)(q_lens[b] - r0 < QTILE ? q_lens[b] - r0 : QTILE);
        const float *qr[QTILE];
        float *orow[QTILE];
        for (int i = 0; i < nq; i++) {
            qr[i] = q + (first[b] + r0 + i) * q_stride + h * D;
            orow[i] = out + (first[b] + r0 + i) * out_stride + h * D;
        }
        const int64_t n0 = ctx_lens[b] - q_lens[b] + r0 + 1;  // columns row r0 sees
        attend_tile(kv, qr, orow, nq, n0, ctx_slots + b * L, h / group, scale,
                    scores + (size_t)omp_get_thread_num() * QTILE * (size_t)L, L);
    }
    free(scores);
    free(first);
    return LS_OK;
}

int64_t ls_sizeof_kv(void) { return (int64_t)sizeof(ls_kv); }
