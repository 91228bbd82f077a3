// Block-quantized matmuls, y[M, N] = x[M, K] @ W[N, K]^T, for every GGUF weight type llama.cpp's quantize
// writes for Llama files. One kernel serves decode (M = 1) and prefill (M = hundreds: a GEMM tiled 4
// activation rows at a time, 128 rows per pass over the weights so that they stay in L2).
//
// Activations are quantized to int8 per block of 32 (ls_acts), so each block product is an integer dot
// product (vpmaddubsw, or vpdpbusd with VNNI) scaled once in float32. Weights are kept with the bits of
// their GGUF type, re-laid out in groups of 8 rows: one 32-byte vector holds 4 consecutive values of 8
// rows, so that multiplied by 4 broadcast activations each 32-bit lane sums one row, and a group's 8
// results come out in one vector with no horizontal sums. Per (group, block of 32):
//   q   128 bytes of nibbles: byte [c][r][e] holds row r's value 4c + e (low nibble) and 4 (c + 4) + e
//       (high nibble), c < 4; for Q8_0 instead 256 int8 values [c][r][e], c < 8;
//   hi  5-bit types: 32 bytes [r][e] whose bit c is bit 4 of value 4c + e; 6-bit types: 2 x 32 bytes,
//       vector h's byte [r][e] holding bits 4-5 of value 4 (4h + j) + e in its bits 2j, 2j + 1;
//   d/m float16 [8] (one per row) scale and min: per block for Q4_0..Q5_1 and Q8_0; per super-block of
//       256 (every 8 blocks) for K types, whose sub-blocks (32 values, or 16 for Q2_K/Q3_K/Q6_K) carry
//   sc/mn int8 [sub-blocks][8] scale and min multipliers; for Q4_K and Q5_K instead (their 6-bit
//       scales and mins in GGUF's 12 bytes per 8 sub-blocks, not 16) 12 bytes in sc per block, mn
//       unused: byte r (< 8) holds row r's low 4 bits of scale and (high nibble) of min, and the
//       little-endian uint32 at byte 8 the top 2 bits, of the scale in bits 2r, 2r + 1, of the min in
//       bits 16 + 2r, 17 + 2r.
// A value u (unsigned) stands for w = scale * (u - zp) + min: zp is 8 for Q4_0, 16 for Q5_0, 4 for Q3_K,
// 32 for Q6_K and 0 otherwise; K types' scale is d * sc and their min -dmin * mn. These are GGUF's own
// numbers, exactly (a float16 times a small integer is exact in float32).
#include <stdlib.h>

#include <omp.h>

#include "ls.h"

#define MTILE 4     // activation rows that share one unpacked weight block
#define MCHUNK 128  // activation rows per pass over all weights (keeps them in L2 for long prompts)
// Blocks ahead to prefetch: one M=1 pass is memory-bound and the hardware prefetcher alone left 25% of
// the bandwidth unused (Zen 3, 2 threads, Q4_K 11008 x 4096 from DRAM: 1.39 -> 1.06 ms).
#define PF 8

// One block of 32 floats -> 32 int8 values, its scale d and d * sum(q) of each half.
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
    s[0] = scale * (float)hsum8i(_mm256_add_epi32(i0, i1));
    s[1] = scale * (float)hsum8i(_mm256_add_epi32(i2, i3));
    i0 = _mm256_packs_epi32(i0, i1);  // int16, lanes interleaved
    i2 = _mm256_packs_epi32(i2, i3);
    i0 = _mm256_packs_epi16(i0, i2);  // int8, 32-bit groups in order 0 4 1 5 2 6 3 7
    i0 = _mm256_permutevar8x32_epi32(i0, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)q, i0);
    *d = scale;
}

int ls_acts_init(ls_acts *a, const float *x, int64_t M, int64_t K) {
    const int64_t blocks = M * (K / QK);
    a->M = M, a->K = K;
    a->q = malloc((size_t)(M * K));
    a->d = malloc(sizeof(float) * (size_t)blocks);
    a->s = malloc(sizeof(float) * (size_t)(2 * blocks));
    if (!a->q || !a->d || !a->s) { ls_acts_free(a); return LS_ENOMEM; }
#pragma omp parallel for schedule(static) if (blocks >= 2048)
    for (int64_t b = 0; b < blocks; b++) quantize_block(x + b * QK, a->q + b * QK, a->d + b, a->s + 2 * b);
    return LS_OK;
}

void ls_acts_free(ls_acts *a) {
    free(a->q); free(a->d); free(a->s);
    a->q = NULL, a->d = a->s = NULL;
}

// Integer dot of chunks [c0, c1) of unsigned weights with activations a: 8 rows' int32 sums. Without
// VNNI, vpmaddubsw's int16 pairs are widened often enough not to overflow: per lane a chunk adds at most
// 2 x 127 x (2^bits - 1), i.e. 3810 (4-bit), 7874 (5-bit), 16002 (6-bit), under 32767 for 8, 4, 2 chunks.
AI __m256i dot_u(const __m256i *wv, const int8_t *a, int c0, int c1, const int HI) {
    __m256i s = _mm256_setzero_si256();
#if LS_VNNI
    (void)HI;
    for (int c = c0; c < c1; c++) s = DPBUSD(s, wv[c], bcast4(a + 4 * c));
#else
    const int W = HI == 0 ? 8 : HI == 1 ? 4 : 2;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int c = c0; c < c1; c += W) {
        __m256i s16 = _mm256_maddubs_epi16(wv[c], bcast4(a + 4 * c));
        for (int cc = c + 1; cc < c + W && cc < c1; cc++)
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(wv[cc], bcast4(a + 4 * cc)));
        s = _mm256_add_epi32(s, _mm256_madd_epi16(s16, ones));
    }
#endif
    return s;
}

AI __m256 cvt_i8x8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

AI __m256 cvt_f16x8(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

enum { DIRECT, FILL, READ };  // unpack each block; unpack and keep it in the scratch; read the scratch
#define SCR_BYTES 384            // scratch per block: 8 unpacked chunks (256 bytes), s8[2] and m8[2]

// 8 rows (group g) x MT activation rows from m0, for a nibble format with HI high-bit planes, sub-blocks
// of 16 (SUB16) or 32, K-type scales (KQ), stored mins (HASM) or a zero point ZP. With several tiles of
// activation rows, the first (FILL) keeps the unpacked group in the thread's scratch and the others
// (READ) take it from there: a group is unpacked once per pass, not once per 4 activation rows.
AI void group_u(const ls_part *p, int64_t g, const ls_acts *a, int64_t m0, int MT, const int HI,
                const int SUB16, const int KQ, const int HASM, const int ZP, float *y, int64_t ldy,
                const int MODE, uint8_t *scr) {
    const int64_t K = a->K, nb = K / QK, ns = SUB16 ? 2 : 1;
    const uint8_t *lo = (const uint8_t *)p->q + g * nb * 128;
    const uint8_t *hi = HI ? p->hi + g * nb * 32 * HI : NULL;
    const int64_t nscale = KQ ? nb / 8 : nb;
    const uint16_t *d = p->d + g * nscale * 8, *m = HASM ? p->m + g * nscale * 8 : NULL;
    const int SM12 = KQ && HASM && !SUB16;  // Q4_K, Q5_K: scale and min in 12 bytes per block
    const int8_t *sc = KQ ? p->sc + g * nb * (SM12 ? 12 : ns * 8) : NULL;
    const int8_t *mn = KQ && HASM && !SM12 ? p->mn + g * nb * ns * 8 : NULL;
    const __m256i low = _mm256_set1_epi8(0x0f), bit4 = _mm256_set1_epi8(0x10), bits45 = _mm256_set1_epi8(0x30);
    __m256 acc[MTILE], accm[MTILE], dS, mS = _mm256_setzero_ps();
    for (int j = 0; j < MTILE; j++) acc[j] = accm[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i wv[8];
        __m256 s8[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, m8[2] = {s8[0], s8[0]};
        uint8_t *sb = scr + b * SCR_BYTES;
        if (MODE == READ) {
            for (int c = 0; c < 8; c++) wv[c] = _mm256_load_si256((const __m256i *)(sb + 32 * c));
            for (int h = 0; h < 2; h++) {
                s8[h] = _mm256_load_ps((const float *)(sb + 256) + 8 * h);
                m8[h] = _mm256_load_ps((const float *)(sb + 256) + 16 + 8 * h);
            }
            goto dot;
        }
        _mm_prefetch((const char *)(lo + (b + PF) * 128), _MM_HINT_T0);
        _mm_prefetch((const char *)(lo + (b + PF) * 128 + 64), _MM_HINT_T0);
        if (HI) _mm_prefetch((const char *)(hi + (b + PF) * 32 * HI), _MM_HINT_T0);
        for (int c = 0; c < 4; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(lo + b * 128 + 32 * c));
            wv[c] = _mm256_and_si256(v, low);
            wv[c + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        }
        // One shift and one mask put a chunk's high bits in place (they never cross a byte: see formats.py).
        if (HI == 1) {  // bit 4 of value 4c + e is bit c of byte [r][e]
            const __m256i v = _mm256_loadu_si256((const __m256i *)(hi + b * 32));
            for (int c = 0; c < 8; c++) {
                const __m256i t = c <= 4 ? _mm256_slli_epi16(v, 4 - c) : _mm256_srli_epi16(v, c - 4);
                wv[c] = _mm256_or_si256(wv[c], _mm256_and_si256(t, bit4));
            }
        } else if (HI == 2) {  // bits 4-5 of value 4 (4h + j) + e are bits 2j, 2j + 1 of vector h's byte [r][e]
            for (int h = 0; h < 2; h++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(hi + b * 64 + 32 * h));
                for (int j = 0; j < 4; j++) {
                    const __m256i t = j <= 2 ? _mm256_slli_epi16(v, 4 - 2 * j) : _mm256_srli_epi16(v, 2);
                    wv[4 * h + j] = _mm256_or_si256(wv[4 * h + j], _mm256_and_si256(t, bits45));
                }
            }
        }
        if (KQ) {
            dS = cvt_f16x8(d + b / 8 * 8);  // (reloaded each block: cheaper than a branch here)
            if (HASM) mS = cvt_f16x8(m + b / 8 * 8);
            if (SM12) {
                const int8_t *r = sc + b * 12;
                const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)r));
                int32_t top;
                memcpy(&top, r + 8, sizeof top);
                const __m256i t = _mm256_set1_epi32(top), three = _mm256_set1_epi32(3);
                const __m256i at = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
                const __m256i s6 = _mm256_or_si256(_mm256_and_si256(lo, _mm256_set1_epi32(15)),
                                                   _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(t, at), three), 4));
                const __m256i m6 = _mm256_or_si256(
                    _mm256_srli_epi32(lo, 4),
                    _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(t, _mm256_add_epi32(at, _mm256_set1_epi32(16))), three), 4));
                s8[0] = _mm256_mul_ps(dS, _mm256_cvtepi32_ps(s6));
                m8[0] = _mm256_mul_ps(mS, _mm256_cvtepi32_ps(m6));  // subtracted below
            } else
            for (int h = 0; h < ns; h++) {
                s8[h] = _mm256_mul_ps(dS, cvt_i8x8(sc + (b * ns + h) * 8));
                m8[h] = HASM ? _mm256_mul_ps(mS, cvt_i8x8(mn + (b * ns + h) * 8))  // subtracted below
                             : _mm256_mul_ps(s8[h], _mm256_set1_ps((float)ZP));
            }
        } else {
            s8[0] = cvt_f16x8(d + b * 8);
            // Stored mins are added; zero points (m = -zp * scale) are kept positive and subtracted.
            m8[0] = HASM ? cvt_f16x8(m + b * 8) : _mm256_mul_ps(s8[0], _mm256_set1_ps((float)ZP));
        }
        if (MODE == FILL) {
            for (int c = 0; c < 8; c++) _mm256_store_si256((__m256i *)(sb + 32 * c), wv[c]);
            for (int h = 0; h < 2; h++) {
                _mm256_store_ps((float *)(sb + 256) + 8 * h, s8[h]);
                _mm256_store_ps((float *)(sb + 256) + 16 + 8 * h, m8[h]);
            }
        }
    dot:
        for (int j = 0; j < MT; j++) {
            const int8_t *aj = a->q + (m0 + j) * K + b * QK;
            const __m256 ad = _mm256_set1_ps(a->d[(m0 + j) * nb + b]);
            const float *as = a->s + ((m0 + j) * nb + b) * 2;
            if (SUB16) {
                const __m256i i0 = dot_u(wv, aj, 0, 4, HI), i1 = dot_u(wv, aj, 4, 8, HI);
                acc[j] = _mm256_fmadd_ps(_mm256_mul_ps(s8[0], ad), _mm256_cvtepi32_ps(i0), acc[j]);
                acc[j] = _mm256_fmadd_ps(_mm256_mul_ps(s8[1], ad), _mm256_cvtepi32_ps(i1), acc[j]);
                accm[j] = _mm256_fmadd_ps(m8[0], _mm256_set1_ps(as[0]), accm[j]);
                accm[j] = _mm256_fmadd_ps(m8[1], _mm256_set1_ps(as[1]), accm[j]);
            } else {
                const __m256i i0 = dot_u(wv, aj, 0, 8, HI);
                acc[j] = _mm256_fmadd_ps(_mm256_mul_ps(s8[0], ad), _mm256_cvtepi32_ps(i0), acc[j]);
                if (HASM || ZP) accm[j] = _mm256_fmadd_ps(m8[0], _mm256_set1_ps(as[0] + as[1]), accm[j]);
            }
        }
    }
    // Stored mins of simple types add; K types' mins and every zero point subtract.
    const int add = HASM && !KQ;
    for (int j = 0; j < MT; j++)
        _mm256_storeu_ps(y + (m0 + j) * ldy + 8 * g,
                         add ? _mm256_add_ps(acc[j], accm[j]) : _mm256_sub_ps(acc[j], accm[j]));
}

AI void group_q8(const ls_part *p, int64_t g, const ls_acts *a, int64_t m0, int MT, float *y, int64_t ldy) {
    const int64_t K = a->K, nb = K / QK;
    const int8_t *w = (const int8_t *)p->q + g * nb * 256;
    const uint16_t *d = p->d + g * nb * 8;
    __m256 acc[MTILE];
    for (int j = 0; j < MTILE; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m256 d8 = cvt_f16x8(d + 8 * b);
        for (int i = 0; i < 4; i++) _mm_prefetch((const char *)(w + (b + PF) * 256 + 64 * i), _MM_HINT_T0);
        __m256i s[MTILE];
        for (int j = 0; j < MT; j++) s[j] = _mm256_setzero_si256();
        for (int c = 0; c < 8; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(w + b * 256 + 32 * c));
            const __m256i av = _mm256_sign_epi8(v, v);  // |w|; the sign moves onto the activations
            for (int j = 0; j < MT; j++) {
                const __m256i sa = _mm256_sign_epi8(bcast4(a->q + (m0 + j) * K + b * QK + 4 * c), v);
#if LS_VNNI
                s[j] = DPBUSD(s[j], av, sa);
#else
                // A pair sums to at most 2 x 127 x 127 = 32258: widen after each chunk.
                s[j] = _mm256_add_epi32(s[j], _mm256_madd_epi16(_mm256_maddubs_epi16(av, sa),
                                                                _mm256_set1_epi16(1)));
#endif
            }
        }
        for (int j = 0; j < MT; j++)
            acc[j] = _mm256_fmadd_ps(_mm256_mul_ps(d8, _mm256_set1_ps(a->d[(m0 + j) * nb + b])),
                                     _mm256_cvtepi32_ps(s[j]), acc[j]);
    }
    for (int j = 0; j < MT; j++) _mm256_storeu_ps(y + (m0 + j) * ldy + 8 * g, acc[j]);
}

// One function per format: the format's constants are compile-time, so its accumulators stay in
// registers and the branches on them vanish. Groups of 8 rows are split between the OpenMP threads.
// SCRATCH: formats whose unpacking costs more than reading it back (high-bit planes, K-type scales)
// keep a group's unpacked blocks per thread when several tiles use them (Zen 3, 2 threads, M = 64:
// Q6_K 11008 x 4096 37.9 -> 28.7 ms, Q4_K 47.6 -> 40.4, Q5_0 32.6 -> 27.1; Q4_1 gained nothing).
// A constant row count per call, so that the accumulators stay in registers.
#define TILE(CALL, MODE)                                                                           \
    {                                                                                              \
        if (mt == 4) CALL(4, MODE);                                                                 \
        else if (mt == 3) CALL(3, MODE);                                                            \
        else if (mt == 2) CALL(2, MODE);                                                            \
        else CALL(1, MODE);                                                                         \
    }
#define PART_FN(NAME, GROUP_CALL, SCRATCH)                                                                  \
    static int part_##NAME(const ls_part *p, const ls_acts *a, float *y, int64_t ldy) {           \
        const int64_t groups = p->rows / 8, nb = a->K / QK;                                        \
        uint8_t *scratch = NULL; /* per thread: one group's unpacked blocks (SCR_BYTES each) */    \
        const size_t per_thread = (size_t)nb * SCR_BYTES;                                          \
        if (SCRATCH && a->M > MTILE && !(scratch = aligned_alloc(64, (size_t)omp_get_max_threads() * per_thread))) \
            return LS_ENOMEM;                                                                      \
        for (int64_t c0 = 0; c0 < a->M; c0 += MCHUNK) {                                            \
            const int64_t c1 = c0 + MCHUNK < a->M ? c0 + MCHUNK : a->M;                            \
            _Pragma("omp parallel for schedule(static)")                                           \
            for (int64_t g = 0; g < groups; g++) {                                                 \
                uint8_t *scr = scratch ? scratch + (size_t)omp_get_thread_num() * per_thread : NULL;  \
                for (int64_t m0 = c0; m0 < c1; m0 += MTILE) {                                      \
                    const int64_t mt = c1 - m0 < MTILE ? c1 - m0 : MTILE;                          \
                    if (!scr) TILE(GROUP_CALL, DIRECT) /* M <= MTILE: one tile */                  \
                    else if (m0 == c0) TILE(GROUP_CALL, FILL)                                       \
                    else TILE(GROUP_CALL, READ)                                                     \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        free(scratch);                                                                             \
        return LS_OK;                                                                              \
    }
#define U_CALL(MT, MODE, HI, SUB16, KQ, HASM, ZP) \
    group_u(p, g, a, m0, MT, HI, SUB16, KQ, HASM, ZP, y, ldy, MODE, scr)
//                               HI SUB16 KQ HASM ZP
#define U_CALL_q4_0(MT, MODE) U_CALL(MT, MODE, 0, 0, 0, 0, 8)
#define U_CALL_q4_1(MT, MODE) U_CALL(MT, MODE, 0, 0, 0, 1, 0)
#define U_CALL_q5_0(MT, MODE) U_CALL(MT, MODE, 1, 0, 0, 0, 16)
#define U_CALL_q5_1(MT, MODE) U_CALL(MT, MODE, 1, 0, 0, 1, 0)
#define U_CALL_q2_k(MT, MODE) U_CALL(MT, MODE, 0, 1, 1, 1, 0)
#define U_CALL_q3_k(MT, MODE) U_CALL(MT, MODE, 0, 1, 1, 0, 4)
#define U_CALL_q4_k(MT, MODE) U_CALL(MT, MODE, 0, 0, 1, 1, 0)
#define U_CALL_q5_k(MT, MODE) U_CALL(MT, MODE, 1, 0, 1, 1, 0)
#define U_CALL_q6_k(MT, MODE) U_CALL(MT, MODE, 2, 1, 1, 0, 32)
#define Q8_CALL(MT, MODE) group_q8(p, g, a, m0, MT, y, ldy)  /* unpacking Q8_0 is a load: no scratch */
PART_FN(q4_0, U_CALL_q4_0, 0)
PART_FN(q4_1, U_CALL_q4_1, 0)
PART_FN(q5_0, U_CALL_q5_0, 1)
PART_FN(q5_1, U_CALL_q5_1, 1)
PART_FN(q2_k, U_CALL_q2_k, 1)
PART_FN(q3_k, U_CALL_q3_k, 1)
PART_FN(q4_k, U_CALL_q4_k, 1)
PART_FN(q5_k, U_CALL_q5_k, 1)
PART_FN(q6_k, U_CALL_q6_k, 1)
PART_FN(q8_0, Q8_CALL, 0)

typedef int (*part_fn)(const ls_part *, const ls_acts *, float *, int64_t);
static const part_fn PART_FNS[LS_NUM_FORMATS] = {
    [LS_Q4_0] = part_q4_0, [LS_Q4_1] = part_q4_1, [LS_Q5_0] = part_q5_0, [LS_Q5_1] = part_q5_1,
    [LS_Q8_0] = part_q8_0, [LS_Q2_K] = part_q2_k, [LS_Q3_K] = part_q3_k, [LS_Q4_K] = part_q4_k,
    [LS_Q5_K] = part_q5_k, [LS_Q6_K] = part_q6_k,
};

// Every size and pointer the kernels will trust, checked once: LS_EINVAL on any mismatch.
int ls_linear_check(const ls_linear *lin) {
    if (!lin || lin->k <= 0 || lin->k % QK || lin->nparts < 1 || lin->nparts > LS_MAX_PARTS) return LS_EINVAL;
    int64_t rows = 0;
    for (int64_t i = 0; i < lin->nparts; i++) {
        const ls_part *p = &lin->part[i];
        const int64_t f = p->fmt;
        if (f < LS_Q4_0 || f >= LS_NUM_FORMATS || p->rows <= 0 || p->rows % 8 || !p->q || !p->d) return LS_EINVAL;
        const int kq = f >= LS_Q2_K && f != LS_Q8_0, hi = f == LS_Q5_0 || f == LS_Q5_1 || f == LS_Q5_K || f == LS_Q6_K;
        const int hasm = f == LS_Q4_1 || f == LS_Q5_1 || f == LS_Q2_K || f == LS_Q4_K || f == LS_Q5_K;
        const int sm12 = f == LS_Q4_K || f == LS_Q5_K;  // mins packed with the scales in sc
        if ((kq && (lin->k % 256 || !p->sc)) || (hi && !p->hi) || (hasm && !p->m) ||
            (kq && hasm && !sm12 && !p->mn) || (sm12 && p->mn))
            return LS_EINVAL;
        rows += p->rows;
    }
    return rows == lin->n ? LS_OK : LS_EINVAL;
}

// y [M, n] = activations @ W^T, each part writing its own columns.
int ls_linear_apply(const ls_linear *lin, const ls_acts *a, float *y) {
    if (a->K != lin->k) return LS_EINVAL;
    int64_t col = 0;
    for (int64_t i = 0; i < lin->nparts; i++) {
        const int rc = PART_FNS[lin->part[i].fmt](&lin->part[i], a, y + col, lin->n);
        if (rc) return rc;
        col += lin->part[i].rows;
    }
    return LS_OK;
}

int ls_matmul(const ls_linear *lin, const float *x, int64_t M, float *y) {
    int rc = ls_linear_check(lin);
    if (rc) return rc;
    ls_acts a;
    if ((rc = ls_acts_init(&a, x, M, lin->k))) return rc;
    rc = ls_linear_apply(lin, &a, y);
    ls_acts_free(&a);
    return rc;
}

int64_t ls_abi_version(void) { return LS_ABI_VERSION; }
int64_t ls_sizeof_linear(void) { return (int64_t)sizeof(ls_linear); }
const char *ls_variant(void) { return LS_VARIANT; }
