/*
 * Fused Tucker-2 convolution for the CPU, float32, NCHW.
 *
 * A Tucker-2 factorised convolution (Kim et al. 2016, arXiv:1511.06530) is three convolutions:
 * a 1x1 from C to r1 channels, a kh x kw core from r1 to r2, a 1x1 from r2 to CO. On small
 * feature maps with few channels the library runs each as a separate kernel that writes its
 * whole output map to memory and reads it back, and its kernels are tuned for wide channel
 * counts, not for 4-16 channels. Here one call runs all three per image: the two intermediate
 * maps (r1 and r2 channels of one image) live in per-thread scratch that stays in cache, and
 * only the input and the output touch memory. The epilogue adds the bias (a folded batch norm),
 * an optional residual and an optional ReLU, so a whole residual branch ends in one pass.
 *
 * Every stage is the same loop: out[o][q] = b[o] + sum_t w[o][t] * in[chan[t]][q + off[t]],
 * vectorised over q (pixels, contiguous in NCHW) and blocked over OB output channels x QB
 * vectors of pixels held in registers. The core convolution runs on the zero-padded map laid
 * out flat, so its taps are constant offsets and rows need no edge tests; columns past the
 * valid width are computed and dropped. A strided core computes only every stride-th row.
 *
 * Denormal floats (below 1.2e-38) are flushed to zero inside the kernel, on each of its threads,
 * and the caller's floating-point mode is restored on return: x86 cores take a slow path for
 * every denormal operand, and the small products of narrow factors produce them (measured on
 * resnet56 factorised at rank 0.25: 23.8-29.3 ms per batch of 32 without, 21.6-22.7 ms with).
 *
 * Vectors are GCC/Clang vector extensions: the compiler maps them to AVX-512, AVX2, SSE or NEON
 * depending on -march. No library calls beyond libc (and OpenMP for threads over images).
 */
#include <stdlib.h>
#include <string.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#define CSR_FTZ_DAZ 0x8040u /* flush-to-zero (bit 15) and denormals-are-zero (bit 6) */
#endif

#if defined(__AVX512F__)
#define VW 16
#define QB_WIDE 4
#define QB_NARROW 3
#elif defined(__AVX__)
#define VW 8
#define QB_WIDE 3
#define QB_NARROW 1
#else
#define VW 4
#define QB_WIDE 3
#define QB_NARROW 1
#endif
#define QB_MAX 4
#define SLACK (2 * QB_MAX * VW) /* floats of over-read/over-write room after each plane */

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int vi __attribute__((vector_size(VW * 4)));

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline vf vbcast(float s) { return (vf){0} + s; }

/* One step of a stage: OBV output channels x QBV vectors of pixels starting at x + off[t].
 * w: the OBV weights of each tap in a row; b: OBV biases (zero-padded) or NULL; y and res
 * point at the step's first output (channel stride ys and rs); res may be NULL. */
#define DEFINE_STAGE(OBV, QBV, NAME)                                                              \
    static inline __attribute__((always_inline)) void NAME##_step(                               \
        const float *x, long xs, int taps, const int *chan, const long *off, const float *w,      \
        const float *b, float *y, long ys, int relu, const float *res, long rs) {                 \
        vf acc[OBV][QBV];                                                                         \
        for (int j = 0; j < OBV; j++)                                                             \
            for (int s = 0; s < QBV; s++) acc[j][s] = vbcast(b ? b[j] : 0.f);                     \
        for (int t = 0; t < taps; t++) {                                                          \
            const float *xp = x + chan[t] * xs + off[t];                                          \
            vf xv[QBV];                                                                           \
            for (int s = 0; s < QBV; s++) xv[s] = vload(xp + s * VW);                             \
            const float *wt = w + (long)t * OBV;                                                  \
            for (int j = 0; j < OBV; j++)                                                         \
                for (int s = 0; s < QBV; s++) acc[j][s] += wt[j] * xv[s];                         \
        }                                                                                         \
        for (int j = 0; j < OBV; j++)                                                             \
            for (int s = 0; s < QBV; s++) {                                                       \
                vf a = acc[j][s];                                                                 \
                if (res) a += vload(res + j * rs + s * VW);                                       \
                if (relu) a = (vf)((vi)a & ~(a < 0)); /* NaN stays NaN, as in torch.relu */ \
                memcpy(y + j * ys + s * VW, &a, sizeof a);                                        \
            }                                                                                     \
    }                                                                                             \
    /* x: input planes (stride xs floats); w: packed weights (see pack()); b: packed bias or     \
     * NULL; y: output planes (stride ys); q runs over [0, n) (reads past n stay inside the     \
     * planes' slack); only pixels [0, nstore) of the co output channels are written; res      \
     * (laid out as y) is added before the ReLU when given. */                                   \
    static void NAME(const float *x, long xs, int taps, const int *chan, const long *off,         \
                     const float *w, const float *b, float *y, int co, long ys, long n,           \
                     long nstore, int relu, const float *res) {                                   \
        enum { STEP = QBV * VW };                                                                 \
        float ty[OBV * STEP], tr[OBV * STEP];                                                     \
        for (int ob = 0; ob * OBV < co; ob++) {                                                   \
            const float *wb = w + (long)ob * taps * OBV, *bb = b ? b + ob * OBV : NULL;           \
            int nb = co - ob * OBV < OBV ? co - ob * OBV : OBV;                                   \
            long o0 = (long)ob * OBV * ys;                                                        \
            for (long q = 0; q < n; q += STEP) {                                                  \
                if (q + STEP <= nstore && nb == OBV) {                                            \
                    NAME##_step(x + q, xs, taps, chan, off, wb, bb, y + o0 + q, ys, relu,         \
                                res ? res + o0 + q : NULL, ys);                                   \
                    continue;                                                                     \
                }                                                                                 \
                long m = nstore - q < STEP ? nstore - q : STEP; /* a partial step: via scratch */ \
                if (res && m > 0)                                                                 \
                    for (int j = 0; j < nb; j++)                                                  \
                        memcpy(tr + j * STEP, res + o0 + j * ys + q, (size_t)m * 4);              \
                NAME##_step(x + q, xs, taps, chan, off, wb, bb, ty, STEP, relu, res ? tr : NULL,  \
                            STEP);                                                                \
                if (m > 0)                                                                        \
                    for (int j = 0; j < nb; j++)                                                  \
                        memcpy(y + o0 + j * ys + q, ty + j * STEP, (size_t)m * 4);                \
            }                                                                                     \
        }                                                                                         \
    }

DEFINE_STAGE(4, QB_WIDE, stage_ob4)
DEFINE_STAGE(8, QB_NARROW, stage_ob8)

typedef void stage_fn(const float *, long, int, const int *, const long *, const float *,
                      const float *, float *, int, long, long, long, int, const float *);

static int block_of(int co) { return (co <= 4 || VW < 16) ? 4 : 8; }
static stage_fn *stage_for(int ob) { return ob == 4 ? stage_ob4 : stage_ob8; }

/* w (co, taps) row-major -> blocks of ob output lanes per tap, zero-padded to a whole block */
static float *pack(const float *w, int co, int taps, int ob) {
    int nblk = (co + ob - 1) / ob;
    float *p = calloc((size_t)nblk * taps * ob, 4);
    if (!p) return NULL;
    for (int o = 0; o < co; o++)
        for (int t = 0; t < taps; t++)
            p[((long)(o / ob) * taps + t) * ob + o % ob] = w[(long)o * taps + t];
    return p;
}

/* Everything a layer's calls share for one input size: the packed weights and the tap tables.
 * Built once by slimtorch_tucker_plan, read (never written) by any number of concurrent runs. */
typedef struct {
    int C, H, W, r1, r2, kh, kw, CO, sh, sw, ph, pw, dh, dw, oba, obb, obc, taps;
    float *pu, *pk, *pv, *pb;
    int *cha, *chb, *chc;
    long *ofa, *ofb, *ofc;
} tucker_plan;

void slimtorch_tucker_free(tucker_plan *p) {
    if (!p) return;
    free(p->pu); free(p->pk); free(p->pv); free(p->pb); free(p->cha); free(p->chb); free(p->chc);
    free(p->ofa); free(p->ofb); free(p->ofc);
    free(p);
}

/* The plan of a layer for inputs of C x H x W; NULL when memory could not be allocated. The
 * weights are copied (packed): later changes to them need a new plan. */
tucker_plan *slimtorch_tucker_plan(int C, int H, int W,
                                   const float *u, int r1,                  /* (r1, C) */
                                   const float *k, int r2, int kh, int kw,  /* (r2, r1, kh, kw) */
                                   int sh, int sw, int ph, int pw, int dh, int dw,
                                   const float *v, const float *bias, int CO) { /* (CO, r2), (CO) */
    tucker_plan *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    *p = (tucker_plan){.C = C, .H = H, .W = W, .r1 = r1, .r2 = r2, .kh = kh, .kw = kw, .CO = CO,
                       .sh = sh, .sw = sw, .ph = ph, .pw = pw, .dh = dh, .dw = dw,
                       .oba = block_of(r1), .obb = block_of(r2), .obc = block_of(CO),
                       .taps = r1 * kh * kw};
    int taps = p->taps;
    long Wp = W + 2 * pw;
    p->pu = pack(u, r1, C, p->oba);
    p->pk = pack(k, r2, taps, p->obb);
    p->pv = pack(v, CO, r2, p->obc);
    p->pb = bias ? pack(bias, CO, 1, p->obc) : NULL; /* (CO, 1) packs to a zero-padded vector */
    p->cha = malloc(sizeof(int) * C);
    p->chb = malloc(sizeof(int) * taps);
    p->chc = malloc(sizeof(int) * r2);
    p->ofa = calloc(C, sizeof(long));
    p->ofb = malloc(sizeof(long) * taps);
    p->ofc = calloc(r2, sizeof(long));
    if (!(p->pu && p->pk && p->pv && (p->pb || !bias) && p->cha && p->chb && p->chc && p->ofa &&
          p->ofb && p->ofc)) {
        slimtorch_tucker_free(p);
        return NULL;
    }
    for (int i = 0; i < C; i++) p->cha[i] = i;
    for (int i = 0; i < r2; i++) p->chc[i] = i;
    for (int i = 0; i < r1; i++)
        for (int a = 0; a < kh; a++)
            for (int b = 0; b < kw; b++) {
                int t = (i * kh + a) * kw + b;
                p->chb[t] = i;
                p->ofb[t] = (long)a * dh * Wp + (long)b * dw;
            }
    return p;
}

/* y = the layer on N images x of the plan's input size (+ res, then ReLU when asked).
 * Returns 0 on success, 1 when scratch memory could not be allocated (y is then undefined). */
int slimtorch_tucker_run(const tucker_plan *p, const float *x, int N, float *y, const float *res,
                         int relu, int nthreads) {
    int C = p->C, H = p->H, W = p->W, r1 = p->r1, r2 = p->r2, CO = p->CO, taps = p->taps;
    int sh = p->sh, sw = p->sw, ph = p->ph, pw = p->pw, oba = p->oba, obb = p->obb, obc = p->obc;
    int Hp = H + 2 * ph, Wp = W + 2 * pw;
    int H1 = Hp - p->dh * (p->kh - 1), W1 = Wp - p->dw * (p->kw - 1); /* stride-1 output grid */
    int Ho = (H1 - 1) / sh + 1, Wo = (W1 - 1) / sw + 1;
    long HW = (long)H * W, HoWo = (long)Ho * Wo;
    long zs = HW + SLACK;                                               /* 1x1-in output plane */
    long ps = (long)Hp * Wp + (long)p->dh * (p->kh - 1) * Wp + (long)p->dw * (p->kw - 1) + SLACK;
    long ts = (long)H1 * Wp + SLACK;                                    /* core output plane */
    long cs = HoWo + SLACK;                                             /* compacted core output */
    const float *pu = p->pu, *pk = p->pk, *pv = p->pv, *pb = p->pb;
    const int *cha = p->cha, *chb = p->chb, *chc = p->chc;
    const long *ofa = p->ofa, *ofb = p->ofb, *ofc = p->ofc;
    int err = 0;
    if (N <= 0) return 0;
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
    {
#if defined(CSR_FTZ_DAZ)
        unsigned int csr = _mm_getcsr();
        _mm_setcsr(csr | CSR_FTZ_DAZ);
#endif
        float *xt = malloc((size_t)C * (QB_MAX * VW + SLACK) * 4); /* the input's last pixels */
        float *z = calloc((size_t)r1 * zs, 4);
        float *zp = calloc((size_t)r1 * ps, 4); /* borders stay zero: the padding */
        float *t = calloc((size_t)r2 * ts, 4);
        float *tc = calloc((size_t)r2 * cs, 4);
        if (!xt || !z || !zp || !t || !tc) {
#pragma omp atomic write
            err = 1;
        } else {
            stage_fn *fa = stage_for(oba), *fb = stage_for(obb), *fc = stage_for(obc);
            long step = (long)(oba == 4 ? QB_WIDE : QB_NARROW) * VW;
            long full = HW - HW % step; /* pixels the 1x1-in reads straight from x */
            long xts = QB_MAX * VW + SLACK;
#pragma omp for schedule(static)
            for (int n = 0; n < N; n++) {
                const float *xn = x + (long)n * C * HW;
                fa(xn, HW, C, cha, ofa, pu, NULL, z, r1, zs, full, full, 0, NULL);
                if (full < HW) { /* copy the tail so no read goes past the input tensor */
                    for (int i = 0; i < C; i++)
                        memcpy(xt + i * xts, xn + i * HW + full, (size_t)(HW - full) * 4);
                    fa(xt, xts, C, cha, ofa, pu, NULL, z + full, r1, zs, HW - full, HW - full, 0,
                       NULL);
                }
                for (int o = 0; o < r1; o++)
                    for (int h = 0; h < H; h++)
                        memcpy(zp + o * ps + (long)(h + ph) * Wp + pw, z + o * zs + (long)h * W,
                               (size_t)W * 4);
                if (sh == 1) {
                    fb(zp, ps, taps, chb, ofb, pk, NULL, t, r2, ts, (long)H1 * Wp, (long)H1 * Wp,
                       0, NULL);
                } else {
                    for (int ho = 0; ho < Ho; ho++) {
                        long r0 = (long)ho * sh * Wp;
                        fb(zp + r0, ps, taps, chb, ofb, pk, NULL, t + r0, r2, ts, W1, W1, 0, NULL);
                    }
                }
                for (int o = 0; o < r2; o++)
                    for (int h = 0; h < Ho; h++) {
                        const float *src = t + o * ts + (long)h * sh * Wp;
                        float *dst = tc + o * cs + (long)h * Wo;
                        if (sw == 1) memcpy(dst, src, (size_t)Wo * 4);
                        else for (int w = 0; w < Wo; w++) dst[w] = src[(long)w * sw];
                    }
                fc(tc, cs, r2, chc, ofc, pv, pb, y + (long)n * CO * HoWo, CO, HoWo, HoWo, HoWo,
                   relu, res ? res + (long)n * CO * HoWo : NULL);
            }
        }
        free(xt); free(z); free(zp); free(t); free(tc);
#if defined(CSR_FTZ_DAZ)
        _mm_setcsr(csr);
#endif
    }
    return err;
}

/* One call: plan, run, free. Returns 0 on success, 1 when memory could not be allocated. */
int slimtorch_tucker_block(const float *x, int N, int C, int H, int W,
                           const float *u, int r1,                  /* (r1, C) */
                           const float *k, int r2, int kh, int kw,  /* (r2, r1, kh, kw) */
                           int sh, int sw, int ph, int pw, int dh, int dw,
                           const float *v, const float *bias, int CO, /* (CO, r2), (CO) or NULL */
                           float *y, const float *res, int relu, int nthreads) {
    if (N <= 0) return 0;
    tucker_plan *p = slimtorch_tucker_plan(C, H, W, u, r1, k, r2, kh, kw, sh, sw, ph, pw, dh, dw,
                                           v, bias, CO);
    if (!p) return 1;
    int err = slimtorch_tucker_run(p, x, N, y, res, relu, nthreads);
    slimtorch_tucker_free(p);
    return err;
}
