/* Decode attention over kvhub's packed codes on CPU: unpacking fused into the two products.
 *
 * The PyTorch path makes every pass over the history a separate op (shift, mask, convert, matmul, scale), and on a
 * short context a decode step is made of such ops. Here one call per stream walks the stored rows once: a token's
 * codes are unpacked into a small buffer in storage order (segment by segment, plane by plane, see
 * kvhub/layout.py) and used at once, by every query row, while they are in L1.
 *
 *   kvhub_scores: out[bh, m, t] = g[bh, m, mean] + sum_seg s_t,seg * (g[bh, m, seg cols] . c_t,seg)
 *   kvhub_values: coords[bh, m, seg cols] = sum_t p[bh, m, t] s_t,seg c_t,seg, the mean column the weights' sum;
 *                 the caller multiplies by the plan's matrix.
 *
 * c are raw values (kvhub/plan.py): centred codes of evenly spaced levels, tabled levels, 16-bit data converted
 * (stored as fp16, bf16 or fp32); s the per-token scales, stored as fp16 or as byte codes looked up in a
 * [H][groups][256] table. Both functions check the shapes they are given against their fixed buffers and return
 * -1 (writing nothing) instead of overrunning them.
 * Built at first use by kvhub/kernels/cpu.py; OpenMP when the compiler has it.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>

#define MAX_RANK 256     /* stored components per token (head_dim <= 256) */
#define MAX_SEGMENTS 16

typedef struct {  /* all 64-bit integers, so the caller passes one flat int64 array */
    int64_t bits;     /* 2, 4, 8 or 16 */
    int64_t column;   /* first storage-order column of the segment in g and coords */
    int64_t scale;    /* column of its per-token scale, -1: none */
    int64_t centre2;  /* twice the centre subtracted from a code (evenly spaced levels), 0 for tabled ones */
    int64_t table;    /* address of 2**bits float levels indexed by code, or 0: the centred code itself */
    int64_t width;    /* stored elements per token row: bytes, or 16-bit values */
    int64_t dtype;    /* 16-bit data: 1 fp16, 2 bf16, 3 fp32 */
    int64_t stride_b, stride_h, stride_t;  /* of the stored rows, in elements */
    int64_t data;     /* address of the stored rows */
} Segment;

typedef struct {  /* per-token scales: kind 0 none, 1 fp16 values, 2 byte codes looked up in lut[h][k][256] */
    int64_t kind, data, stride_b, stride_h, stride_t, lut, groups;
} Scales;

enum { DT_FP16 = 1, DT_BF16 = 2, DT_FP32 = 3 };

static inline float from_fp16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0) {
        float f = ldexpf((float)man, -24);
        return sign ? -f : f;
    }
    bits = exp == 31 ? (sign | 0x7f800000u | (man << 13)) : (sign | ((exp + 112u) << 23) | (man << 13));
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float from_bf16(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float token_scale(const Segment *s, const Scales *sc, int64_t b, int64_t h, int64_t t) {
    if (s->scale < 0) return 1.0f;
    const int64_t at = b * sc->stride_b + h * sc->stride_h + t * sc->stride_t + s->scale;
    if (sc->kind == 2) {
        const uint8_t code = ((const uint8_t *)(intptr_t)sc->data)[at];
        return ((const float *)(intptr_t)sc->lut)[(h * sc->groups + s->scale) * 256 + code];
    }
    return from_fp16(((const uint16_t *)(intptr_t)sc->data)[at]);
}

/* One token's stored row, every segment, into row[0 .. R) in storage order (the decoder's column order), each
 * segment's values times its per-token scale; the scales into scale[k]. One row of R values, not one per
 * segment: the products that follow then run over R, not over short segments (2-bit rows are 8 bytes). */
static inline void unpack(int64_t nseg, const Segment *segs, const Scales *sc, int64_t b, int64_t h, int64_t t,
                          float *row, float *scale) {
    for (int64_t k = 0; k < nseg; k++) {
        const Segment *s = segs + k;
        const int64_t at = b * s->stride_b + h * s->stride_h + t * s->stride_t, w = s->width;
        scale[k] = token_scale(s, sc, b, h, t);
        float *dst = row + s->column;
        if (s->bits == 16) {
            if (s->dtype == DT_FP32) {
                memcpy(dst, (const float *)(intptr_t)s->data + at, sizeof(float) * w);
                continue;
            }
            const uint16_t *src = (const uint16_t *)(intptr_t)s->data + at;
            for (int64_t i = 0; i < w; i++) dst[i] = s->dtype == DT_BF16 ? from_bf16(src[i]) : from_fp16(src[i]);
            continue;
        }
        const uint8_t *src = (const uint8_t *)(intptr_t)s->data + at;
        const float *table = (const float *)(intptr_t)s->table, f = scale[k], c = 0.5f * (float)s->centre2;
        /* Constant shifts per case, so each loop vectorizes over the row's bytes; a tabled level is read straight
         * from the code's bits (one gather), an evenly spaced one computed from it. */
#define UNPACK(LEVEL)                                                                     \
        switch (s->bits) {                                                                \
        case 8:                                                                           \
            for (int64_t i = 0; i < w; i++) dst[i] = LEVEL(src[i]);                       \
            break;                                                                        \
        case 4:                                                                           \
            for (int64_t i = 0; i < w; i++) dst[i] = LEVEL(src[i] & 15u);                 \
            for (int64_t i = 0; i < w; i++) dst[w + i] = LEVEL(src[i] >> 4);              \
            break;                                                                        \
        default:                                                                          \
            for (int64_t i = 0; i < w; i++) {                                             \
                dst[i] = LEVEL(src[i] & 3u);                                              \
                dst[w + i] = LEVEL((src[i] >> 2) & 3u);                                   \
                dst[2 * w + i] = LEVEL((src[i] >> 4) & 3u);                               \
                dst[3 * w + i] = LEVEL(src[i] >> 6);                                      \
            }                                                                             \
        }
#define TABLED(code) (f * table[code])
#define CENTRED(code) (f * ((float)(code) - c))
        if (table) {
            UNPACK(TABLED)
        } else {
            UNPACK(CENTRED)
        }
#undef TABLED
#undef CENTRED
#undef UNPACK
    }
}

/* Vectorized only where the compiler may reassociate the sum (cpu.py builds with -fassociative-math): a strict
 * left-to-right float sum runs at one add per 4 cycles, and measured 5-10x slower per token. */
static inline float dot(const float *a, const float *b, int64_t n) {
    float d = 0.0f;
    for (int64_t i = 0; i < n; i++) d += a[i] * b[i];
    return d;
}

/* Whether the segments tile [0, R) in order within the fixed buffers, with widths their bits allow: what the
 * unpacking loops assume. */
static int valid(int64_t nseg, const Segment *segs, const Scales *sc, int64_t R, int64_t C) {
    if (nseg < 1 || nseg > MAX_SEGMENTS || R < 1 || R > MAX_RANK || C != R + 1) return 0;
    if (sc->kind < 0 || sc->kind > 2 || (sc->kind == 2 && (sc->lut == 0 || sc->groups < 1))) return 0;
    int64_t column = 0;
    for (int64_t k = 0; k < nseg; k++) {
        const Segment *s = segs + k;
        const int64_t per = s->bits == 16 ? 1 : 8 / s->bits;
        if (s->bits != 2 && s->bits != 4 && s->bits != 8 && s->bits != 16) return 0;
        if (s->column != column || s->width < 1 || s->data == 0) return 0;
        if (s->bits == 16 && (s->dtype < DT_FP16 || s->dtype > DT_FP32)) return 0;
        if (s->scale >= 0 && (sc->kind == 0 || (sc->kind == 2 && s->scale >= sc->groups))) return 0;
        column += s->width * per;
    }
    return column == R;
}

/* shape: B, H, M (query rows per KV head), T (history tokens), G (columns of g), R (stored columns); out: [B*H] x
 * [M] x [T] with strides out_bh, out_m (tokens contiguous). Tokens go in blocks of TB, unpacked together, so each
 * row of g is read once per block. */
#define TB 16
int kvhub_scores(const int64_t *shape, const float *g, int64_t nseg, const Segment *segs, const Scales *sc,
                 float *out, int64_t out_bh, int64_t out_m) {
    const int64_t B = shape[0], H = shape[1], M = shape[2], T = shape[3], G = shape[4], R = shape[5];
    if (!valid(nseg, segs, sc, R, G)) return -1;
    const int64_t blocks = (T + TB - 1) / TB;
    #pragma omp parallel for collapse(2) schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
        for (int64_t blk = 0; blk < blocks; blk++) {
            float rows[TB][MAX_RANK], scale[TB][MAX_SEGMENTS];
            const int64_t b = bh / H, h = bh % H, t0 = blk * TB, nt = T - t0 < TB ? T - t0 : TB;
            for (int64_t t = 0; t < nt; t++) unpack(nseg, segs, sc, b, h, t0 + t, rows[t], scale[t]);
            for (int64_t m = 0; m < M; m++) {
                const float *gm = g + (bh * M + m) * G;
                float *o = out + bh * out_bh + m * out_m + t0;
                for (int64_t t = 0; t < nt; t++) o[t] = gm[G - 1] + dot(gm, rows[t], R);
            }
        }
    }
    return 0;
}

/* p: [B*H] x [M] x [T] weights with strides p_bh, p_m; partial: [B*H] x [splits] x [M] x [C] scratch; coords:
 * [B*H] x [M] x [C] (C columns: the decoder matrix's), the mean column C - 1. */
int kvhub_values(const int64_t *shape, const float *p, int64_t p_bh, int64_t p_m, int64_t nseg, const Segment *segs,
                 const Scales *sc, float *partial, int64_t splits, float *coords) {
    const int64_t B = shape[0], H = shape[1], M = shape[2], T = shape[3], C = shape[4], R = shape[5];
    if (!valid(nseg, segs, sc, R, C) || splits < 1) return -1;
    const int64_t per_split = (T + splits - 1) / splits;
    #pragma omp parallel for collapse(2) schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
        for (int64_t sp = 0; sp < splits; sp++) {
            float row[MAX_RANK], scale[MAX_SEGMENTS];
            const int64_t b = bh / H, h = bh % H;
            float *acc = partial + (bh * splits + sp) * M * C;
            memset(acc, 0, sizeof(float) * M * C);
            const float *pb = p + bh * p_bh;
            const int64_t t0 = sp * per_split, t1 = t0 + per_split < T ? t0 + per_split : T;
            for (int64_t t = t0; t < t1; t++) {
                unpack(nseg, segs, sc, b, h, t, row, scale);
                for (int64_t m = 0; m < M; m++) {
                    const float w = pb[m * p_m + t];
                    float *am = acc + m * C;
                    for (int64_t i = 0; i < R; i++) am[i] += w * row[i];
                    am[C - 1] += w;
                }
            }
        }
    }
    #pragma omp parallel for schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
        float *dst = coords + bh * M * C;
        memcpy(dst, partial + bh * splits * M * C, sizeof(float) * M * C);
        for (int64_t sp = 1; sp < splits; sp++) {
            const float *src = partial + (bh * splits + sp) * M * C;
            for (int64_t i = 0; i < M * C; i++) dst[i] += src[i];
        }
    }
    return 0;
}
