// group_u and group_q8 (see gemm.c) for VW weight rows at a time, included by gemm.c once per width:
// VW 8, 256-bit vectors, one group of 8 rows (every variant); VW 16, 512-bit vectors, the adjacent groups
// g and g + 1 side by side (the avx512vnni variant: half the instructions per weight for the same
// arithmetic, lane for lane). Each stream of a group is read at its own address plus, for the second
// group, its per-group stride; the layout in memory is the same for both widths.
#if VW == 8
#define VI __m256i
#define VF __m256
#define GROUP_U group_u8
#define GROUP_Q8 group_q8_8
#define LDW(p, st) _mm256_loadu_si256((const __m256i *)(p))
#define LDH(p, st) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))  // 8 float16
#define LDC(p, st) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#define BC4(p) bcast4(p)
#define I8(x) _mm256_set1_epi8(x)
#define F32(x) _mm256_set1_ps(x)
#define IZERO _mm256_setzero_si256()
#define FZERO _mm256_setzero_ps()
#define AND _mm256_and_si256
#define OR _mm256_or_si256
#define SRLI16 _mm256_srli_epi16
#define SLLI16 _mm256_slli_epi16
#define SLLI32 _mm256_slli_epi32
#define ADD32 _mm256_add_epi32
#define SUB32 _mm256_sub_epi32
#define DPB DPBUSD
#define CVTF _mm256_cvtepi32_ps
#define FMUL _mm256_mul_ps
#define FADD _mm256_add_ps
#define FSUB _mm256_sub_ps
#define FMA _mm256_fmadd_ps
#define STF _mm256_storeu_ps
#define ST_SCR(p, v) _mm256_store_si256((__m256i *)(p), v)
#define LD_SCR(p) _mm256_load_si256((const __m256i *)(p))
#define STF_SCR _mm256_store_ps
#define LDF_SCR _mm256_load_ps
#else
#define VI __m512i
#define VF __m512
#define GROUP_U group_u16
#define GROUP_Q8 group_q8_16
#define LDW(p, st) _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(p))), \
                                      _mm256_loadu_si256((const __m256i *)((p) + (st))), 1)
#define LDH(p, st) _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(               \
    _mm_loadu_si128((const __m128i *)(p))), _mm_loadu_si128((const __m128i *)((p) + (st))), 1))
#define LD8X2(p, st) _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)(p)), \
                                        _mm_loadl_epi64((const __m128i *)((p) + (st))))
#define LDC(p, st) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(LD8X2(p, st)))
#define BC4(p) bcast4x16(p)
#define I8(x) _mm512_set1_epi8(x)
#define F32(x) _mm512_set1_ps(x)
#define IZERO _mm512_setzero_si512()
#define FZERO _mm512_setzero_ps()
#define AND _mm512_and_si512
#define OR _mm512_or_si512
#define SRLI16 _mm512_srli_epi16
#define SLLI16 _mm512_slli_epi16
#define SLLI32 _mm512_slli_epi32
#define ADD32 _mm512_add_epi32
#define SUB32 _mm512_sub_epi32
#define DPB _mm512_dpbusd_epi32
#define CVTF _mm512_cvtepi32_ps
#define FMUL _mm512_mul_ps
#define FADD _mm512_add_ps
#define FSUB _mm512_sub_ps
#define FMA _mm512_fmadd_ps
#define STF _mm512_storeu_ps
#define ST_SCR(p, v) _mm512_store_si512((void *)(p), v)
#define LD_SCR(p) _mm512_load_si512((const void *)(p))
#define STF_SCR _mm512_store_ps
#define LDF_SCR _mm512_load_ps
#endif
#define VB (VW * 4)          // bytes of one vector
#define SCR_B (VW * 48)      // scratch per block: 8 unpacked chunks, s8[2] and m8[2]

// Integer dot of chunks [c0, c1) of unsigned weights with activations a: VW rows' int32 sums. With VNNI,
// even and odd chunks go to two sums added at the end (the same integers): one chain of vpdpbusd, each
// waiting ~5 cycles for the last, held 4 activation rows to about one vpdpbusd a cycle (the embedded
// model's Q4_1 layers at M = 64, Zen 4, benchmarks/kernel_ab.py: 0.90-0.92x the time). Without
// VNNI, vpmaddubsw's int16 pairs are widened often enough not to overflow: per lane a chunk adds at most
// 2 x 127 x (2^bits - 1), i.e. 3810 (4-bit), 7874 (5-bit), 16002 (6-bit), under 32767 for 8, 4, 2 chunks.
AI VI CAT(dot_u, VW)(const VI *wv, const int8_t *a, int c0, int c1, const int HI) {
    VI s = IZERO;
#if VW == 16 || LS_VNNI
    (void)HI;
    VI s1 = IZERO;
    int c = c0;
    for (; c + 1 < c1; c += 2) {
        s = DPB(s, wv[c], BC4(a + 4 * c));
        s1 = DPB(s1, wv[c + 1], BC4(a + 4 * c + 4));
    }
    if (c < c1) s = DPB(s, wv[c], BC4(a + 4 * c));
    s = ADD32(s, s1);
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

// VW rows (group g, and g + 1 for VW 16) x MT activation rows from m0, for a nibble format with HI
// high-bit planes, sub-blocks of 16 (SUB16) or 32, K-type scales (KQ), stored mins (HASM) or a zero point
// ZP. With several tiles of activation rows, the first (FILL) keeps the unpacked groups in the thread's
// scratch and the others (READ) take them from there: a group is unpacked once per pass, not once per 4
// activation rows.
AI void GROUP_U(const ls_part *p, int64_t g, const ls_acts *a, int64_t m0, int MT, const int HI,
                const int SUB16, const int KQ, const int HASM, const int ZP, float *y, int64_t ldy,
                const int MODE, uint8_t *scr) {
    const int64_t K = a->K, nb = K / QK, ns = SUB16 ? 2 : 1;
    const int64_t nscale = KQ ? nb / 8 : nb;
    const int SM16 = KQ && HASM && !SUB16;  // Q4_K, Q5_K: 8 scales then 8 mins, a byte each, in sc
    // Per-group strides (bytes) of each stream: the second group of a 16-row pass is one stride on.
    const int64_t lo_st = nb * 128, hi_st = nb * 32 * HI, d_st = nscale * 8 * 2;
    const int64_t sc_st = nb * (SM16 ? 16 : ns * 8);
    const uint8_t *lo = (const uint8_t *)p->q + g * lo_st;
    const uint8_t *hi = HI ? p->hi + g * hi_st : NULL;
    const uint8_t *d = (const uint8_t *)(p->d + g * nscale * 8);
    const uint8_t *m = HASM ? (const uint8_t *)(p->m + g * nscale * 8) : NULL;
    const uint8_t *sc = KQ ? (const uint8_t *)p->sc + g * sc_st : NULL;
    const uint8_t *mn = KQ && HASM && !SM16 ? (const uint8_t *)p->mn + g * sc_st : NULL;
    (void)d_st, (void)hi_st, (void)sc_st, (void)lo_st;
    const VI low = I8(0x0f), bit4 = I8(0x10), bits45 = I8(0x30);
    VF acc[MTILE], accm[MTILE], dS = FZERO, mS = FZERO;
    for (int j = 0; j < MTILE; j++) acc[j] = accm[j] = FZERO;
    for (int64_t b = 0; b < nb; b++) {
        VI wv[8];
        VF s8[2] = {FZERO, FZERO}, m8[2] = {FZERO, FZERO};
        uint8_t *sb = scr + b * SCR_B;
        if (MODE == READ) {
            for (int c = 0; c < 8; c++) wv[c] = LD_SCR(sb + VB * c);
            for (int h = 0; h < 2; h++) {
                s8[h] = LDF_SCR((const float *)(sb + 8 * VB) + VW * h);
                m8[h] = LDF_SCR((const float *)(sb + 8 * VB) + 2 * VW + VW * h);
            }
            goto dot;
        }
        _mm_prefetch((const char *)(lo + (b + PF) * 128), _MM_HINT_T0);
        _mm_prefetch((const char *)(lo + (b + PF) * 128 + 64), _MM_HINT_T0);
        if (VW == 16) {
            _mm_prefetch((const char *)(lo + lo_st + (b + PF) * 128), _MM_HINT_T0);
            _mm_prefetch((const char *)(lo + lo_st + (b + PF) * 128 + 64), _MM_HINT_T0);
        }
        if (HI) {
            _mm_prefetch((const char *)(hi + (b + PF) * 32 * HI), _MM_HINT_T0);
            if (VW == 16) _mm_prefetch((const char *)(hi + hi_st + (b + PF) * 32 * HI), _MM_HINT_T0);
        }
#if PF_L2  // the low nibbles PF_L2 blocks on into L2 as well (gemm.c; the high-bit planes: no gain)
        _mm_prefetch((const char *)(lo + (b + PF_L2) * 128), _MM_HINT_T1);
        _mm_prefetch((const char *)(lo + (b + PF_L2) * 128 + 64), _MM_HINT_T1);
        if (VW == 16) {
            _mm_prefetch((const char *)(lo + lo_st + (b + PF_L2) * 128), _MM_HINT_T1);
            _mm_prefetch((const char *)(lo + lo_st + (b + PF_L2) * 128 + 64), _MM_HINT_T1);
        }
#endif
#ifndef NO_PF_SCALES
        // K types' scale streams too (a few bytes a block, but each a stream of its own whose misses stall
        // the block as a nibble miss would): 7B-shaped one-row matmuls from DRAM, Zen 4, six alternated
        // pairs, Q4_K 27.3 -> 30.2 GB/s and Q6_K 28.6 -> 30.7 on average. (The served 7B one-stream
        // figure did not move with it: BENCHMARKS.md.)
        if (KQ) {
            const int64_t scb = SM16 ? 16 : ns * 8;
            _mm_prefetch((const char *)(sc + (b + PF) * scb), _MM_HINT_T0);
            if (VW == 16) _mm_prefetch((const char *)(sc + sc_st + (b + PF) * scb), _MM_HINT_T0);
            if (mn) _mm_prefetch((const char *)(mn + (b + PF) * scb), _MM_HINT_T0);
            if (mn && VW == 16) _mm_prefetch((const char *)(mn + sc_st + (b + PF) * scb), _MM_HINT_T0);
            if (b % 8 == 0) {
                _mm_prefetch((const char *)(d + (b / 8 + 2) * 16), _MM_HINT_T0);
                if (VW == 16) _mm_prefetch((const char *)(d + d_st + (b / 8 + 2) * 16), _MM_HINT_T0);
                if (HASM) {
                    _mm_prefetch((const char *)(m + (b / 8 + 2) * 16), _MM_HINT_T0);
                    if (VW == 16) _mm_prefetch((const char *)(m + d_st + (b / 8 + 2) * 16), _MM_HINT_T0);
                }
            }
        }
#endif
        for (int c = 0; c < 4; c++) {
            const VI v = LDW(lo + b * 128 + 32 * c, lo_st);
            wv[c] = AND(v, low);
            wv[c + 4] = AND(SRLI16(v, 4), low);
        }
        // One shift and one mask put a chunk's high bits in place (they never cross a byte: see formats.py).
        if (HI == 1) {  // bit 4 of value 4c + e is bit c of byte [r][e]
            const VI v = LDW(hi + b * 32, hi_st);
            for (int c = 0; c < 8; c++) {
                const VI t = c <= 4 ? SLLI16(v, 4 - c) : SRLI16(v, c - 4);
                wv[c] = OR(wv[c], AND(t, bit4));
            }
        } else if (HI == 2) {  // bits 4-5 of value 4 (4h + j) + e are bits 2j, 2j + 1 of vector h's byte [r][e]
            for (int h = 0; h < 2; h++) {
                const VI v = LDW(hi + b * 64 + 32 * h, hi_st);
                for (int j = 0; j < 4; j++) {
                    const VI t = j <= 2 ? SLLI16(v, 4 - 2 * j) : SRLI16(v, 2);
                    wv[4 * h + j] = OR(wv[4 * h + j], AND(t, bits45));
                }
            }
        }
        if (KQ) {
            if (b % 8 == 0) {  // per super-block
                dS = LDH(d + b / 8 * 16, d_st);
                if (HASM) mS = LDH(m + b / 8 * 16, d_st);
            }
            if (SM16) {
                const uint8_t *r = sc + b * 16;
#if VW == 8
                const __m128i v = _mm_loadu_si128((const __m128i *)r);
                const VI s6 = _mm256_cvtepu8_epi32(v), m6 = _mm256_cvtepu8_epi32(_mm_srli_si128(v, 8));
#else
                const __m128i v0 = _mm_loadu_si128((const __m128i *)r);
                const __m128i v1 = _mm_loadu_si128((const __m128i *)(r + sc_st));
                const VI s6 = _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(v0, v1));
                const VI m6 = _mm512_cvtepu8_epi32(_mm_unpackhi_epi64(v0, v1));
#endif
                s8[0] = FMUL(dS, CVTF(s6));
                m8[0] = FMUL(mS, CVTF(m6));  // subtracted below
            } else
            for (int h = 0; h < ns; h++) {
                s8[h] = FMUL(dS, LDC(sc + (b * ns + h) * 8, sc_st));
                m8[h] = HASM ? FMUL(mS, LDC(mn + (b * ns + h) * 8, sc_st))  // subtracted below
                             : FMUL(s8[h], F32((float)ZP));
            }
        } else {
            s8[0] = LDH(d + b * 16, d_st);
            // Stored mins are added; zero points (m = -zp * scale) are kept positive and subtracted.
            m8[0] = HASM ? LDH(m + b * 16, d_st) : FMUL(s8[0], F32((float)ZP));
        }
        if (MODE == FILL) {
            for (int c = 0; c < 8; c++) ST_SCR(sb + VB * c, wv[c]);
            for (int h = 0; h < 2; h++) {
                STF_SCR((float *)(sb + 8 * VB) + VW * h, s8[h]);
                STF_SCR((float *)(sb + 8 * VB) + 2 * VW + VW * h, m8[h]);
            }
        }
    dot:
        for (int j = 0; j < MT; j++) {
            const int8_t *aj = a->q + (m0 + j) * K + b * QK;
            const VF ad = F32(a->d[(m0 + j) * nb + b]);
            const float *as = a->s + ((m0 + j) * nb + b) * 2;
            if (SUB16) {
                const VI i0 = CAT(dot_u, VW)(wv, aj, 0, 4, HI), i1 = CAT(dot_u, VW)(wv, aj, 4, 8, HI);
                acc[j] = FMA(FMUL(s8[0], ad), CVTF(i0), acc[j]);
                acc[j] = FMA(FMUL(s8[1], ad), CVTF(i1), acc[j]);
                accm[j] = FMA(m8[0], F32(as[0]), accm[j]);
                accm[j] = FMA(m8[1], F32(as[1]), accm[j]);
            } else {
                const VI i0 = CAT(dot_u, VW)(wv, aj, 0, 8, HI);
                acc[j] = FMA(FMUL(s8[0], ad), CVTF(i0), acc[j]);
                if (HASM || ZP) accm[j] = FMA(m8[0], F32(as[0] + as[1]), accm[j]);
            }
        }
    }
    // Stored mins of simple types add; K types' mins and every zero point subtract.
    const int add = HASM && !KQ;
    for (int j = 0; j < MT; j++)
        STF(y + (m0 + j) * ldy + 8 * g, add ? FADD(acc[j], accm[j]) : FSUB(acc[j], accm[j]));
}

AI void GROUP_Q8(const ls_part *p, int64_t g, const ls_acts *a, int64_t m0, int MT, float *y, int64_t ldy) {
    const int64_t K = a->K, nb = K / QK, w_st = nb * 256, d_st = nb * 8 * 2;
    const int8_t *w = (const int8_t *)p->q + g * w_st;
    const uint8_t *d = (const uint8_t *)(p->d + g * nb * 8);
    (void)d_st;
    VF acc[MTILE];
    for (int j = 0; j < MTILE; j++) acc[j] = FZERO;
    for (int64_t b = 0; b < nb; b++) {
        const VF d8 = LDH(d + 16 * b, d_st);
        for (int i = 0; i < 4; i++) _mm_prefetch((const char *)(w + (b + PF) * 256 + 64 * i), _MM_HINT_T0);
        if (VW == 16)
            for (int i = 0; i < 4; i++) _mm_prefetch((const char *)(w + w_st + (b + PF) * 256 + 64 * i), _MM_HINT_T0);
#if PF_L2
        for (int i = 0; i < 4; i++) _mm_prefetch((const char *)(w + (b + PF_L2) * 256 + 64 * i), _MM_HINT_T1);
        if (VW == 16)
            for (int i = 0; i < 4; i++) _mm_prefetch((const char *)(w + w_st + (b + PF_L2) * 256 + 64 * i), _MM_HINT_T1);
#endif
        VI s[MTILE];
        for (int j = 0; j < MT; j++) s[j] = IZERO;
#if LS_VNNI_WIDE
        // The activations biased to unsigned (x + 128) times the signed weights, less 128 x the sum of
        // each row's weights: sum(x w) exactly, in one vpdpbusd per row and chunk (the sign trick below
        // takes three instructions). Even and odd chunks in two chains: a vpdpbusd waits ~5 cycles for the
        // previous one into the same sum. Head of the embedded model (Q8_0 49152 x 576), Zen 4,
        // benchmarks/kernel_ab.py: 0.87-0.89x the time at M = 64, 0.93x at M = 16.
        const uint8_t *au = a->u + m0 * K + b * QK;
        VI wsum[2] = {IZERO, IZERO}, s2[MTILE];
        for (int j = 0; j < MT; j++) s2[j] = IZERO;
        for (int c = 0; c < 8; c += 2) {
            const VI v0 = LDW(w + b * 256 + 32 * c, w_st), v1 = LDW(w + b * 256 + 32 * c + 32, w_st);
            wsum[0] = DPB(wsum[0], I8(1), v0);
            wsum[1] = DPB(wsum[1], I8(1), v1);
            for (int j = 0; j < MT; j++) {
                s[j] = DPB(s[j], BC4((const int8_t *)au + j * K + 4 * c), v0);
                s2[j] = DPB(s2[j], BC4((const int8_t *)au + j * K + 4 * c + 4), v1);
            }
        }
        const VI corr = SLLI32(ADD32(wsum[0], wsum[1]), 7);
        for (int j = 0; j < MT; j++) s[j] = SUB32(ADD32(s[j], s2[j]), corr);
#else
        for (int c = 0; c < 8; c++) {
            const VI v = LDW(w + b * 256 + 32 * c, w_st);
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
#endif
        for (int j = 0; j < MT; j++)
            acc[j] = FMA(FMUL(d8, F32(a->d[(m0 + j) * nb + b])), CVTF(s[j]), acc[j]);
    }
    for (int j = 0; j < MT; j++) STF(y + (m0 + j) * ldy + 8 * g, acc[j]);
}

#undef VI
#undef VF
#undef GROUP_U
#undef GROUP_Q8
#undef LDW
#undef LDH
#undef LD8X2
#undef LDC
#undef BC4
#undef I8
#undef F32
#undef IZERO
#undef FZERO
#undef AND
#undef OR
#undef SRLI16
#undef SLLI16
#undef SLLI32
#undef ADD32
#undef SUB32
#undef DPB
#undef CVTF
#undef FMUL
#undef FADD
#undef FSUB
#undef FMA
#undef STF
#undef ST_SCR
#undef LD_SCR
#undef STF_SCR
#undef LDF_SCR
#undef VB
#undef SCR_B
