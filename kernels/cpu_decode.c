/* Rejoinder's CPU decode step: one token for each of B sequences through a Llama-family decoder,
 * weights left in their GGUF block quantisation and dequantised in registers, fp32 activations
 * throughout.
 *
 * Why C and not torch ops: at batch 1 a token is ~210 matrix-vector products plus ~400 small ops.
 * torch's packed int4/int8 CPU kernels are only fast with bf16 activations (which would change the
 * model's outputs), and eager torch spends a few milliseconds per token on dispatch alone. Here one
 * call runs the whole step, so Python costs one ctypes call per step.
 *
 * Batches (rj_decode_batch): B sessions, each at its own position in its own KV-cache slot, step
 * together. Each weight row is read and its blocks unpacked once for up to RJ_TILE activation
 * vectors, which is where batching pays on a memory-bound step. Every vector goes through exactly
 * the arithmetic it would go through alone (same operations, same order), so a sequence's logits
 * are bit-for-bit the same whatever else shares its batch, and B = 1 is the single-token step.
 *
 * Weight rows use ggml's own block layouts (32 weights per block):
 *   Q4_0: fp16 d, 16 bytes of nibbles;            w = d * (q - 8)
 *   Q4_1: fp16 d, fp16 m, 16 bytes of nibbles;    w = d * q + m
 *   Q8_0: fp16 d, 32 x int8;                      w = d * q
 *   F32 : plain floats.
 * In a Q4 block, byte j holds element j in its low nibble and element j + 16 in its high nibble.
 * A Q4 block dot is computed as d * sum(q * x) + m * sum(x): the same weights as the fp32 reference,
 * only the summation order differs (~1e-7 relative).
 *
 * Built by kernels/cpu_native.py with the host compiler and -march=native; the AVX-512 and AVX2
 * paths are chosen at compile time, with a portable C path for anything else.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

enum { RJ_F32 = 0, RJ_Q4_0 = 2, RJ_Q4_1 = 3, RJ_Q8_0 = 8 }; /* ggml type ids */
#define QK 32

typedef struct {
    const void *data; /* rows * row_bytes(type, cols) bytes */
    int32_t type;
    int32_t rows, cols;
} rj_weight;

typedef struct {
    rj_weight wq, wk, wv, wo, w_gate, w_up, w_down;
    const float *bq, *bk, *bv; /* NULL without attention bias */
    const float *attn_norm, *ffn_norm;
    float *k_cache, *v_cache; /* [n_slots, n_kv_heads, max_seq, head_dim] */
} rj_layer;

typedef struct {
    int32_t dim, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, vocab, max_seq, threads;
    int32_t n_slots; /* KV-cache slots (one per session) in every layer's cache */
    float norm_eps;
    const float *embed;              /* [vocab, dim] */
    const float *rope_cos, *rope_sin; /* [max_seq, head_dim / 2], rotate-half convention */
    const float *final_norm;
    rj_weight output;
    const rj_layer *layers;
} rj_model;

/* Offset of (slot, kv head, position) in a layer's K or V cache, in floats. */
static inline size_t cache_at(const rj_model *m, int slot, int head, int pos) {
    return (((size_t)slot * m->n_kv_heads + head) * m->max_seq + pos) * m->head_dim;
}

/* ------------------------------------------------------------------------------------------------
 * fp16 -> fp32 */

static inline float fp16_to_fp32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) { mant <<= 1; exp--; }
            bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline float load_fp16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return fp16_to_fp32(h);
}

size_t rj_row_bytes(int32_t type, int32_t cols) {
    switch (type) {
    case RJ_F32: return (size_t)cols * 4;
    case RJ_Q4_0: return (size_t)cols / QK * 18;
    case RJ_Q4_1: return (size_t)cols / QK * 20;
    case RJ_Q8_0: return (size_t)cols / QK * 34;
    default: return 0;
    }
}

/* ------------------------------------------------------------------------------------------------
 * Row dot products against up to RJ_TILE activation vectors at once.
 *
 * A weight row's blocks are unpacked (nibbles / int8 -> fp32 lanes) once and multiplied into every
 * vector; each vector's sum is formed exactly as it would be alone (two accumulator chains, even
 * and odd blocks, then the horizontal sum, plus the Q4 minimum term summed block by block), so the
 * result for a vector does not depend on how many others share the pass. Vector v lives at
 * x + v * ldx; `xsum + v * ldxs` holds the sums of its 32-element blocks (for the Q4 minimum term). */

#if defined(__AVX512F__)
#define RJ_TILE 8 /* 2 * 8 accumulators + 4 unpacked blocks fit the 32 zmm registers */
#else
#define RJ_TILE 4 /* AVX2 has 16 ymm registers: 2 * 4 accumulators + one unpacked block */
#endif

#define ALWAYS_INLINE inline __attribute__((always_inline))

#if defined(__AVX512F__)
/* The 32 codes of a Q4 block: elements 0-15 (low nibbles) and 16-31 (high nibbles). */
static ALWAYS_INLINE void q4_unpack(const uint8_t *qs, __m512 *lo, __m512 *hi) {
    const __m128i mask = _mm_set1_epi8(0x0f);
    __m128i b = _mm_loadu_si128((const __m128i *)qs);
    *lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, mask)));
    *hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), mask)));
}
static ALWAYS_INLINE __m512 q4_dot(__m512 lo, __m512 hi, const float *x) {
    return _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(x)));
}

static ALWAYS_INLINE void dots_q4(const uint8_t *row, const float *x, size_t ldx, const float *xsum, size_t ldxs,
                                  int nb, int has_min, const int nv, float *out) {
    const int bytes = has_min ? 20 : 18, qoff = has_min ? 4 : 2;
    __m512 acc0[RJ_TILE], acc1[RJ_TILE]; /* two chains per vector hide FMA latency */
    float offset[RJ_TILE];
    for (int v = 0; v < nv; v++) {
        acc0[v] = acc1[v] = _mm512_setzero_ps();
        offset[v] = 0.0f;
    }
    int g = 0;
    for (; g + 1 < nb; g += 2) {
        const uint8_t *b0 = row + (size_t)g * bytes, *b1 = b0 + bytes;
        const float f0 = load_fp16(b0), f1 = load_fp16(b1);
        const float m0 = has_min ? load_fp16(b0 + 2) : -8.0f * f0, m1 = has_min ? load_fp16(b1 + 2) : -8.0f * f1;
        const __m512 d0 = _mm512_set1_ps(f0), d1 = _mm512_set1_ps(f1);
        __m512 lo0, hi0, lo1, hi1;
        q4_unpack(b0 + qoff, &lo0, &hi0);
        q4_unpack(b1 + qoff, &lo1, &hi1);
        for (int v = 0; v < nv; v++) {
            const float *xv = x + v * ldx + (size_t)g * QK;
            acc0[v] = _mm512_fmadd_ps(d0, q4_dot(lo0, hi0, xv), acc0[v]);
            acc1[v] = _mm512_fmadd_ps(d1, q4_dot(lo1, hi1, xv + QK), acc1[v]);
            offset[v] += m0 * xsum[v * ldxs + g];
            offset[v] += m1 * xsum[v * ldxs + g + 1];
        }
    }
    for (; g < nb; g++) {
        const uint8_t *b0 = row + (size_t)g * bytes;
        const float f0 = load_fp16(b0), m0 = has_min ? load_fp16(b0 + 2) : -8.0f * f0;
        const __m512 d0 = _mm512_set1_ps(f0);
        __m512 lo0, hi0;
        q4_unpack(b0 + qoff, &lo0, &hi0);
        for (int v = 0; v < nv; v++) {
            acc0[v] = _mm512_fmadd_ps(d0, q4_dot(lo0, hi0, x + v * ldx + (size_t)g * QK), acc0[v]);
            offset[v] += m0 * xsum[v * ldxs + g];
        }
    }
    for (int v = 0; v < nv; v++) out[v] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[v], acc1[v])) + offset[v];
}

static ALWAYS_INLINE void dots_q8_0(const uint8_t *row, const float *x, size_t ldx, int nb, const int nv, float *out) {
    __m512 acc0[RJ_TILE], acc1[RJ_TILE];
    for (int v = 0; v < nv; v++) acc0[v] = acc1[v] = _mm512_setzero_ps();
    for (int g = 0; g < nb; g++) {
        const uint8_t *b = row + (size_t)g * 34;
        const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 2))));
        const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 18))));
        const __m512 d = _mm512_set1_ps(load_fp16(b));
        for (int v = 0; v < nv; v++) {
            const float *xv = x + v * ldx + (size_t)g * QK;
            __m512 t = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xv + 16), _mm512_mul_ps(q0, _mm512_loadu_ps(xv)));
            if (g & 1)
                acc1[v] = _mm512_fmadd_ps(d, t, acc1[v]);
            else
                acc0[v] = _mm512_fmadd_ps(d, t, acc0[v]);
        }
    }
    for (int v = 0; v < nv; v++) out[v] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[v], acc1[v]));
}
#elif defined(__AVX2__)
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* The 32 codes of a Q4 block as four 8-lane vectors: elements 0-7, 8-15 (low nibbles), 16-23, 24-31. */
static ALWAYS_INLINE void q4_unpack(const uint8_t *qs, __m256 w[4]) {
    const __m128i mask = _mm_set1_epi8(0x0f);
    __m128i b = _mm_loadu_si128((const __m128i *)qs);
    __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}
static ALWAYS_INLINE __m256 q4_dot(const __m256 w[4], const float *x) {
    __m256 t = _mm256_mul_ps(w[0], _mm256_loadu_ps(x));
    t = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x + 8), t);
    t = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x + 16), t);
    return _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x + 24), t);
}

static ALWAYS_INLINE void dots_q4(const uint8_t *row, const float *x, size_t ldx, const float *xsum, size_t ldxs,
                                  int nb, int has_min, const int nv, float *out) {
    const int bytes = has_min ? 20 : 18, qoff = has_min ? 4 : 2;
    __m256 acc0[RJ_TILE], acc1[RJ_TILE], w[4];
    float offset[RJ_TILE];
    for (int v = 0; v < nv; v++) {
        acc0[v] = acc1[v] = _mm256_setzero_ps();
        offset[v] = 0.0f;
    }
    int g = 0;
    for (; g + 1 < nb; g += 2) { /* one block unpacked at a time: registers are scarce */
        const uint8_t *b0 = row + (size_t)g * bytes, *b1 = b0 + bytes;
        const float f0 = load_fp16(b0), f1 = load_fp16(b1);
        const float m0 = has_min ? load_fp16(b0 + 2) : -8.0f * f0, m1 = has_min ? load_fp16(b1 + 2) : -8.0f * f1;
        const __m256 d0 = _mm256_set1_ps(f0), d1 = _mm256_set1_ps(f1);
        q4_unpack(b0 + qoff, w);
        for (int v = 0; v < nv; v++) acc0[v] = _mm256_fmadd_ps(d0, q4_dot(w, x + v * ldx + (size_t)g * QK), acc0[v]);
        q4_unpack(b1 + qoff, w);
        for (int v = 0; v < nv; v++) {
            acc1[v] = _mm256_fmadd_ps(d1, q4_dot(w, x + v * ldx + (size_t)(g + 1) * QK), acc1[v]);
            offset[v] += m0 * xsum[v * ldxs + g];
            offset[v] += m1 * xsum[v * ldxs + g + 1];
        }
    }
    for (; g < nb; g++) {
        const uint8_t *b0 = row + (size_t)g * bytes;
        const float f0 = load_fp16(b0), m0 = has_min ? load_fp16(b0 + 2) : -8.0f * f0;
        const __m256 d0 = _mm256_set1_ps(f0);
        q4_unpack(b0 + qoff, w);
        for (int v = 0; v < nv; v++) {
            acc0[v] = _mm256_fmadd_ps(d0, q4_dot(w, x + v * ldx + (size_t)g * QK), acc0[v]);
            offset[v] += m0 * xsum[v * ldxs + g];
        }
    }
    for (int v = 0; v < nv; v++) out[v] = hsum256(_mm256_add_ps(acc0[v], acc1[v])) + offset[v];
}

static ALWAYS_INLINE void dots_q8_0(const uint8_t *row, const float *x, size_t ldx, int nb, const int nv, float *out) {
    __m256 acc[RJ_TILE], w[4];
    for (int v = 0; v < nv; v++) acc[v] = _mm256_setzero_ps();
    for (int g = 0; g < nb; g++) {
        const uint8_t *b = row + (size_t)g * 34;
        for (int h = 0; h < 4; h++)
            w[h] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 2 + 8 * h))));
        const __m256 d = _mm256_set1_ps(load_fp16(b));
        for (int v = 0; v < nv; v++) {
            const float *xv = x + v * ldx + (size_t)g * QK;
            __m256 t = _mm256_setzero_ps();
            for (int h = 0; h < 4; h++) t = _mm256_fmadd_ps(w[h], _mm256_loadu_ps(xv + 8 * h), t);
            acc[v] = _mm256_fmadd_ps(d, t, acc[v]);
        }
    }
    for (int v = 0; v < nv; v++) out[v] = hsum256(acc[v]);
}
#else
static ALWAYS_INLINE void dots_q4(const uint8_t *row, const float *x, size_t ldx, const float *xsum, size_t ldxs,
                                  int nb, int has_min, const int nv, float *out) {
    const int bytes = has_min ? 20 : 18, qoff = has_min ? 4 : 2;
    float total[RJ_TILE], offset[RJ_TILE], lo[16], hi[16];
    for (int v = 0; v < nv; v++) total[v] = offset[v] = 0.0f;
    for (int g = 0; g < nb; g++) {
        const uint8_t *b = row + (size_t)g * bytes, *qs = b + qoff;
        const float d = load_fp16(b), m = has_min ? load_fp16(b + 2) : -8.0f * d;
        for (int j = 0; j < 16; j++) {
            lo[j] = (float)(qs[j] & 15);
            hi[j] = (float)(qs[j] >> 4);
        }
        for (int v = 0; v < nv; v++) {
            const float *xb = x + v * ldx + (size_t)g * QK;
            float s = 0.0f;
            for (int j = 0; j < 16; j++) s += lo[j] * xb[j] + hi[j] * xb[j + 16];
            total[v] += d * s;
            offset[v] += m * xsum[v * ldxs + g];
        }
    }
    for (int v = 0; v < nv; v++) out[v] = total[v] + offset[v];
}

static ALWAYS_INLINE void dots_q8_0(const uint8_t *row, const float *x, size_t ldx, int nb, const int nv, float *out) {
    float total[RJ_TILE], q[QK];
    for (int v = 0; v < nv; v++) total[v] = 0.0f;
    for (int g = 0; g < nb; g++) {
        const uint8_t *b = row + (size_t)g * 34;
        const float d = load_fp16(b);
        for (int j = 0; j < QK; j++) q[j] = (float)((const int8_t *)(b + 2))[j];
        for (int v = 0; v < nv; v++) {
            const float *xb = x + v * ldx + (size_t)g * QK;
            float s = 0.0f;
            for (int j = 0; j < QK; j++) s += q[j] * xb[j];
            total[v] += d * s;
        }
    }
    for (int v = 0; v < nv; v++) out[v] = total[v];
}
#endif

static float dot_f32(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.0f;
#if defined(__AVX512F__)
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif defined(__AVX2__)
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    s = hsum256(_mm256_add_ps(acc0, acc1));
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static void block_sums(const float *x, int n, float *xsum) {
    for (int g = 0; g < n / QK; g++) {
        float s = 0.0f;
        for (int j = 0; j < QK; j++) s += x[g * QK + j];
        xsum[g] = s;
    }
}

/* out[v] = W[row] . x_v for v < nv, nv a compile-time constant after inlining */
static ALWAYS_INLINE void row_dots_nv(const rj_weight *w, const uint8_t *row, const float *x, size_t ldx,
                                      const float *xsum, size_t ldxs, const int nv, float *out) {
    switch (w->type) {
    case RJ_Q4_1: dots_q4(row, x, ldx, xsum, ldxs, w->cols / QK, 1, nv, out); return;
    case RJ_Q4_0: dots_q4(row, x, ldx, xsum, ldxs, w->cols / QK, 0, nv, out); return;
    case RJ_Q8_0: dots_q8_0(row, x, ldx, w->cols / QK, nv, out); return;
    default: /* fp32: the row stays in L1 for the vectors after the first */
        for (int v = 0; v < nv; v++) out[v] = dot_f32((const float *)row, x + v * ldx, w->cols);
    }
}

/* One tile of nv (compile-time constant after inlining) vectors: the row loop with everything inlined. */
static ALWAYS_INLINE void matvec_tile(const rj_weight *w, const float *x, size_t ldx, const float *xsum, size_t ldxs,
                                      const int nv, float *y, size_t ldy, int accumulate) {
    const size_t row_bytes = rj_row_bytes(w->type, w->cols);
#pragma omp for schedule(static)
    for (int r = 0; r < w->rows; r++) {
        float out[RJ_TILE];
        row_dots_nv(w, (const uint8_t *)w->data + (size_t)r * row_bytes, x, ldx, xsum, ldxs, nv, out);
        for (int v = 0; v < nv; v++) {
            float *dst = y + (size_t)v * ldy + r;
            *dst = accumulate ? *dst + out[v] : out[v];
        }
    }
}

/* Y[v][r] (+)= W[r] . X[v] for every row r and v < nv (row strides ldx, ldy; block sums ldxs):
 * each weight row is read once per RJ_TILE vectors. Rows are shared out among the threads of an
 * enclosing parallel region (or all done here when called outside one). */
static void matvec_n(const rj_weight *w, const float *x, size_t ldx, const float *xsum, size_t ldxs, int nv,
                     float *y, size_t ldy, int accumulate) {
    for (int v0 = 0; v0 < nv; v0 += RJ_TILE) {
        const float *xt = x + v0 * ldx, *st = xsum + v0 * ldxs;
        float *yt = y + v0 * ldy;
        switch (nv - v0 < RJ_TILE ? nv - v0 : RJ_TILE) { /* a copy per vector count: accumulators in registers */
        case 1: matvec_tile(w, xt, ldx, st, ldxs, 1, yt, ldy, accumulate); break;
        case 2: matvec_tile(w, xt, ldx, st, ldxs, 2, yt, ldy, accumulate); break;
        case 3: matvec_tile(w, xt, ldx, st, ldxs, 3, yt, ldy, accumulate); break;
        case 4: matvec_tile(w, xt, ldx, st, ldxs, 4, yt, ldy, accumulate); break;
#if RJ_TILE > 4
        case 5: matvec_tile(w, xt, ldx, st, ldxs, 5, yt, ldy, accumulate); break;
        case 6: matvec_tile(w, xt, ldx, st, ldxs, 6, yt, ldy, accumulate); break;
        case 7: matvec_tile(w, xt, ldx, st, ldxs, 7, yt, ldy, accumulate); break;
        case 8: matvec_tile(w, xt, ldx, st, ldxs, 8, yt, ldy, accumulate); break;
#endif
        default: break;
        }
    }
}

/* ------------------------------------------------------------------------------------------------
 * Small ops (one thread; they are a few microseconds each) */

static void rms_norm(const float *x, const float *weight, float *out, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * inv * weight[i];
}

static void rope(float *v, int heads, int hd, const float *cos_row, const float *sin_row) {
    int half = hd / 2;
    for (int h = 0; h < heads; h++) {
        float *x = v + h * hd;
        for (int i = 0; i < half; i++) {
            float a = x[i], b = x[i + half];
            x[i] = a * cos_row[i] - b * sin_row[i];
            x[i + half] = b * cos_row[i] + a * sin_row[i];
        }
    }
}

/* The `group` query heads that share one KV head, over its cache rows 0..len-1: each K and V row is
 * read once for the whole group (GQA), which is what bounds attention at long contexts.
 * `scores` holds group * len floats. */
static void attend_group(const float *q, const float *k, const float *v, int len, int hd, int group,
                         float *scores, float *out) {
    const float scale = 1.0f / sqrtf((float)hd);
    for (int t = 0; t < len; t++) {
        const float *kt = k + (size_t)t * hd;
        for (int g = 0; g < group; g++) scores[(size_t)g * len + t] = dot_f32(q + g * hd, kt, hd) * scale;
    }
    for (int g = 0; g < group; g++) {
        float *s = scores + (size_t)g * len, top = -INFINITY, denom = 0.0f;
        for (int t = 0; t < len; t++) top = s[t] > top ? s[t] : top;
        for (int t = 0; t < len; t++) {
            s[t] = expf(s[t] - top);
            denom += s[t];
        }
        for (int t = 0; t < len; t++) s[t] /= denom;
    }
    for (int i = 0; i < group * hd; i++) out[i] = 0.0f;
    for (int t = 0; t < len; t++) {
        const float *vt = v + (size_t)t * hd;
        for (int g = 0; g < group; g++) {
            const float p = scores[(size_t)g * len + t];
            float *o = out + g * hd;
            for (int i = 0; i < hd; i++) o[i] += p * vt[i];
        }
    }
}

/* The rest of a layer for n rows, after attention wrote `att`: the output projection (residual add
 * fused), the FFN norm and the SwiGLU FFN (residual add fused). Called inside the parallel region:
 * its loops are shared out among the threads. Used by the step and the prefill alike. */
static void layer_out_and_ffn(const rj_model *m, const rj_layer *L, int n, float *att, float *x, float *h,
                              float *gate, float *up, float *xsum, size_t xs) {
    const int dim = m->dim, qd = m->n_heads * m->head_dim, ffn = m->ffn_dim;
#pragma omp for schedule(static)
    for (int i = 0; i < n; i++) block_sums(att + (size_t)i * qd, qd, xsum + i * xs);
    matvec_n(&L->wo, att, qd, xsum, xs, n, x, dim, 1); /* residual add fused */
#pragma omp for schedule(static)
    for (int i = 0; i < n; i++) {
        rms_norm(x + (size_t)i * dim, L->ffn_norm, h + (size_t)i * dim, dim, m->norm_eps);
        block_sums(h + (size_t)i * dim, dim, xsum + i * xs);
    }
    matvec_n(&L->w_gate, h, dim, xsum, xs, n, gate, ffn, 0);
    matvec_n(&L->w_up, h, dim, xsum, xs, n, up, ffn, 0);
#pragma omp for schedule(static)
    for (int i = 0; i < n; i++) {
        float *gi = gate + (size_t)i * ffn, *ui = up + (size_t)i * ffn;
        for (int e = 0; e < ffn; e++) gi[e] = gi[e] / (1.0f + expf(-gi[e])) * ui[e];
        block_sums(gi, ffn, xsum + i * xs);
    }
    matvec_n(&L->w_down, gate, ffn, xsum, xs, n, x, dim, 1);
}

/* ------------------------------------------------------------------------------------------------
 * The step: one token for each of n sequences, sequence i at position positions[i] of cache slot
 * slots[i] (the slot holds positions 0..positions[i]-1 of that sequence). */

static size_t xsum_stride(const rj_model *m) {
    size_t qd = (size_t)m->n_heads * m->head_dim, wide = (size_t)(m->ffn_dim > m->dim ? m->ffn_dim : m->dim);
    return (qd > wide ? qd : wide) / QK + 1;
}

size_t rj_decode_floats(const rj_model *m, int32_t n) {
    size_t qd = (size_t)m->n_heads * m->head_dim, kvd = (size_t)m->n_kv_heads * m->head_dim;
    /* per sequence: x, h, q, k, v, att, gate, up, block sums, attention scores */
    return (size_t)n * (2 * (size_t)m->dim + 2 * qd + 2 * kvd + 2 * (size_t)m->ffn_dim + xsum_stride(m) +
                        (size_t)m->n_heads * m->max_seq);
}

/* Writes n * vocab logits (sequence i's at logits + i * vocab). `work` holds rj_decode_floats(m, n)
 * floats. Returns 0, or -1 when a token, position or slot is out of range or two sequences share a
 * slot (nothing is written then). */
int rj_decode_batch(const rj_model *m, int32_t n, const int32_t *tokens, const int32_t *positions,
                    const int32_t *slots, float *logits, float *work) {
    if (n <= 0) return -1;
    for (int i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= m->vocab || positions[i] < 0 || positions[i] >= m->max_seq ||
            slots[i] < 0 || slots[i] >= m->n_slots)
            return -1;
        for (int j = 0; j < i; j++)
            if (slots[j] == slots[i]) return -1;
    }
    const int dim = m->dim, hd = m->head_dim, nh = m->n_heads, nkv = m->n_kv_heads, ffn = m->ffn_dim;
    const int qd = nh * hd, kvd = nkv * hd, group = nh / nkv, half = hd / 2;
    const size_t xs = xsum_stride(m), sc = (size_t)nh * m->max_seq;
    float *x = work, *h = x + (size_t)n * dim, *q = h + (size_t)n * dim, *k = q + (size_t)n * qd;
    float *v = k + (size_t)n * kvd, *att = v + (size_t)n * kvd, *gate = att + (size_t)n * qd;
    float *up = gate + (size_t)n * ffn, *xsum = up + (size_t)n * ffn, *scores = xsum + (size_t)n * xs;
    for (int i = 0; i < n; i++) memcpy(x + (size_t)i * dim, m->embed + (size_t)tokens[i] * dim, sizeof(float) * dim);

#pragma omp parallel num_threads(m->threads > 0 ? m->threads : 1)
    {
        for (int l = 0; l < m->n_layers; l++) {
            const rj_layer *L = &m->layers[l];
#pragma omp for schedule(static)
            for (int i = 0; i < n; i++) {
                rms_norm(x + (size_t)i * dim, L->attn_norm, h + (size_t)i * dim, dim, m->norm_eps);
                block_sums(h + (size_t)i * dim, dim, xsum + i * xs);
            }
            matvec_n(&L->wq, h, dim, xsum, xs, n, q, qd, 0);
            matvec_n(&L->wk, h, dim, xsum, xs, n, k, kvd, 0);
            matvec_n(&L->wv, h, dim, xsum, xs, n, v, kvd, 0);
#pragma omp for schedule(static)
            for (int i = 0; i < n; i++) {
                float *qi = q + (size_t)i * qd, *ki = k + (size_t)i * kvd, *vi = v + (size_t)i * kvd;
                const size_t p = (size_t)positions[i];
                if (L->bq) for (int e = 0; e < qd; e++) qi[e] += L->bq[e];
                if (L->bk) for (int e = 0; e < kvd; e++) ki[e] += L->bk[e];
                if (L->bv) for (int e = 0; e < kvd; e++) vi[e] += L->bv[e];
                rope(qi, nh, hd, m->rope_cos + p * half, m->rope_sin + p * half);
                rope(ki, nkv, hd, m->rope_cos + p * half, m->rope_sin + p * half);
                for (int j = 0; j < nkv; j++) {
                    memcpy(L->k_cache + cache_at(m, slots[i], j, positions[i]), ki + j * hd, sizeof(float) * hd);
                    memcpy(L->v_cache + cache_at(m, slots[i], j, positions[i]), vi + j * hd, sizeof(float) * hd);
                }
            }
            /* implicit barrier: every new K/V row is in its cache before anyone attends */
#pragma omp for schedule(static)
            for (int t = 0; t < n * nkv; t++) {
                const int i = t / nkv, j = t % nkv;
                const size_t kv = cache_at(m, slots[i], j, 0);
                attend_group(q + (size_t)i * qd + j * group * hd, L->k_cache + kv, L->v_cache + kv, positions[i] + 1,
                             hd, group, scores + i * sc + (size_t)j * group * m->max_seq,
                             att + (size_t)i * qd + j * group * hd);
            }
            layer_out_and_ffn(m, L, n, att, x, h, gate, up, xsum, xs);
        }
#pragma omp for schedule(static)
        for (int i = 0; i < n; i++) {
            rms_norm(x + (size_t)i * dim, m->final_norm, h + (size_t)i * dim, dim, m->norm_eps);
            block_sums(h + (size_t)i * dim, dim, xsum + i * xs);
        }
        matvec_n(&m->output, h, dim, xsum, xs, n, logits, m->vocab, 0);
    }
    return 0;
}

/* Single ops, exported for the tests that hold them against the torch reference:
 * Y[v] = W X[v] for v < n (X [n, cols], Y [n, rows]); n = 1 is one matrix-vector product. */
void rj_matvec(const rj_weight *w, int32_t n, const float *x, float *y) {
    const size_t xs = (size_t)w->cols / QK + 1;
    float xsum[(size_t)n * xs];
    for (int v = 0; v < n; v++) block_sums(x + (size_t)v * w->cols, w->cols, xsum + v * xs);
    matvec_n(w, x, w->cols, xsum, xs, n, y, w->rows, 0);
}

/* ------------------------------------------------------------------------------------------------
 * Prefill: n tokens at positions pos..pos+n-1 in one call.
 *
 * At batch 1 a matrix is read once per token and decode is bound by unpacking the weights; here
 * every weight row is unpacked in registers once per RJ_TILE tokens and multiplied into all of them
 * (the step's own `matvec_n`), so a short prompt (the new words of a turn: 2-16 tokens) costs about
 * one or two batched decode steps rather than the eager fp32 path's fixed cost of reading every
 * weight as fp32. Each token's sums are formed exactly as a decode step forms them, so the logits
 * are those of feeding the tokens one step at a time. (An earlier version dequantised each block
 * to fp32 in a scalar loop before the FMAs: 5-7x slower than a step for one or two tokens.) */

size_t rj_prefill_floats(const rj_model *m, int32_t n) {
    size_t qd = (size_t)m->n_heads * m->head_dim, kvd = (size_t)m->n_kv_heads * m->head_dim;
    /* x, h, q, k, v, att, gate, up and block sums per token; then the attention scores */
    return (size_t)n * (2 * (size_t)m->dim + 2 * qd + 2 * kvd + 2 * (size_t)m->ffn_dim + xsum_stride(m)) +
           (size_t)m->n_heads * m->max_seq;
}

/* Runs tokens[0..n) at positions pos..pos+n-1 of cache slot `slot` (which holds 0..pos-1) and writes
 * the logits of the last one. `work` holds rj_prefill_floats(m, n) floats. Returns 0, or -1 if
 * anything is out of range. */
int rj_prefill(const rj_model *m, const int32_t *tokens, int32_t n, int32_t pos, int32_t slot, float *logits,
               float *work) {
    if (n <= 0 || pos < 0 || pos + n > m->max_seq || slot < 0 || slot >= m->n_slots) return -1;
    for (int t = 0; t < n; t++)
        if (tokens[t] < 0 || tokens[t] >= m->vocab) return -1;
    const int dim = m->dim, hd = m->head_dim, nh = m->n_heads, nkv = m->n_kv_heads, ffn = m->ffn_dim;
    const int qd = nh * hd, kvd = nkv * hd, group = nh / nkv, half = hd / 2;
    const size_t xs = xsum_stride(m);
    float *x = work, *h = x + (size_t)n * dim, *q = h + (size_t)n * dim, *k = q + (size_t)n * qd;
    float *v = k + (size_t)n * kvd, *att = v + (size_t)n * kvd, *gate = att + (size_t)n * qd;
    float *up = gate + (size_t)n * ffn, *xsum = up + (size_t)n * ffn, *scores = xsum + (size_t)n * xs;
    for (int t = 0; t < n; t++) memcpy(x + (size_t)t * dim, m->embed + (size_t)tokens[t] * dim, sizeof(float) * dim);

#pragma omp parallel num_threads(m->threads > 0 ? m->threads : 1)
    {
        for (int l = 0; l < m->n_layers; l++) {
            const rj_layer *L = &m->layers[l];
#pragma omp for schedule(static)
            for (int t = 0; t < n; t++) {
                rms_norm(x + (size_t)t * dim, L->attn_norm, h + (size_t)t * dim, dim, m->norm_eps);
                block_sums(h + (size_t)t * dim, dim, xsum + t * xs);
            }
            matvec_n(&L->wq, h, dim, xsum, xs, n, q, qd, 0);
            matvec_n(&L->wk, h, dim, xsum, xs, n, k, kvd, 0);
            matvec_n(&L->wv, h, dim, xsum, xs, n, v, kvd, 0);
#pragma omp for schedule(static)
            for (int t = 0; t < n; t++) {
                float *qt = q + (size_t)t * qd, *kt = k + (size_t)t * kvd, *vt = v + (size_t)t * kvd;
                const size_t p = (size_t)pos + t;
                if (L->bq) for (int i = 0; i < qd; i++) qt[i] += L->bq[i];
                if (L->bk) for (int i = 0; i < kvd; i++) kt[i] += L->bk[i];
                if (L->bv) for (int i = 0; i < kvd; i++) vt[i] += L->bv[i];
                rope(qt, nh, hd, m->rope_cos + p * half, m->rope_sin + p * half);
                rope(kt, nkv, hd, m->rope_cos + p * half, m->rope_sin + p * half);
                for (int j = 0; j < nkv; j++) {
                    memcpy(L->k_cache + cache_at(m, slot, j, (int)p), kt + j * hd, sizeof(float) * hd);
                    memcpy(L->v_cache + cache_at(m, slot, j, (int)p), vt + j * hd, sizeof(float) * hd);
                }
            }
            /* implicit barrier: every token's K/V is in the cache before anyone attends */
#pragma omp for schedule(static)
            for (int j = 0; j < nkv; j++) {
                const size_t kv_off = cache_at(m, slot, j, 0);
                for (int t = 0; t < n; t++)
                    attend_group(q + (size_t)t * qd + j * group * hd, L->k_cache + kv_off, L->v_cache + kv_off,
                                 pos + t + 1, hd, group, scores + (size_t)j * group * m->max_seq,
                                 att + (size_t)t * qd + j * group * hd);
            }
            layer_out_and_ffn(m, L, n, att, x, h, gate, up, xsum, xs);
        }
#pragma omp single
        {
            rms_norm(x + (size_t)(n - 1) * dim, m->final_norm, h, dim, m->norm_eps);
            block_sums(h, dim, xsum);
        }
        matvec_n(&m->output, h, dim, xsum, 0, 1, logits, m->vocab, 0);
    }
    return 0;
}
