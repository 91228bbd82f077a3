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

#define QTILE 8   // query rows per work item
#define HCHUNK 4  // most heads per work item, except in a step where every sequence brings one token:
// then a sequence's heads are split only as far as needed to give every thread work, and an item reads
// its context slots whole (all heads' keys and values are adjacent in a slot). Embedded model at batch
// 64, 30 layers from DRAM, Zen 4, in-process A/B: 0.86x the time (0.90-0.95x at batch 16). Prefill
// keeps 4: its items hold 8 rows of scores per head, and 12 heads' made a 1,000-token prompt 12% slower.
#ifndef PF_AHEAD
#define PF_AHEAD 8  // context slots prefetched ahead
#endif
#define MAX_DIM 512
// A decode item's keys and values are prefetched KPF_NEAR groups of 8 slots ahead into L1 and the group
// after that into L2 as well (KPF_FAR; 0: none). The L2 prefetch keeps more of the context's lines in
// flight: embedded model, kernel_ab against the L1 prefetch alone, Zen 4: decode attention 0.67-0.73x the
// time at batch 16 and 64 (the whole fused step 0.88-0.92x), 1.05-1.09x at batch 1 (0.19 ms a step);
// Llama 2 7B's shapes at batch 4 0.91x. Four or five groups ahead gave less, ten or sixteen nothing.
#ifndef KPF_NEAR
#define KPF_NEAR 2
#endif
#ifndef KPF_FAR
#define KPF_FAR 3
#endif
// Query heads of one KV head that share each converted key and value in a decode step: 8 x 3
// accumulators need 32 vector registers (AVX-512VL's ymm0-31); AVX2's 16 take one head at a time.
// Embedded model (3 heads a KV head), kernel_ab, Zen 4: decode attention 0.86-0.90x the time at batch 16
// and 64, batch 1 unchanged; the same bits (each head's sums are the same chains).
#if defined(__AVX512VL__)
#define GQ 3
#else
#define GQ 1
#endif
#ifndef PAR_STORE
#define PAR_STORE 4  // tokens from which a K/V store runs on all threads
#endif

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

static const int64_t KV_SIZE[LS_KV_NUM_DTYPES] = {4, 2, 2, 1};  // bytes per stored value

AI const void *row_at(const ls_kv *kv, int64_t slot, int64_t head) {
    return (const char *)kv->data + (slot * kv->heads + head) * kv->dim * KV_SIZE[kv->dtype];
}

AI float row_scale(const ls_kv *kv, int64_t slot, int64_t head) {
    return kv->scale ? kv->scale[slot * kv->heads + head] : 1.0f;
}

AI void prefetch_row(const void *row, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch((const char *)row + i, _MM_HINT_T0);
}

AI void prefetch_row_l2(const void *row, int64_t bytes) {  // (into L2 only)
    for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch((const char *)row + i, _MM_HINT_T1);
}

// The sum of a vector's 8 lanes in one fixed tree, ((v0+v4)+(v1+v5)) + ((v2+v6)+(v3+v7)): dot8's
// transposed reduction computes exactly this for each of its rows.
AI float hsum_tree(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

// q . row for one query row: one accumulator over D in order, then hsum_tree.
AI float dot1(int64_t dtype, const float *q, const void *row, int64_t D) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(dtype, row, i), acc);
    return hsum_tree(acc);
}

// hsum_tree of 8 vectors at once: out[r] = hsum_tree(a[r]).
AI void reduce8(const __m256 *a, float *out) {
    // lo + hi of each row, two rows per vector: [r lanes 0..3 | s lanes 0..3]
#define LOHI(x, y) _mm256_add_ps(_mm256_permute2f128_ps((x), (y), 0x20), _mm256_permute2f128_ps((x), (y), 0x31))
    const __m256 s01 = LOHI(a[0], a[1]), s23 = LOHI(a[2], a[3]), s45 = LOHI(a[4], a[5]), s67 = LOHI(a[6], a[7]);
#undef LOHI
    // hadd twice: lanes [r0 r2 r4 r6 | r1 r3 r5 r7], each (s0+s1)+(s2+s3) as in hsum_tree
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(s01, s23), _mm256_hadd_ps(s45, s67));
    float t[8];
    _mm256_storeu_ps(t, h);
    out[0] = t[0], out[2] = t[1], out[4] = t[2], out[6] = t[3];
    out[1] = t[4], out[3] = t[5], out[5] = t[6], out[7] = t[7];
}

// The same dot for 8 query rows at once (the row is converted once): out[r] equals dot1(q[r], row).
AI void dot8(int64_t dtype, const float *const *q, const void *row, int64_t D, float *out) {
    __m256 a[QTILE];
    for (int r = 0; r < QTILE; r++) a[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i += 8) {
        const __m256 k = load8(dtype, row, i);
        for (int r = 0; r < QTILE; r++) a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q[r] + i), k, a[r]);
    }
    reduce8(a, out);
}

// NQ query rows (heads of one KV head) against the same 8 keys at once, each key converted once for
// all of them (8 x NQ independent accumulators, each the chain of dot1 over D in order, reduced by
// reduce8's tree): out[8 h + j] equals dot1(q[h], row[j]).
AI void dotq_x8(int64_t dtype, const float *const *q, const int NQ, const void *const *row, int64_t D,
                float *out) {
    __m256 a[GQ][8];
    for (int h = 0; h < NQ; h++)
        for (int j = 0; j < 8; j++) a[h][j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i += 8) {
        __m256 qi[GQ];
        for (int h = 0; h < NQ; h++) qi[h] = _mm256_loadu_ps(q[h] + i);
        for (int j = 0; j < 8; j++) {
            const __m256 k = load8(dtype, row[j], i);
            for (int h = 0; h < NQ; h++) a[h][j] = _mm256_fmadd_ps(qi[h], k, a[h][j]);
        }
    }
    for (int h = 0; h < NQ; h++) reduce8(a[h], out + 8 * h);
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
#pragma omp parallel for schedule(static) if (T >= PAR_STORE)  // (a step's slots are distinct)
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < kv->heads; h++) {
            const float *x = src + t * src_stride + h * D;
            void *dst = (void *)row_at(kv, slot[t], h);
            switch (kv->dtype) {
            case LS_KV_BF16: {
                int64_t i = 0;
                for (; i + 8 <= D; i += 8) {  // to_bf16 on 8 values (NaN lanes kept apart, as in to_bf16)
                    const __m256i u = _mm256_castps_si256(_mm256_loadu_ps(x + i));
                    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
                    const __m256i rn = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
                    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                                           _mm256_set1_epi32(0x7f800000));
                    const __m256i qn = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
                    const __m256i b = _mm256_blendv_epi8(rn, qn, nan);  // 8 x uint16 in 32-bit lanes
                    const __m256i p = _mm256_packus_epi32(b, b);  // lanes [0..3 0..3 | 4..7 4..7]
                    _mm_storeu_si128((__m128i *)((uint16_t *)dst + i),
                                     _mm256_castsi256_si128(_mm256_permute4x64_epi64(p, 0x08)));
                }
                for (; i < D; i++) ((uint16_t *)dst)[i] = to_bf16(x[i]);
                break;
            }
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

// out[c0 .. c0 + 8 NC) = sum over columns t < n, in order, of w[t] x value row t of KV head vh (NC a
// constant at each call, so that the NC accumulators stay in registers).
// (for NQ heads of one KV head at once, each value converted once for all: out[h] from w[h])
AI void wsum_cols(const int64_t dt, const ls_kv *kv, const int64_t *slots, int64_t vh,
                  const float *const *w, const int NQ, int64_t n, int64_t c0, const int NC, float *const *out) {
    __m256 a[GQ][8];
    for (int h = 0; h < NQ; h++)
        for (int c = 0; c < NC; c++) a[h][c] = _mm256_setzero_ps();
    for (int64_t t = 0; t < n; t++) {
        const void *v = row_at(kv, slots[t], vh);
        __m256 wt[GQ];
        for (int h = 0; h < NQ; h++) wt[h] = _mm256_broadcast_ss(w[h] + t);
        for (int c = 0; c < NC; c++) {
            const __m256 x = load8(dt, v, c0 + 8 * c);
            for (int h = 0; h < NQ; h++) a[h][c] = _mm256_fmadd_ps(wt[h], x, a[h][c]);
        }
    }
    for (int h = 0; h < NQ; h++)
        for (int c = 0; c < NC; c++) _mm256_storeu_ps(out[h] + c0 + 8 * c, a[h][c]);
}

// One block of work: query rows 0..nq-1 of one sequence (row i sees context columns 0 .. n0 + i - 1) for
// heads h0 .. h0 + nh - 1. Tokens are the outer loop, so each context slot's rows of these heads (adjacent
// in the pool) are read once, in order, for every row and head of the block. Per (row, head) the
// arithmetic is the same whatever nq, nh or the batch: dots of one accumulator in D order reduced by one
// tree (dot1 = dot8), softmax in column order, and outputs summed in column order; columns a row does not
// see get weight 0.
AI void attend_block_t(const int64_t dt, const ls_kv *kv, const float *q0, int64_t q_stride, float *o0,
                       int64_t o_stride, int nq, int64_t n0, const int64_t *slots, int64_t h0, int nh,
                       int64_t group, float scale, float *sc, int64_t L, float *local, int64_t qt,
                       int64_t hcap) {
    const int64_t D = kv->dim, Hkv = kv->heads / 2, nmax = n0 + nq - 1;
    const int64_t row_bytes = D * KV_SIZE[dt];
    // Queries and outputs in a contiguous scratch: rows of q and out lie H * D floats apart, a multiple of
    // 4 KiB for common shapes, and would all fall in the same few L1 sets. Row i of head hh is row
    // hh * qt + i of each (qt: rows per item, nq <= qt; hcap: heads per item, nh <= hcap).
#define QP(hh, i) (local + ((int64_t)(hh) * qt + (i)) * D)
#define OP(hh, i) (local + ((hcap + (hh)) * qt + (i)) * D)
#define SC(hh, i) (sc + ((int64_t)(hh) * qt + (i)) * L)
    for (int hh = 0; hh < nh; hh++)
        for (int i = 0; i < nq; i++)
            memcpy(QP(hh, i), q0 + i * q_stride + (h0 + hh) * D, sizeof(float) * (size_t)D);
    int64_t t0 = 0;
    if (nq == 1)  // decode: 8 keys at a time per head (the same arithmetic per key as dot1)
        for (; t0 + 8 <= nmax; t0 += 8) {
            // The keys two groups on, and their values (read right after this pass): DRAM is ~300
            // cycles away and the slots of a context are scattered over the pool's blocks. The group
            // after those goes into L2 (KPF_FAR above).
            for (int64_t t = t0 + KPF_NEAR * 8; t < t0 + (KPF_NEAR + 1) * 8 && t < nmax; t++)
                for (int64_t g = h0 / group; g <= (h0 + nh - 1) / group; g++) {
                    prefetch_row(row_at(kv, slots[t], g), row_bytes);
                    prefetch_row(row_at(kv, slots[t], Hkv + g), row_bytes);
                }
#if KPF_FAR
            for (int64_t t = t0 + KPF_FAR * 8; t < t0 + (KPF_FAR + 1) * 8 && t < nmax; t++)
                for (int64_t g = h0 / group; g <= (h0 + nh - 1) / group; g++) {
                    prefetch_row_l2(row_at(kv, slots[t], g), row_bytes);
                    prefetch_row_l2(row_at(kv, slots[t], Hkv + g), row_bytes);
                }
#endif
            for (int hh = 0, n; hh < nh; hh += n) {
                const int64_t kvh = (h0 + hh) / group;
                for (n = 1; n < GQ && hh + n < nh && (h0 + hh + n) / group == kvh; n++) {}
                const void *k[8];
                for (int j = 0; j < 8; j++) k[j] = row_at(kv, slots[t0 + j], kvh);
                const float *qs[GQ];
                for (int h = 0; h < n; h++) qs[h] = QP(hh + h, 0);
                float d[GQ * 8];
                if (GQ >= 3 && n == 3) dotq_x8(dt, qs, 3, k, D, d);  // (a constant NQ per call: registers)
                else if (GQ >= 2 && n == 2) dotq_x8(dt, qs, 2, k, D, d);
                else dotq_x8(dt, qs, 1, k, D, d);
                for (int h = 0; h < n; h++)
                    for (int j = 0; j < 8; j++)
                        SC(hh + h, 0)[t0 + j] = d[8 * h + j] * (row_scale(kv, slots[t0 + j], kvh) * scale);
            }
        }
    for (int64_t t = t0; t < nmax; t++) {
        if (t + PF_AHEAD < nmax)
            for (int hh = 0; hh < nh; hh += 1) prefetch_row(row_at(kv, slots[t + PF_AHEAD], (h0 + hh) / group), row_bytes);
        for (int hh = 0; hh < nh; hh++) {
            const int64_t kvh = (h0 + hh) / group;
            const void *k = row_at(kv, slots[t], kvh);
            const float ks = row_scale(kv, slots[t], kvh) * scale;
            if (nq == QTILE) {
                float d[QTILE];
                const float *qr[QTILE];
                for (int i = 0; i < QTILE; i++) qr[i] = QP(hh, i);
                dot8(dt, qr, k, D, d);
                for (int i = 0; i < QTILE; i++) SC(hh, i)[t] = d[i] * ks;
            } else {
                for (int i = t < n0 ? 0 : (int)(t - n0 + 1); i < nq; i++) SC(hh, i)[t] = dot1(dt, QP(hh, i), k, D) * ks;
            }
        }
    }
    for (int hh = 0; hh < nh; hh++) {
        const int64_t vh = Hkv + (h0 + hh) / group;
        for (int i = 0; i < nq; i++) {
            // Softmax over the row's n columns (the sum in column order).
            float *s = SC(hh, i);
            const int64_t n = n0 + i;
            int64_t t = 0;
            __m256 v8 = _mm256_set1_ps(-INFINITY);
            for (; t + 8 <= n; t += 8) v8 = _mm256_max_ps(v8, _mm256_loadu_ps(s + t));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps(v8, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            float mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
            for (; t < n; t++) mx = s[t] > mx ? s[t] : mx;
            for (t = 0; t + 8 <= n; t += 8)
                _mm256_storeu_ps(s + t, exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), _mm256_set1_ps(mx))));
            for (; t < n; t++) s[t] = expf(s[t] - mx);
            float sum = 0.0f;
            for (t = 0; t < n; t++) sum += s[t];
            t = 0;
            if (dt != LS_KV_I8)  // (no scale per column: value x 1 is exact)
                for (; t + 8 <= n; t += 8)
                    _mm256_storeu_ps(s + t, _mm256_div_ps(_mm256_loadu_ps(s + t), _mm256_set1_ps(sum)));
            for (; t < n; t++) s[t] = s[t] / sum * row_scale(kv, slots[t], vh);
            for (t = n; t < nmax; t++) s[t] = 0.0f;  // columns this row does not see
            memset(OP(hh, i), 0, sizeof(float) * (size_t)D);
        }
    }
    if (nq == 1) {
        // Decode: up to 64 output values' sums in registers over all columns (each value's sum in the
        // same order, from the same zero, as the other paths).
        for (int hh = 0, n; hh < nh; hh += n) {
            const int64_t vh = Hkv + (h0 + hh) / group;
            for (n = 1; n < GQ && hh + n < nh && (h0 + hh + n) / group == vh - Hkv; n++) {}
            const float *w[GQ];
            float *o[GQ];
            for (int h = 0; h < n; h++) w[h] = SC(hh + h, 0), o[h] = OP(hh + h, 0);
#define WSUM(NQ)                                                                                \
    {                                                                                           \
        int64_t c0 = 0;                                                                         \
        for (; c0 + 64 <= D; c0 += 64) wsum_cols(dt, kv, slots, vh, w, NQ, nmax, c0, 8, o);     \
        if (c0 < D) wsum_cols(dt, kv, slots, vh, w, NQ, nmax, c0, (int)(D - c0) / 8, o);        \
    }
            if (GQ >= 3 && n == 3) WSUM(3) else if (GQ >= 2 && n == 2) WSUM(2) else WSUM(1)
#undef WSUM
        }
    } else if (nq == QTILE) {
        // A full tile: per 8 output values, the 8 rows' sums stay in registers over all columns.
        for (int hh = 0; hh < nh; hh++) {
            const int64_t vh = Hkv + (h0 + hh) / group;
            const float *w[QTILE];
            for (int i = 0; i < QTILE; i++) w[i] = SC(hh, i);
            for (int64_t c = 0; c < D; c += 8) {
                __m256 a[QTILE];
                for (int i = 0; i < QTILE; i++) a[i] = _mm256_setzero_ps();
                for (int64_t t = 0; t < nmax; t++) {
                    const __m256 v8 = load8(dt, row_at(kv, slots[t], vh), c);
                    for (int i = 0; i < QTILE; i++) a[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(w[i] + t), v8, a[i]);
                }
                for (int i = 0; i < QTILE; i++) _mm256_storeu_ps(OP(hh, i) + c, a[i]);
            }
        }
    } else {
        // Fewer rows (decode: one): columns outer, so each slot's rows of these heads are read once.
        for (int64_t t = 0; t < nmax; t++) {
            if (t + PF_AHEAD < nmax)
                for (int hh = 0; hh < nh; hh++)
                    prefetch_row(row_at(kv, slots[t + PF_AHEAD], Hkv + (h0 + hh) / group), row_bytes);
            for (int hh = 0; hh < nh; hh++) {
                const void *v = row_at(kv, slots[t], Hkv + (h0 + hh) / group);
                for (int64_t c = 0; c < D; c += 8) {
                    const __m256 v8 = load8(dt, v, c);
                    for (int i = 0; i < nq; i++)
                        _mm256_storeu_ps(OP(hh, i) + c, _mm256_fmadd_ps(_mm256_set1_ps(SC(hh, i)[t]), v8,
                                                                        _mm256_loadu_ps(OP(hh, i) + c)));
                }
            }
        }
    }
    for (int hh = 0; hh < nh; hh++)
        for (int i = 0; i < nq; i++)
            memcpy(o0 + i * o_stride + (h0 + hh) * D, OP(hh, i), sizeof(float) * (size_t)D);
#undef QP
#undef OP
#undef SC
}

// attend_block with the pool's dtype a constant, so that load8's switch leaves the inner loops.
static void attend_block(const ls_kv *kv, const float *q0, int64_t q_stride, float *o0, int64_t o_stride,
                         int nq, int64_t n0, const int64_t *slots, int64_t h0, int nh, int64_t group,
                         float scale, float *sc, int64_t L, float *local, int64_t qt, int64_t hcap) {
#define ATTEND(DT) attend_block_t(DT, kv, q0, q_stride, o0, o_stride, nq, n0, slots, h0, nh, group, scale, sc, L, \
                                  local, qt, hcap)
    switch (kv->dtype) {
    case LS_KV_BF16: ATTEND(LS_KV_BF16); break;
    case LS_KV_F16: ATTEND(LS_KV_F16); break;
    case LS_KV_I8: ATTEND(LS_KV_I8); break;
    default: ATTEND(LS_KV_F32);
    }
#undef ATTEND
}

int ls_attention(const ls_kv *kv, const float *q, int64_t q_stride, int64_t H, int64_t B,
                 const int64_t *q_lens, const int64_t *ctx_slots, int64_t L, const int64_t *ctx_lens,
                 float *out, int64_t out_stride) {
    if (ls_kv_check(kv) || B < 1 || L < 1 || H < 1) return LS_EINVAL;
    const int64_t Hkv = kv->heads / 2, D = kv->dim;
    if (H % Hkv || q_stride < H * D || out_stride < H * D) return LS_EINVAL;
    // Work items: (sequence, head chunk, tile of QTILE rows), sequence-major; enough of them to keep every
    // thread busy (the chunking never changes a result, only the loop order across heads).
    const int threads = omp_get_max_threads();
    int64_t tiles_total = 0;
    int decode = 1;  // every sequence brings one token
    for (int64_t b = 0; b < B; b++) {
        tiles_total += (q_lens[b] + QTILE - 1) / QTILE;
        decode &= q_lens[b] == 1;
    }
    const int64_t qt = decode ? 1 : QTILE;  // rows per item at most
    int64_t nchunks = decode ? 1 : (H + HCHUNK - 1) / HCHUNK;
    while (nchunks < H && tiles_total * nchunks < 4 * threads) nchunks++;
    const int64_t hc = (H + nchunks - 1) / nchunks;  // heads per chunk
    nchunks = (H + hc - 1) / hc;
    int64_t *first = malloc(sizeof(int64_t) * (size_t)(2 * B + 1));  // per sequence: first row, first item
    if (!first) return LS_ENOMEM;
    int64_t *item0 = first + B, rows = 0, items = 0, work = 0;
    for (int64_t b = 0; b < B; b++) {
        const int64_t ql = q_lens[b], cl = ctx_lens[b];
        if (ql < 1 || ql > cl || cl > L) { free(first); return LS_EINVAL; }
        for (int64_t t = 0; t < cl; t++)
            if (ctx_slots[b * L + t] < 0 || ctx_slots[b * L + t] >= kv->slots) { free(first); return LS_EINVAL; }
        first[b] = rows;
        item0[b] = items;
        rows += ql;
        items += nchunks * ((ql + QTILE - 1) / QTILE);
        work += H * ql * cl;
    }
    item0[B] = items;
    // Per thread: scores [hcap][qt][Ls] (rows padded off 4 KiB multiples), then queries and outputs.
    const int64_t hcap = decode ? hc : HCHUNK, Ls = L + 16, per_thread = hcap * qt * (Ls + 2 * D);
    float *scores = malloc(sizeof(float) * (size_t)threads * (size_t)per_thread);
    if (!scores) { free(first); return LS_ENOMEM; }
    const float scale = 1.0f / sqrtf((float)D);
    const int64_t group = H / Hkv;
#pragma omp parallel for schedule(dynamic, 1) if (work * D >= 1 << 15)
    for (int64_t it = 0; it < items; it++) {
        int64_t b = 0;
        while (item0[b + 1] <= it) b++;
        const int64_t tiles = (q_lens[b] + QTILE - 1) / QTILE, local = it - item0[b];
        const int64_t h0 = (local / tiles) * hc, r0 = (local % tiles) * QTILE;
        const int nh = (int)(H - h0 < hc ? H - h0 : hc);
        const int nq = (int)(q_lens[b] - r0 < QTILE ? q_lens[b] - r0 : QTILE);
        const int64_t n0 = ctx_lens[b] - q_lens[b] + r0 + 1;  // columns row r0 sees
        float *mine = scores + (size_t)omp_get_thread_num() * (size_t)per_thread;
        attend_block(kv, q + (first[b] + r0) * q_stride, q_stride, out + (first[b] + r0) * out_stride,
                     out_stride, nq, n0, ctx_slots + b * L, h0, nh, group, scale, mine, Ls,
                     mine + hcap * qt * Ls, qt, hcap);
    }
    free(scores);
    free(first);
    return LS_OK;
}

int64_t ls_sizeof_kv(void) { return (int64_t)sizeof(ls_kv); }
