/* Rejoinder's CPU decode step: one token through a Llama-family decoder, weights left in their GGUF
 * block quantisation and dequantised in registers, fp32 activations throughout.
 *
 * Why C and not torch ops: at batch 1 a token is ~210 matrix-vector products plus ~400 small ops.
 * torch's packed int4/int8 CPU kernels are only fast with bf16 activations (which would change the
 * model's outputs), and eager torch spends a few milliseconds per token on dispatch alone. Here one
 * call runs the whole step, so Python costs one ctypes call per token.
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
#if defined(__AVX2__) || defined(__AVX512F__)
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
    float *k_cache, *v_cache; /* [n_kv_heads, max_seq, head_dim] */
} rj_layer;

typedef struct {
    int32_t dim, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, vocab, max_seq, threads;
    float norm_eps;
    const float *embed;              /* [vocab, dim] */
    const float *rope_cos, *rope_sin; /* [max_seq, head_dim / 2], rotate-half convention */
    const float *final_norm;
    rj_weight output;
    const rj_layer *layers;
    float *scratch; /* rj_scratch_floats(model) floats */
} rj_model;

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
 * One row dot products. `xsum[g]` is the sum of x over block g (for the Q4 minimum term). */

#if defined(__AVX512F__)
static inline __m512 q4_block_dot(const uint8_t *qs, const float *x) {
    const __m128i mask = _mm_set1_epi8(0x0f);
    __m128i b = _mm_loadu_si128((const __m128i *)qs);
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, mask)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), mask)));
    return _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(x)));
}
#elif defined(__AVX2__)
static inline __m256 q4_block_dot(const uint8_t *qs, const float *x) {
    const __m128i mask = _mm_set1_epi8(0x0f);
    __m128i b = _mm_loadu_si128((const __m128i *)qs);
    __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), _mm256_loadu_ps(x));
    t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), _mm256_loadu_ps(x + 8), t);
    t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), _mm256_loadu_ps(x + 16), t);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), _mm256_loadu_ps(x + 24), t);
}
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* Q4_0 / Q4_1: d * sum(q x) + m * sum(x), m = -8 d for Q4_0 */
static float dot_q4(const uint8_t *row, const float *x, const float *xsum, int nb, int has_min) {
    const int bytes = has_min ? 20 : 18, qoff = has_min ? 4 : 2;
    float offset = 0.0f;
#if defined(__AVX512F__)
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(); /* two chains hide FMA latency */
    int g = 0;
    for (; g + 1 < nb; g += 2) {
        const uint8_t *b0 = row + (size_t)g * bytes, *b1 = b0 + bytes;
        float d0 = load_fp16(b0), d1 = load_fp16(b1);
        acc0 = _mm512_fmadd_ps(_mm512_set1_ps(d0), q4_block_dot(b0 + qoff, x + g * QK), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_set1_ps(d1), q4_block_dot(b1 + qoff, x + (g + 1) * QK), acc1);
        offset += (has_min ? load_fp16(b0 + 2) : -8.0f * d0) * xsum[g];
        offset += (has_min ? load_fp16(b1 + 2) : -8.0f * d1) * xsum[g + 1];
    }
    for (; g < nb; g++) {
        const uint8_t *b0 = row + (size_t)g * bytes;
        float d0 = load_fp16(b0);
        acc0 = _mm512_fmadd_ps(_mm512_set1_ps(d0), q4_block_dot(b0 + qoff, x + g * QK), acc0);
        offset += (has_min ? load_fp16(b0 + 2) : -8.0f * d0) * xsum[g];
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + offset;
#elif defined(__AVX2__)
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int g = 0;
    for (; g + 1 < nb; g += 2) {
        const uint8_t *b0 = row + (size_t)g * bytes, *b1 = b0 + bytes;
        float d0 = load_fp16(b0), d1 = load_fp16(b1);
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0), q4_block_dot(b0 + qoff, x + g * QK), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d1), q4_block_dot(b1 + qoff, x + (g + 1) * QK), acc1);
        offset += (has_min ? load_fp16(b0 + 2) : -8.0f * d0) * xsum[g];
        offset += (has_min ? load_fp16(b1 + 2) : -8.0f * d1) * xsum[g + 1];
    }
    for (; g < nb; g++) {
        const uint8_t *b0 = row + (size_t)g * bytes;
        float d0 = load_fp16(b0);
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0), q4_block_dot(b0 + qoff, x + g * QK), acc0);
        offset += (has_min ? load_fp16(b0 + 2) : -8.0f * d0) * xsum[g];
    }
    return hsum256(_mm256_add_ps(acc0, acc1)) + offset;
#else
    float total = 0.0f;
    for (int g = 0; g < nb; g++) {
        const uint8_t *b = row + (size_t)g * bytes, *qs = b + qoff;
        const float *xb = x + g * QK;
        float d = load_fp16(b), s = 0.0f;
        for (int j = 0; j < 16; j++) s += (float)(qs[j] & 15) * xb[j] + (float)(qs[j] >> 4) * xb[j + 16];
        total += d * s;
        offset += (has_min ? load_fp16(b + 2) : -8.0f * d) * xsum[g];
    }
    return total + offset;
#endif
}

static float dot_q8_0(const uint8_t *row, const float *x, int nb) {
#if defined(__AVX512F__)
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int g = 0; g < nb; g++) {
        const uint8_t *b = row + (size_t)g * 34;
        __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 2))));
        __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 18))));
        __m512 t = _mm512_fmadd_ps(q1, _mm512_loadu_ps(x + g * QK + 16), _mm512_mul_ps(q0, _mm512_loadu_ps(x + g * QK)));
        if (g & 1)
            acc1 = _mm512_fmadd_ps(_mm512_set1_ps(load_fp16(b)), t, acc1);
        else
            acc0 = _mm512_fmadd_ps(_mm512_set1_ps(load_fp16(b)), t, acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (int g = 0; g < nb; g++) {
        const uint8_t *b = row + (size_t)g * 34;
        const float *xb = x + g * QK;
        __m256 t = _mm256_setzero_ps();
        for (int h = 0; h < 4; h++) {
            __m128i q = _mm_loadl_epi64((const __m128i *)(b + 2 + 8 * h));
            t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_loadu_ps(xb + 8 * h), t);
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(load_fp16(b)), t, acc);
    }
    return hsum256(acc);
#else
    float total = 0.0f;
    for (int g = 0; g < nb; g++) {
        const uint8_t *b = row + (size_t)g * 34;
        const int8_t *q = (const int8_t *)(b + 2);
        float s = 0.0f;
        for (int j = 0; j < QK; j++) s += (float)q[j] * x[g * QK + j];
        total += load_fp16(b) * s;
    }
    return total;
#endif
}

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

static inline float row_dot(const rj_weight *w, int r, const float *x, const float *xsum) {
    const uint8_t *row = (const uint8_t *)w->data + (size_t)r * rj_row_bytes(w->type, w->cols);
    switch (w->type) {
    case RJ_Q4_1: return dot_q4(row, x, xsum, w->cols / QK, 1);
    case RJ_Q4_0: return dot_q4(row, x, xsum, w->cols / QK, 0);
    case RJ_Q8_0: return dot_q8_0(row, x, w->cols / QK);
    default: return dot_f32((const float *)row, x, w->cols);
    }
}

/* y[r] (+)= W[r] . x for every row; rows are shared out among the threads of an enclosing parallel
 * region (or all done here when called outside one). `xsum` must hold block_sums(x). */
static void matvec(const rj_weight *w, const float *x, const float *xsum, float *y, int accumulate) {
#pragma omp for schedule(static)
    for (int r = 0; r < w->rows; r++) {
        float v = row_dot(w, r, x, xsum);
        y[r] = accumulate ? y[r] + v : v;
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

/* ------------------------------------------------------------------------------------------------
 * The step */

size_t rj_scratch_floats(const rj_model *m) {
    size_t qd = (size_t)m->n_heads * m->head_dim, kvd = (size_t)m->n_kv_heads * m->head_dim;
    size_t wide = (size_t)(m->ffn_dim > m->dim ? m->ffn_dim : m->dim);
    if (qd > wide) wide = qd;
    /* x, h, q, k, v, att, gate, up, xsum, scores */
    return 2 * (size_t)m->dim + 2 * qd + 2 * kvd + 2 * wide + wide / QK + 1 + (size_t)m->n_heads * m->max_seq;
}

/* Returns 0, or -1 for a token / position out of range (nothing is written then). */
int rj_decode_step(const rj_model *m, int32_t token, int32_t pos, float *logits) {
    if (token < 0 || token >= m->vocab || pos < 0 || pos >= m->max_seq) return -1;
    const int dim = m->dim, hd = m->head_dim, nh = m->n_heads, nkv = m->n_kv_heads, ffn = m->ffn_dim;
    const int qd = nh * hd, kvd = nkv * hd, group = nh / nkv, half = hd / 2;
    size_t wide = (size_t)(ffn > dim ? ffn : dim);
    if ((size_t)qd > wide) wide = qd;
    float *x = m->scratch, *h = x + dim, *q = h + dim, *k = q + qd, *v = k + kvd, *att = v + kvd;
    float *gate = att + qd, *up = gate + wide, *xsum = up + wide, *scores = xsum + wide / QK + 1;
    const float *cos_row = m->rope_cos + (size_t)pos * half, *sin_row = m->rope_sin + (size_t)pos * half;
    memcpy(x, m->embed + (size_t)token * dim, sizeof(float) * dim);

#pragma omp parallel num_threads(m->threads > 0 ? m->threads : 1)
    {
        for (int l = 0; l < m->n_layers; l++) {
            const rj_layer *L = &m->layers[l];
#pragma omp single
            {
                rms_norm(x, L->attn_norm, h, dim, m->norm_eps);
                block_sums(h, dim, xsum);
            }
            matvec(&L->wq, h, xsum, q, 0);
            matvec(&L->wk, h, xsum, k, 0);
            matvec(&L->wv, h, xsum, v, 0);
#pragma omp single
            {
                if (L->bq) for (int i = 0; i < qd; i++) q[i] += L->bq[i];
                if (L->bk) for (int i = 0; i < kvd; i++) k[i] += L->bk[i];
                if (L->bv) for (int i = 0; i < kvd; i++) v[i] += L->bv[i];
                rope(q, nh, hd, cos_row, sin_row);
                rope(k, nkv, hd, cos_row, sin_row);
                for (int j = 0; j < nkv; j++) {
                    memcpy(L->k_cache + ((size_t)j * m->max_seq + pos) * hd, k + j * hd, sizeof(float) * hd);
                    memcpy(L->v_cache + ((size_t)j * m->max_seq + pos) * hd, v + j * hd, sizeof(float) * hd);
                }
            }
#pragma omp for schedule(static)
            for (int j = 0; j < nkv; j++) {
                size_t kv_off = (size_t)j * m->max_seq * hd;
                attend_group(q + j * group * hd, L->k_cache + kv_off, L->v_cache + kv_off, pos + 1, hd, group,
                             scores + (size_t)j * group * m->max_seq, att + j * group * hd);
            }
#pragma omp single
            block_sums(att, qd, xsum);
            matvec(&L->wo, att, xsum, x, 1); /* residual add fused */
#pragma omp single
            {
                rms_norm(x, L->ffn_norm, h, dim, m->norm_eps);
                block_sums(h, dim, xsum);
            }
            matvec(&L->w_gate, h, xsum, gate, 0);
            matvec(&L->w_up, h, xsum, up, 0);
#pragma omp single
            {
                for (int i = 0; i < ffn; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
                block_sums(gate, ffn, xsum);
            }
            matvec(&L->w_down, gate, xsum, x, 1);
        }
#pragma omp single
        {
            rms_norm(x, m->final_norm, h, dim, m->norm_eps);
            block_sums(h, dim, xsum);
        }
        matvec(&m->output, h, xsum, logits, 0);
    }
    return 0;
}

/* Single ops, exported for the tests that hold them against the torch reference. */
void rj_matvec(const rj_weight *w, const float *x, float *y) {
    float xsum[w->cols / QK + 1];
    block_sums(x, w->cols, xsum);
    matvec(w, x, xsum, y, 0);
}

/* ------------------------------------------------------------------------------------------------
 * Prefill: n tokens at positions pos..pos+n-1 in one call.
 *
 * At batch 1 a matrix is read once per token and decode is bound by dequantisation; with n tokens
 * each 32-weight block is dequantised once per PF_TILE tokens and multiplied into all of them, so
 * a short prompt (the new words of a turn: 5-60 tokens) costs a few decode steps rather than the
 * eager fp32 path's fixed ~65 ms of reading 540 MB of weights. Weights are dequantised exactly as
 * the fp32 reference holds them (d * q + m in fp32), so results match it up to summation order. */

#define PF_TILE 8

static inline void dequant_block(int32_t type, const uint8_t *row, int g, float *out) {
    if (type == RJ_Q8_0) {
        const uint8_t *b = row + (size_t)g * 34;
        const float d = load_fp16(b);
        const int8_t *q = (const int8_t *)(b + 2);
        for (int j = 0; j < QK; j++) out[j] = d * (float)q[j];
        return;
    }
    const int has_min = type == RJ_Q4_1;
    const uint8_t *b = row + (size_t)g * (has_min ? 20 : 18), *qs = b + (has_min ? 4 : 2);
    const float d = load_fp16(b);
    if (has_min) {
        const float mn = load_fp16(b + 2);
        for (int j = 0; j < 16; j++) {
            out[j] = d * (float)(qs[j] & 15) + mn;
            out[j + 16] = d * (float)(qs[j] >> 4) + mn;
        }
    } else {
        for (int j = 0; j < 16; j++) {
            out[j] = d * (float)((int)(qs[j] & 15) - 8);
            out[j + 16] = d * (float)((int)(qs[j] >> 4) - 8);
        }
    }
}

/* Y[t][r] (+)= W[r] . X[t] for t < n (row strides ldx, ldy); rows shared out among the threads. */
static void matmul(const rj_weight *w, const float *x, int ldx, int n, float *y, int ldy, int accumulate) {
    const int nb = w->cols / QK;
    const size_t row_bytes = rj_row_bytes(w->type, w->cols);
#pragma omp for schedule(static)
    for (int r = 0; r < w->rows; r++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)r * row_bytes;
        if (w->type == RJ_F32) {
            for (int t = 0; t < n; t++) {
                float v = dot_f32((const float *)row, x + (size_t)t * ldx, w->cols);
                y[(size_t)t * ldy + r] = accumulate ? y[(size_t)t * ldy + r] + v : v;
            }
            continue;
        }
        for (int t0 = 0; t0 < n; t0 += PF_TILE) {
            const int nt = n - t0 < PF_TILE ? n - t0 : PF_TILE;
            const float *xt = x + (size_t)t0 * ldx;
            float sums[PF_TILE];
#if defined(__AVX512F__)
            __m512 acc[PF_TILE];
            for (int t = 0; t < nt; t++) acc[t] = _mm512_setzero_ps();
            for (int g = 0; g < nb; g++) {
                float wb[QK] __attribute__((aligned(64)));
                dequant_block(w->type, row, g, wb);
                const __m512 w0 = _mm512_load_ps(wb), w1 = _mm512_load_ps(wb + 16);
                for (int t = 0; t < nt; t++) {
                    const float *xb = xt + (size_t)t * ldx + g * QK;
                    acc[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), acc[t]));
                }
            }
            for (int t = 0; t < nt; t++) sums[t] = _mm512_reduce_add_ps(acc[t]);
#elif defined(__AVX2__)
            __m256 acc[PF_TILE];
            for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
            for (int g = 0; g < nb; g++) {
                float wb[QK] __attribute__((aligned(32)));
                dequant_block(w->type, row, g, wb);
                for (int t = 0; t < nt; t++) {
                    const float *xb = xt + (size_t)t * ldx + g * QK;
                    for (int h = 0; h < 4; h++)
                        acc[t] = _mm256_fmadd_ps(_mm256_load_ps(wb + 8 * h), _mm256_loadu_ps(xb + 8 * h), acc[t]);
                }
            }
            for (int t = 0; t < nt; t++) sums[t] = hsum256(acc[t]);
#else
            for (int t = 0; t < nt; t++) sums[t] = 0.0f;
            for (int g = 0; g < nb; g++) {
                float wb[QK];
                dequant_block(w->type, row, g, wb);
                for (int t = 0; t < nt; t++) {
                    const float *xb = xt + (size_t)t * ldx + g * QK;
                    float s = 0.0f;
                    for (int j = 0; j < QK; j++) s += wb[j] * xb[j];
                    sums[t] += s;
                }
            }
#endif
            for (int t = 0; t < nt; t++) {
                float *out = y + (size_t)(t0 + t) * ldy + r;
                *out = accumulate ? *out + sums[t] : sums[t];
            }
        }
    }
}

size_t rj_prefill_floats(const rj_model *m, int32_t n) {
    size_t qd = (size_t)m->n_heads * m->head_dim, kvd = (size_t)m->n_kv_heads * m->head_dim;
    /* x, h, q, k, v, att, gate, up per token; then xsum for the head and the attention scores */
    return (size_t)n * (2 * (size_t)m->dim + 2 * qd + 2 * kvd + 2 * (size_t)m->ffn_dim) + (size_t)m->dim / QK + 1 +
           (size_t)m->n_heads * m->max_seq;
}

/* Runs tokens[0..n) at positions pos..pos+n-1 (the cache holds 0..pos-1) and writes the logits of the
 * last one. `work` holds rj_prefill_floats(m, n) floats. Returns 0, or -1 if anything is out of range. */
int rj_prefill(const rj_model *m, const int32_t *tokens, int32_t n, int32_t pos, float *logits, float *work) {
    if (n <= 0 || pos < 0 || pos + n > m->max_seq) return -1;
    for (int t = 0; t < n; t++)
        if (tokens[t] < 0 || tokens[t] >= m->vocab) return -1;
    const int dim = m->dim, hd = m->head_dim, nh = m->n_heads, nkv = m->n_kv_heads, ffn = m->ffn_dim;
    const int qd = nh * hd, kvd = nkv * hd, group = nh / nkv, half = hd / 2;
    float *x = work, *h = x + (size_t)n * dim, *q = h + (size_t)n * dim, *k = q + (size_t)n * qd;
    float *v = k + (size_t)n * kvd, *att = v + (size_t)n * kvd, *gate = att + (size_t)n * qd;
    float *up = gate + (size_t)n * ffn, *xsum = up + (size_t)n * ffn, *scores = xsum + dim / QK + 1;
    for (int t = 0; t < n; t++) memcpy(x + (size_t)t * dim, m->embed + (size_t)tokens[t] * dim, sizeof(float) * dim);

#pragma omp parallel num_threads(m->threads > 0 ? m->threads : 1)
    {
        for (int l = 0; l < m->n_layers; l++) {
            const rj_layer *L = &m->layers[l];
#pragma omp for schedule(static)
            for (int t = 0; t < n; t++) rms_norm(x + (size_t)t * dim, L->attn_norm, h + (size_t)t * dim, dim, m->norm_eps);
            matmul(&L->wq, h, dim, n, q, qd, 0);
            matmul(&L->wk, h, dim, n, k, kvd, 0);
            matmul(&L->wv, h, dim, n, v, kvd, 0);
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
                    memcpy(L->k_cache + ((size_t)j * m->max_seq + p) * hd, kt + j * hd, sizeof(float) * hd);
                    memcpy(L->v_cache + ((size_t)j * m->max_seq + p) * hd, vt + j * hd, sizeof(float) * hd);
                }
            }
            /* implicit barrier: every token's K/V is in the cache before anyone attends */
#pragma omp for schedule(static)
            for (int j = 0; j < nkv; j++) {
                size_t kv_off = (size_t)j * m->max_seq * hd;
                for (int t = 0; t < n; t++)
                    attend_group(q + (size_t)t * qd + j * group * hd, L->k_cache + kv_off, L->v_cache + kv_off,
                                 pos + t + 1, hd, group, scores + (size_t)j * group * m->max_seq,
                                 att + (size_t)t * qd + j * group * hd);
            }
            matmul(&L->wo, att, qd, n, x, dim, 1); /* residual add fused */
#pragma omp for schedule(static)
            for (int t = 0; t < n; t++) rms_norm(x + (size_t)t * dim, L->ffn_norm, h + (size_t)t * dim, dim, m->norm_eps);
            matmul(&L->w_gate, h, dim, n, gate, ffn, 0);
            matmul(&L->w_up, h, dim, n, up, ffn, 0);
#pragma omp for schedule(static)
            for (int t = 0; t < n; t++) {
                float *gt = gate + (size_t)t * ffn, *ut = up + (size_t)t * ffn;
                for (int i = 0; i < ffn; i++) gt[i] = gt[i] / (1.0f + expf(-gt[i])) * ut[i];
            }
            matmul(&L->w_down, gate, ffn, n, x, dim, 1);
        }
#pragma omp single
        {
            rms_norm(x + (size_t)(n - 1) * dim, m->final_norm, h, dim, m->norm_eps);
            block_sums(h, dim, xsum);
        }
        matvec(&m->output, h, xsum, logits, 0);
    }
    return 0;
}
