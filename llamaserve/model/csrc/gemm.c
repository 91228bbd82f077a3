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
//   sc/mn int8 [sub-blocks][8] scale and min multipliers; for Q4_K and Q5_K instead 16 bytes in sc per
//       block, mn unused: the 8 rows' 6-bit scales, then their 6-bit mins, a byte each (GGUF packs them
//       in 12 bytes; unpacking those per block cost a third of a one-row matmul's time in cache).
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
#ifndef PF  // (-DPF=N to try another distance: on Zen 4, 4, 16 and 32 were no faster than 8)
#define PF 8
#endif
// Blocks ahead to prefetch into L2 as well (the low nibbles, Q8_0's values; 0: none): more of the stream
// in flight. kernel_ab against the L1 prefetch alone, Zen 4, two runs: embedded model, layers 0.91-0.94x
// the time at M = 1 (with the head 0.93-0.99x), layers + head 0.88-0.92x at M = 16, the fused decode step
// 0.90-0.95x at batch 1; Llama 2 7B Q4_K_M (6 layers and the head) 0.95x at M = 1, 0.96x at M = 4.
// 16 and 32 blocks gave less, 128 no more.
#ifndef PF_L2
#define PF_L2 64
#endif

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

// with_u: also the unsigned copy (only Q8_0's VNNI kernels read it).
int ls_acts_init(ls_acts *a, const float *x, int64_t M, int64_t K, int with_u) {
    const int64_t blocks = M * (K / QK);
    with_u = with_u && LS_VNNI_WIDE;
    a->M = M, a->K = K;
    a->q = malloc((size_t)(M * K));
    a->u = with_u ? malloc((size_t)(M * K)) : NULL;
    a->d = malloc(sizeof(float) * (size_t)blocks);
    a->s = malloc(sizeof(float) * (size_t)(2 * blocks));
    if (!a->q || (with_u && !a->u) || !a->d || !a->s) { ls_acts_free(a); return LS_ENOMEM; }
#pragma omp parallel for schedule(static) if (blocks >= 512)  // (a batch of 16 rows of 1,024)
    for (int64_t b = 0; b < blocks; b++) {
        quantize_block(x + b * QK, a->q + b * QK, a->d + b, a->s + 2 * b);
        if (with_u) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(a->q + b * QK));
            _mm256_storeu_si256((__m256i *)(a->u + b * QK), _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80)));
        }
    }
    return LS_OK;
}

void ls_acts_free(ls_acts *a) {
    free(a->q); free(a->u); free(a->d); free(a->s);
    a->q = NULL, a->u = NULL, a->d = a->s = NULL;
}

#if defined(LS_AVX512VNNI)
AI __m512i bcast4x16(const int8_t *p) {  // 4 int8 activations to all 16 lanes
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm512_set1_epi32(v);
}
#endif

enum { DIRECT, FILL, READ };  // unpack each block; unpack and keep it in the scratch; read the scratch
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define VW 8
#include "group.h"  // group_u8, group_q8_8: 8 rows at a time, 256-bit vectors
#undef VW
#if defined(LS_AVX512VNNI)
#define PAIRS 1  // the 512-bit kernels take two groups (16 rows) at a time, except:
// One activation row against short rows (K < PAIRS_M1_K) takes one group at a time: a group's stream
// is then a few KB, and two of them at once streamed worse (embedded SmolLM2, K = 576 / 1536, Zen 4,
// three alternated runs: 113 / 125 / 146 tok/s with pairs, 129 / 133 / 201 without). Long rows (7B,
// K = 4096 / 11008) read as fast or faster in pairs (Q8_0 27-33 GB/s against 24-25).
#ifndef PAIRS_M1_K
#define PAIRS_M1_K 2048
#endif
#define VW 16
#include "group.h"  // group_u16, group_q8_16
#undef VW
#else
#define PAIRS 0
#define PAIRS_M1_K 0
#define group_u16 group_u8  // (names for the branch that PAIRS 0 makes dead)
#define group_q8_16 group_q8_8
#endif

// One function per format: the format's constants are compile-time, so its accumulators stay in
// registers and the branches on them vanish. Groups of 8 rows are split between the OpenMP threads.
// SCRATCH: formats whose unpacking costs more than reading it back (high-bit planes, K-type scales)
// keep a group's unpacked blocks per thread when several tiles use them (Zen 3, 2 threads, M = 64:
// Q6_K 11008 x 4096 37.9 -> 28.7 ms, Q4_K 47.6 -> 40.4, Q5_0 32.6 -> 27.1; Q4_1 gained nothing).
// A constant row count per call, so that the accumulators stay in registers.
#define TILE(CALL, MODE, W)                                                                        \
    {                                                                                              \
        if (mt == 4) CALL(4, MODE, W);                                                              \
        else if (mt == 3) CALL(3, MODE, W);                                                         \
        else if (mt == 2) CALL(2, MODE, W);                                                         \
        else CALL(1, MODE, W);                                                                      \
    }
#define PART_FN(NAME, GROUP_CALL, SCRATCH)                                                                  \
    static int part_##NAME(const ls_part *p, const ls_acts *a, float *y, int64_t ldy) {           \
        const int pairs = PAIRS && (a->M > 1 || a->K >= PAIRS_M1_K);                              \
        const int64_t groups = p->rows / 8, nb = a->K / QK, units = pairs ? (groups + 1) / 2 : groups; \
        uint8_t *scratch = NULL; /* per thread: one unit's unpacked blocks (48 bytes a row each) */   \
        const size_t per_thread = (size_t)nb * (PAIRS ? 16 : 8) * 48;                              \
        if (SCRATCH && a->M > MTILE && !(scratch = aligned_alloc(64, (size_t)omp_get_max_threads() * per_thread))) \
            return LS_ENOMEM;                                                                      \
        /* Several activation rows (compute-bound): chunks of about a sixteenth of a thread's share, \
           so that a thread the OS takes away for a while (another process on a 2-core machine)    \
           holds up a sixteenth, not half, of the work. One row (memory-bound, often short): a     \
           contiguous half each, which streams best. */                                            \
        const int64_t chunk = units / (16 * omp_get_max_threads()) > 1 ? units / (16 * omp_get_max_threads()) : 1; \
        omp_set_schedule(a->M > 1 ? omp_sched_dynamic : omp_sched_static, a->M > 1 ? (int)chunk : 0); \
        for (int64_t c0 = 0; c0 < a->M; c0 += MCHUNK) {                                            \
            const int64_t c1 = c0 + MCHUNK < a->M ? c0 + MCHUNK : a->M;                            \
            _Pragma("omp parallel for schedule(runtime)")                                          \
            for (int64_t u = 0; u < units; u++) {                                                  \
                uint8_t *scr = scratch ? scratch + (size_t)omp_get_thread_num() * per_thread : NULL;  \
                const int64_t g = pairs ? 2 * u : u;                                               \
                for (int64_t m0 = c0; m0 < c1; m0 += MTILE) {                                      \
                    const int64_t mt = c1 - m0 < MTILE ? c1 - m0 : MTILE;                          \
                    if (pairs && g + 1 < groups) {                                                  \
                        if (!scr) TILE(GROUP_CALL, DIRECT, 16) /* M <= MTILE: one tile */          \
                        else if (m0 == c0) TILE(GROUP_CALL, FILL, 16)                               \
                        else TILE(GROUP_CALL, READ, 16)                                             \
                    } else {                                                                       \
                        if (!scr) TILE(GROUP_CALL, DIRECT, 8)                                       \
                        else if (m0 == c0) TILE(GROUP_CALL, FILL, 8)                                \
                        else TILE(GROUP_CALL, READ, 8)                                              \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        free(scratch);                                                                             \
        return LS_OK;                                                                              \
    }
#define U_CALL(MT, MODE, W, HI, SUB16, KQ, HASM, ZP) \
    CAT(group_u, W)(p, g, a, m0, MT, HI, SUB16, KQ, HASM, ZP, y, ldy, MODE, scr)
//                                        HI SUB16 KQ HASM ZP
#define U_CALL_q4_0(MT, MODE, W) U_CALL(MT, MODE, W, 0, 0, 0, 0, 8)
#define U_CALL_q4_1(MT, MODE, W) U_CALL(MT, MODE, W, 0, 0, 0, 1, 0)
#define U_CALL_q5_0(MT, MODE, W) U_CALL(MT, MODE, W, 1, 0, 0, 0, 16)
#define U_CALL_q5_1(MT, MODE, W) U_CALL(MT, MODE, W, 1, 0, 0, 1, 0)
#define U_CALL_q2_k(MT, MODE, W) U_CALL(MT, MODE, W, 0, 1, 1, 1, 0)
#define U_CALL_q3_k(MT, MODE, W) U_CALL(MT, MODE, W, 0, 1, 1, 0, 4)
#define U_CALL_q4_k(MT, MODE, W) U_CALL(MT, MODE, W, 0, 0, 1, 1, 0)
#define U_CALL_q5_k(MT, MODE, W) U_CALL(MT, MODE, W, 1, 0, 1, 1, 0)
#define U_CALL_q6_k(MT, MODE, W) U_CALL(MT, MODE, W, 2, 1, 1, 0, 32)
#define Q8_CALL(MT, MODE, W) CAT(group_q8_, W)(p, g, a, m0, MT, y, ldy)  /* unpacking Q8_0 is a load: no scratch */
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
    int q8 = 0;
    for (int64_t i = 0; i < lin->nparts; i++) q8 |= lin->part[i].fmt == LS_Q8_0;
    ls_acts a;
    if ((rc = ls_acts_init(&a, x, M, lin->k, q8))) return rc;
    rc = ls_linear_apply(lin, &a, y);
    ls_acts_free(&a);
    return rc;
}

// Reads n bytes (a multiple of 256) from p on every thread, contiguous halves as a one-row matmul reads its
// weights, and returns their XOR (so that no read can be dropped). benchmarks/memory_ceiling.py times it:
// the rate at which this machine streams weights from DRAM bounds every one-stream decode.
int64_t ls_stream_read(const uint8_t *p, int64_t n) {
    int64_t all = 0;
#pragma omp parallel reduction(^ : all)
    {
        __m256i x = _mm256_setzero_si256();
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n / 256; i++)
            for (int j = 0; j < 8; j++) x = _mm256_xor_si256(x, _mm256_loadu_si256((const __m256i *)(p + 256 * i) + j));
        all ^= _mm256_extract_epi64(x, 0) ^ _mm256_extract_epi64(x, 1) ^ _mm256_extract_epi64(x, 2) ^
               _mm256_extract_epi64(x, 3);
    }
    return all;
}

int64_t ls_abi_version(void) { return LS_ABI_VERSION; }
int64_t ls_sizeof_linear(void) { return (int64_t)sizeof(ls_linear); }
const char *ls_variant(void) { return LS_VARIANT; }
