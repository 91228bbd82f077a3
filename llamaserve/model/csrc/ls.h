// The C ABI of llamaserve's CPU kernels (mirrored by ctypes structures in model/native.py) and the
// per-ISA primitives. One source builds every variant: avx2 (AVX2 + FMA + F16C), avxvnni and avx512vnni
// (the same code with VNNI's vpdpbusd for the u8 x s8 dot products, in its VEX or EVEX encoding; the
// avx512vnni matmuls also run 16 weight rows at a time in 512-bit vectors, gemm.c and group.h).
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define LS_ABI_VERSION 6
#define LS_MAX_PARTS 3
#define LS_OK 0
#define LS_ENOMEM (-1)
#define LS_EINVAL (-2)
#define QK 32  // values per block: activations and weights are quantized per block of 32

// Weight formats (see gemm.c for the layouts). The numbering is part of the ABI.
enum {
    LS_Q4_0 = 1, LS_Q4_1, LS_Q5_0, LS_Q5_1, LS_Q8_0, LS_Q2_K, LS_Q3_K, LS_Q4_K, LS_Q5_K, LS_Q6_K,
    LS_NUM_FORMATS
};

// One stack of rows of a linear's weight in one format; a linear is 1..3 parts side by side in its
// output (a fused q/k/v whose v is Q6_K while q and k are Q4_K has three). Every field is 8 bytes.
typedef struct {
    int64_t fmt, rows;       // LS_*, rows of this part (a multiple of 8)
    const void *q;           // low nibbles (uint8), or int8 values for Q8_0
    const uint8_t *hi;       // high-bit planes (5- and 6-bit formats), else NULL
    const uint16_t *d, *m;   // float16: scale and min per block; per super-block for K formats
    const int8_t *sc, *mn;   // K formats: integer scale (and min) per sub-block, else NULL (Q4_K and
                             // Q5_K: both in sc, 16 bytes per block of 8 rows; mn NULL)
} ls_part;

typedef struct {
    int64_t k, n, nparts;    // in_features (a multiple of 32), out_features (sum of the parts' rows)
    ls_part part[LS_MAX_PARTS];
} ls_linear;

// Activations quantized to int8 per block of 32: scale d per block, d * sum(q) per half block.
typedef struct {
    int8_t *q;
    uint8_t *u;  // q + 128 (as q ^ 0x80), for VNNI's unsigned operand when the weights are signed
                 // (Q8_0); NULL where no part needs it
    float *d, *s;
    int64_t M, K;
} ls_acts;

// One layer's paged KV pool: slot s holds a token's keys (heads 0..heads/2-1) then its values, each head
// `dim` values in `dtype`; LS_KV_I8 adds a float32 scale per slot and head (value = int8 x scale).
enum { LS_KV_F32 = 0, LS_KV_BF16, LS_KV_F16, LS_KV_I8, LS_KV_NUM_DTYPES };
typedef struct {
    int64_t dtype, slots, heads, dim;  // LS_KV_*, pool slots, 2 x kv heads, head dim (a multiple of 8)
    void *data;                         // [slots, heads, dim]
    float *scale;                       // LS_KV_I8: [slots, heads]; else NULL
} ls_kv;

int ls_kv_check(const ls_kv *kv);
int ls_kv_store(const ls_kv *kv, const float *src, int64_t src_stride, const int64_t *slot, int64_t T);
int ls_attention(const ls_kv *kv, const float *q, int64_t q_stride, int64_t H, int64_t B,
                 const int64_t *q_lens, const int64_t *ctx_slots, int64_t L, const int64_t *ctx_lens,
                 float *out, int64_t out_stride);

int ls_acts_init(ls_acts *a, const float *x, int64_t M, int64_t K, int with_u);
void ls_acts_free(ls_acts *a);
int ls_linear_check(const ls_linear *lin);
int ls_linear_apply(const ls_linear *lin, const ls_acts *a, float *y);
int ls_matmul(const ls_linear *lin, const float *x, int64_t M, float *y);

#if defined(LS_AVX512VNNI)
#define LS_VARIANT "avx512vnni"
#define DPBUSD(acc, u, s) _mm256_dpbusd_epi32((acc), (u), (s))
#define LS_VNNI 1
#define LS_VNNI_WIDE 1  // DPBUSD's pair sums are exact in int32 (the emulation's saturate in int16)
#elif defined(LS_AVXVNNI)
#define LS_VARIANT "avxvnni"
#define DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32((acc), (u), (s))
#define LS_VNNI 1
#define LS_VNNI_WIDE 1
#elif defined(LS_VNNI_EMULATED)
// The VNNI code path on plain AVX2, for testing it where no CPU here has VNNI: vpdpbusd is emulated with
// vpmaddubsw + vpmaddwd, exact for our operands (a pair sums to at most 2 x 128 x 127 < 32767).
#define LS_VARIANT "vnni-emulated"
#define DPBUSD(acc, u, s) \
    _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((u), (s)), _mm256_set1_epi16(1)))
#define LS_VNNI 1
#else
#define LS_VARIANT "avx2"
#define LS_VNNI 0
#endif
#ifndef LS_VNNI_WIDE
#define LS_VNNI_WIDE 0
#endif

#define AI static inline __attribute__((always_inline))

AI __m256i bcast4(const int8_t *p) {  // 4 int8 activations to all 8 lanes
    int32_t v;
    memcpy(&v, p, sizeof v);  // (no aliasing of int8 memory through an int32 pointer)
    return _mm256_set1_epi32(v);
}

AI float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AI int hsum8i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

// exp for 8 floats (Cephes' expf polynomial, about 1 ulp), x clamped to [-87.3, 88.3].
AI __m256 exp8(__m256 x) {
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
