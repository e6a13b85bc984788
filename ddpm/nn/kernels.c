/* Fused CPU kernels, float32, built per instruction-set level and loaded by ddpm/nn/kernels.py (which holds the autograd
   wrappers of the GroupNorm and attention backwards).
   Each image (and head, and tile of a weight gradient) is computed by one thread in a fixed order: the result
   does not depend on the thread count. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

/* One vector of the target's register width: 16 floats with AVX-512, 8 with AVX or AVX2 (GCC keeps wider
   vectors in memory there and turns their comparisons into scalar code: the kernels ran slower than PyTorch's
   ops on AVX2), loaded and stored unaligned. Every loop below runs lane by lane in a fixed order, and lane k's
   operations do not depend on the width: each width computes the same bits. */
#ifndef VW /* (a test builds both widths on one machine: -DVW=16) */
#if defined(__AVX512F__)
#define VW 16
#else
#define VW 8
#endif
#endif
typedef float vf __attribute__((vector_size(4 * VW), aligned(4)));
typedef int32_t vi __attribute__((vector_size(4 * VW), aligned(4)));

/* e^x lane by lane: Cephes' expf (x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-7 polynomial; relative error
   below 2e-7), the argument clamped to [-87.3, 88.3]; NaN stays NaN. */
static inline vf expv(vf x)
{
    vi m = x < -87.3f; /* lanes of -1 where true */
    x = (vf)(((vi)x & ~m) | ((vi)((vf){0} - 87.3f) & m));
    m = x > 88.3f;
    x = (vf)(((vi)x & ~m) | ((vi)((vf){0} + 88.3f) & m));
    const vi ni = __builtin_convertvector(x * 1.44269504f + 128.5f, vi) - 128; /* round(x / ln2) */
    const vf n = __builtin_convertvector(ni, vf);
    const vf r = x - n * 0.693359375f + n * 2.12194440e-4f; /* Cody-Waite: ln2 in two parts */
    const vf p = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r
                   + 1.6666665459e-1f) * r + 5.0000001201e-1f) * r * r + r + 1.f;
    return p * (vf)((ni + 127) << 23); /* times 2^n, built in the exponent bits */
}

/* a > b ? a : b, lane by lane */
static inline vf maxv(vf a, vf b)
{
    const vi m = a > b;
    return (vf)(((vi)a & m) | ((vi)b & ~m));
}

/* e^x on one float, the same operations as expv in the same order (so that the scalar paths round as the
   vector ones do, on every instruction set, rather than as the C library's expf). */
static inline float exps(float x)
{
    x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x); /* NaN stays NaN */
    const int32_t ni = (int32_t)(x * 1.44269504f + 128.5f) - 128;
    const float n = (float)ni, r = x - n * 0.693359375f + n * 2.12194440e-4f;
    const float p = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r
                      + 1.6666665459e-1f) * r + 5.0000001201e-1f) * r * r + r + 1.f;
    union { int32_t i; float f; } e = {(ni + 127) << 23};
    return p * e.f;
}

/* Per-channel sums of x and x^2 over positions [p0, p1) of one channels_last image with c channels (a multiple
   of 16, up to 128), added to s and q: two positions at a time (even and odd, summed apart) for c <= 64, else
   one; the order depends on c alone, not on the vector width. */
static inline __attribute__((always_inline)) void sums16(const float *xb, int64_t p0, int64_t p1, const int64_t c,
                                                          double *s, double *q)
{
    const int64_t nv = c / VW, lanes = c <= 64 ? 2 : 1;
    vf as[2][128 / VW], aq[2][128 / VW];
    for (int64_t l = 0; l < lanes; ++l)
        for (int64_t u = 0; u < nv; ++u) as[l][u] = aq[l][u] = (vf){0};
    int64_t p = p0;
    for (; p + lanes <= p1; p += lanes)
        for (int64_t l = 0; l < lanes; ++l)
            for (int64_t u = 0; u < nv; ++u) {
                const vf v = *(const vf *)(xb + (p + l) * c + VW * u);
                as[l][u] += v;
                aq[l][u] += v * v;
            }
    for (; p < p1; ++p)
        for (int64_t u = 0; u < nv; ++u) {
            const vf v = *(const vf *)(xb + p * c + VW * u);
            as[0][u] += v;
            aq[0][u] += v * v;
        }
    for (int64_t l = 0; l < lanes; ++l)
        for (int64_t u = 0; u < nv; ++u)
            for (int64_t k = 0; k < VW; ++k) {
                s[VW * u + k] += as[l][u][k];
                q[VW * u + k] += aq[l][u][k];
            }
}

#define BLOCK 64 /* positions summed in float before the partial sums move to double */

/* y = act(GroupNorm(x) * (1 + scale) + shift) on a channels_last map x [n, hw, c]: GroupNorm after Wu & He
   2018 eq. 1-3 (the variance E[x^2] - E[x]^2 from double sums), the time scale-shift of improved-diffusion.
   scale and shift: NULL, or rows of c floats `ss_stride` apart (0: one row for every image). act 1: SiLU.
   mean_out and rstd_out: NULL, or [n, groups] to keep the statistics for the backward.
   Returns 0, or -1 when it could not allocate its scratch. */
int ddpm_group_norm_act(const float *x, float *y, int64_t n, int64_t hw, int64_t c, int64_t groups,
                        const float *weight, const float *bias, const float *scale, const float *shift,
                        int64_t ss_stride, float eps, int act, float *mean_out, float *rstd_out, int threads)
{
    const int64_t cg = c / groups;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(|:failed)
    {
        float *fs = malloc(sizeof(float) * 4 * c);
        double *s = malloc(sizeof(double) * 2 * c);
        failed = !fs || !s;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < n; ++b) {
            if (failed) continue;
            float *fq = fs + c, *a = fs + 2 * c, *o = fs + 3 * c;
            double *q = s + c;
            const float *xb = x + b * hw * c;
            float *yb = y + b * hw * c;
            for (int64_t k = 0; k < c; ++k) s[k] = q[k] = 0.0;
            for (int64_t p0 = 0; p0 < hw; p0 += BLOCK) {
                const int64_t p1 = p0 + BLOCK < hw ? p0 + BLOCK : hw;
                switch (c) { /* a constant channel count: the sums stay in vector registers */
                case 16: sums16(xb, p0, p1, 16, s, q); continue;
                case 32: sums16(xb, p0, p1, 32, s, q); continue;
                case 48: sums16(xb, p0, p1, 48, s, q); continue;
                case 64: sums16(xb, p0, p1, 64, s, q); continue;
                case 96: sums16(xb, p0, p1, 96, s, q); continue;
                case 128: sums16(xb, p0, p1, 128, s, q); continue;
                }
                for (int64_t k = 0; k < c; ++k) fs[k] = fq[k] = 0.f;
                for (int64_t p = p0; p < p1; ++p) {
                    const float *xr = xb + p * c;
#pragma omp simd
                    for (int64_t k = 0; k < c; ++k) { fs[k] += xr[k]; fq[k] += xr[k] * xr[k]; }
                }
                for (int64_t k = 0; k < c; ++k) { s[k] += fs[k]; q[k] += fq[k]; }
            }
            for (int64_t g = 0; g < groups; ++g) { /* y = a x + o per channel */
                double ss = 0.0, qq = 0.0;
                for (int64_t k = g * cg; k < (g + 1) * cg; ++k) { ss += s[k]; qq += q[k]; }
                const double count = (double)(hw * cg), mean = ss / count, var = qq / count - mean * mean;
                const float rstd = (float)(1.0 / sqrt((var > 0.0 ? var : 0.0) + eps));
                if (mean_out) {
                    mean_out[b * groups + g] = (float)mean;
                    rstd_out[b * groups + g] = rstd;
                }
                for (int64_t k = g * cg; k < (g + 1) * cg; ++k) {
                    float ak = rstd * weight[k], ok = bias[k] - (float)mean * ak;
                    if (scale) {
                        const float m = 1.f + scale[b * ss_stride + k];
                        ak *= m;
                        ok = ok * m + shift[b * ss_stride + k];
                    }
                    a[k] = ak;
                    o[k] = ok;
                }
            }
            if (act && c % 16 == 0) { /* SiLU(v) = v / (1 + e^-v), a vector of channels at a time */
                for (int64_t p = 0; p < hw; ++p)
                    for (int64_t k = 0; k < c; k += VW) {
                        const vf v = *(const vf *)(a + k) * *(const vf *)(xb + p * c + k) + *(const vf *)(o + k);
                        *(vf *)(yb + p * c + k) = v / (1.f + expv(-v));
                    }
                continue;
            }
            for (int64_t p = 0; p < hw; ++p) {
                const float *xr = xb + p * c;
                float *yr = yb + p * c;
                if (act) {
                    for (int64_t k = 0; k < c; ++k) { const float v = a[k] * xr[k] + o[k]; yr[k] = v / (1.f + exps(-v)); }
                } else {
#pragma omp simd
                    for (int64_t k = 0; k < c; ++k) yr[k] = a[k] * xr[k] + o[k];
                }
            }
        }
        free(fs);
        free(s);
    }
    return failed ? -1 : 0;
}

/* The backward of ddpm_group_norm_act, given the forward's input x, statistics and the output's gradient dy
   (all [n, hw, c] channels_last, the statistics [n, groups]). With u = a x + o the pre-activation and
   xhat = (x - mean) rstd: du = dy SiLU'(u) (SiLU'(u) = s (1 + u (1 - s)), s the logistic of u), and
   dx = rstd (g - mean_group(g) - xhat mean_group(g xhat)) with g = du (1 + scale) weight (the GroupNorm
   backward), computed as dx = P du + Q x + R per channel. With A and B the sums over positions of du and
   du xhat, per image and channel, it also writes the parameters' gradients per image, for the caller to sum
   over the batch: d_weight_part = (1 + scale) B, d_bias_part = (1 + scale) A, and where scale is given,
   d_ss [n, 2c] = (weight B + bias A, A) (u = z (1 + scale) + shift with z = xhat weight + bias).
   Returns 0, or -1 when it could not allocate its scratch. */
int ddpm_group_norm_act_backward(const float *x, const float *dy, float *dx, const float *mean, const float *rstd,
                                 int64_t n, int64_t hw, int64_t c, int64_t groups, const float *weight,
                                 const float *bias, const float *scale, const float *shift, int64_t ss_stride,
                                 int act, float *d_weight_part, float *d_bias_part, float *d_ss, int threads)
{
    const int64_t cg = c / groups;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(|:failed)
    {
        float *buf = malloc(sizeof(float) * 9 * c);
        double *acc = malloc(sizeof(double) * 3 * c);
        failed = !buf || !acc;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < n; ++b) {
            if (failed) continue;
            float *a = buf, *o = buf + c, *mk = buf + 2 * c, *rk = buf + 3 * c, *fa = buf + 4 * c,
                  *fb = buf + 5 * c, *pk = buf + 6 * c, *qk = buf + 7 * c, *ck = buf + 8 * c;
            double *sa = acc, *sb = acc + c, *dm = acc + 2 * c; /* dm: 1 + scale */
            const float *xb = x + b * hw * c, *gb = dy + b * hw * c;
            float *db = dx + b * hw * c;
            for (int64_t k = 0; k < c; ++k) {
                const int64_t g = k / cg;
                dm[k] = scale ? 1.0 + scale[b * ss_stride + k] : 1.0;
                const float m = (float)dm[k];
                mk[k] = mean[b * groups + g];
                rk[k] = rstd[b * groups + g];
                a[k] = rk[k] * weight[k] * m;
                o[k] = (bias[k] - mk[k] * rk[k] * weight[k]) * m + (scale ? shift[b * ss_stride + k] : 0.f);
                sa[k] = sb[k] = 0.0;
            }
            for (int64_t p0 = 0; p0 < hw; p0 += BLOCK) { /* du into dx, and its sums */
                const int64_t p1 = p0 + BLOCK < hw ? p0 + BLOCK : hw;
                for (int64_t k = 0; k < c; ++k) fa[k] = fb[k] = 0.f;
                for (int64_t p = p0; p < p1; ++p) {
                    const float *xr = xb + p * c, *gr = gb + p * c;
                    float *dr = db + p * c;
                    if (act && c % 16 == 0) {
                        for (int64_t k = 0; k < c; k += VW) {
                            const vf xv = *(const vf *)(xr + k), u = *(const vf *)(a + k) * xv + *(const vf *)(o + k);
                            const vf sg = 1.f / (1.f + expv(-u));
                            const vf du = *(const vf *)(gr + k) * sg * (1.f + u * (1.f - sg));
                            *(vf *)(dr + k) = du;
                            *(vf *)(fa + k) += du;
                            *(vf *)(fb + k) += du * (xv - *(const vf *)(mk + k)) * *(const vf *)(rk + k);
                        }
                        continue;
                    }
                    for (int64_t k = 0; k < c; ++k) {
                        float du = gr[k];
                        if (act) {
                            const float u = a[k] * xr[k] + o[k], sg = 1.f / (1.f + exps(-u));
                            du *= sg * (1.f + u * (1.f - sg));
                        }
                        dr[k] = du;
                        fa[k] += du;
                        fb[k] += du * (xr[k] - mk[k]) * rk[k];
                    }
                }
                for (int64_t k = 0; k < c; ++k) { sa[k] += fa[k]; sb[k] += fb[k]; }
            }
            for (int64_t g = 0; g < groups; ++g) { /* dx = P du + Q x + R */
                double m1 = 0.0, m2 = 0.0;
                for (int64_t k = g * cg; k < (g + 1) * cg; ++k) {
                    const double w = (double)weight[k] * dm[k];
                    m1 += w * sa[k];
                    m2 += w * sb[k];
                }
                m1 /= (double)(hw * cg);
                m2 /= (double)(hw * cg);
                const double r = rstd[b * groups + g], mu = mean[b * groups + g];
                for (int64_t k = g * cg; k < (g + 1) * cg; ++k) {
                    pk[k] = (float)(r * weight[k] * dm[k]);
                    qk[k] = (float)(-r * r * m2);
                    ck[k] = (float)(r * (r * m2 * mu - m1));
                    d_weight_part[b * c + k] = (float)(dm[k] * sb[k]);
                    d_bias_part[b * c + k] = (float)(dm[k] * sa[k]);
                    if (d_ss) {
                        d_ss[b * 2 * c + k] = (float)(weight[k] * sb[k] + bias[k] * sa[k]);
                        d_ss[b * 2 * c + c + k] = (float)sa[k];
                    }
                }
            }
            for (int64_t p = 0; p < hw; ++p) {
                const float *xr = xb + p * c;
                float *dr = db + p * c;
#pragma omp simd
                for (int64_t k = 0; k < c; ++k) dr[k] = pk[k] * dr[k] + qk[k] * xr[k] + ck[k];
            }
        }
        free(buf);
        free(acc);
    }
    return failed ? -1 : 0;
}

/* softmax(scale q k^T) v for one head at 16 positions (Vaswani et al. 2017 eq. 1; sampling passes scale 1, q
   already carrying 1/sqrt(d)), d a multiple of 16 up to 64. q, k, v: 16 rows of d floats, `row` apart; out: 16
   rows `ostride` apart. The scores are held transposed, one vector per key over the 16 queries, so that each
   query's softmax runs across vectors; scores and outputs accumulate in vector registers. qt [d, 16] is scratch;
   pt [16, 16] receives the probabilities, transposed (pt[j 16 + i] = P_ij: the backward keeps them). */
static inline __attribute__((always_inline)) void one_head16(const float *q, const float *k, const float *v,
        float *out, int64_t row, int64_t ostride, const int64_t d, float scale, float *qt, float *pt)
{
    for (int64_t r = 0; r < 16; ++r)
        for (int64_t e = 0; e < d; ++e) qt[e * 16 + r] = q[r * row + e];
    vf st[16][16 / VW]; /* st[j][h][r] = q_{h VW + r} . k_j */
    for (int64_t h = 0; h < 16 / VW; ++h)
        for (int64_t j0 = 0; j0 < 16; j0 += 8) {
            vf acc[8];
            for (int64_t i = 0; i < 8; ++i) acc[i] = (vf){0};
            for (int64_t e = 0; e < d; ++e) {
                const vf qe = *(const vf *)(qt + e * 16 + h * VW);
                for (int64_t i = 0; i < 8; ++i) acc[i] += k[(j0 + i) * row + e] * qe;
            }
            for (int64_t i = 0; i < 8; ++i) st[j0 + i][h] = acc[i] * scale; /* x 1 (sampling) is exact */
        }
    for (int64_t h = 0; h < 16 / VW; ++h) { /* each query's softmax over the 16 keys */
        vf mx = st[0][h], sum = (vf){0};
        for (int64_t j = 1; j < 16; ++j) mx = maxv(st[j][h], mx);
        for (int64_t j = 0; j < 16; ++j) {
            st[j][h] = expv(st[j][h] - mx);
            sum += st[j][h];
        }
        const vf inv = 1.f / sum;
        for (int64_t j = 0; j < 16; ++j) *(vf *)(pt + j * 16 + h * VW) = st[j][h] * inv;
    }
    const int64_t nv = d / VW, rows = nv <= 4 ? 4 : 2; /* rows x nv accumulators stay in registers */
    for (int64_t r0 = 0; r0 < 16; r0 += rows) {
        vf acc[4][64 / VW];
        for (int64_t i = 0; i < rows; ++i)
            for (int64_t u = 0; u < nv; ++u) acc[i][u] = (vf){0};
        for (int64_t j = 0; j < 16; ++j) {
            const float *vj = v + j * row;
            for (int64_t u = 0; u < nv; ++u) {
                const vf vv = *(const vf *)(vj + VW * u);
                for (int64_t i = 0; i < rows; ++i) acc[i][u] += pt[j * 16 + r0 + i] * vv;
            }
        }
        for (int64_t i = 0; i < rows; ++i)
            for (int64_t u = 0; u < nv; ++u) *(vf *)(out + (r0 + i) * ostride + VW * u) = acc[i][u];
    }
}

/* Multi-head attention of n images at 16 positions: qkv [n, 16, 3 heads d] (the q, k and v blocks, each
   head-major) -> out [n, 16, heads d], the scores scaled by `scale`. d: 16, 32 or 64. probs: NULL, or
   [n, heads, 16, 16] to keep each head's probabilities, transposed, for the backward.
   Returns 0, -1 for another d. */
int ddpm_attention16(const float *qkv, float *out, float *probs, int64_t n, int64_t heads, int64_t d, float scale,
                     int threads)
{
    const int64_t inner = heads * d, row = 3 * inner;
    if (d != 16 && d != 32 && d != 64)
        return -1;
#pragma omp parallel num_threads(threads)
    {
        float qt[64 * 16], scratch[16 * 16];
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n * heads; ++i) {
            const int64_t b = i / heads, h = i % heads;
            const float *q = qkv + b * 16 * row + h * d;
            float *o = out + b * 16 * inner + h * d, *pt = probs ? probs + i * 256 : scratch;
            if (d == 32) /* constant d: the loops unroll */
                one_head16(q, q + inner, q + 2 * inner, o, row, inner, 32, scale, qt, pt);
            else if (d == 64)
                one_head16(q, q + inner, q + 2 * inner, o, row, inner, 64, scale, qt, pt);
            else
                one_head16(q, q + inner, q + 2 * inner, o, row, inner, 16, scale, qt, pt);
        }
    }
    return 0;
}

/* dst rows (`dstride` apart, d floats each) = sum over m of w[m * wm + r * wr] * src row m (`sstride` apart),
   for the 16 rows r: a 16 x 16 matrix (strides wr, wm) times 16 rows of d, summed over m in order. */
static inline __attribute__((always_inline)) void rows16(const float *w, int64_t wr, int64_t wm, const float *src,
        int64_t sstride, float *dst, int64_t dstride, const int64_t d)
{
    const int64_t nv = d / VW;
    for (int64_t r = 0; r < 16; ++r) {
        vf acc[64 / VW];
        for (int64_t u = 0; u < nv; ++u) acc[u] = (vf){0};
        for (int64_t m = 0; m < 16; ++m) {
            const float c = w[m * wm + r * wr];
            for (int64_t u = 0; u < nv; ++u) acc[u] += c * *(const vf *)(src + m * sstride + VW * u);
        }
        for (int64_t u = 0; u < nv; ++u) *(vf *)(dst + r * dstride + VW * u) = acc[u];
    }
}

/* The backward of one head of one_head16 (S = scale q k^T, P = softmax(S), O = P v), given pt (P transposed)
   and dO (16 rows `ostride` apart): dv = P^T dO, dP = dO v^T, dS = P (dP - rowsum(dP P)) (the softmax's
   Jacobian), dq = scale dS k, dk = scale dS^T q; dq, dk and dv are written as rows `row` apart. vt [d, 16],
   p and ds [16, 16] are scratch. */
static inline __attribute__((always_inline)) void one_head16_backward(const float *q, const float *k,
        const float *v, const float *pt, const float *dout, int64_t row, int64_t ostride, float *dq, float *dk,
        float *dv, const int64_t d, float scale, float *vt, float *p, float *ds)
{
    for (int64_t j = 0; j < 16; ++j)
        for (int64_t e = 0; e < d; ++e) vt[e * 16 + j] = v[j * row + e];
    rows16(pt, 16, 1, dout, ostride, dv, row, d); /* dv_j = sum_i P_ij dO_i */
    for (int64_t i = 0; i < 16; ++i) {
        vf dp[16 / VW]; /* dP_ij over the keys j */
        for (int64_t h = 0; h < 16 / VW; ++h) dp[h] = (vf){0};
        for (int64_t e = 0; e < d; ++e)
            for (int64_t h = 0; h < 16 / VW; ++h) dp[h] += dout[i * ostride + e] * *(const vf *)(vt + e * 16 + h * VW);
        float dot = 0.f, *pi = p + i * 16, *dsi = ds + i * 16;
        for (int64_t j = 0; j < 16; ++j) pi[j] = pt[j * 16 + i];
        for (int64_t h = 0; h < 16 / VW; ++h) *(vf *)(dsi + h * VW) = dp[h];
        for (int64_t j = 0; j < 16; ++j) dot += dsi[j] * pi[j];
        for (int64_t h = 0; h < 16 / VW; ++h)
            *(vf *)(dsi + h * VW) = *(const vf *)(pi + h * VW) * (dp[h] - dot) * scale;
    }
    rows16(ds, 16, 1, k, row, dq, row, d); /* dq_i = sum_j dS_ij k_j */
    rows16(ds, 1, 16, q, row, dk, row, d); /* dk_j = sum_i dS_ij q_i */
}

/* The backward of ddpm_attention16 (kept probabilities `probs`, the output's gradient dout [n, 16, heads d])
   -> dqkv [n, 16, 3 heads d]. Returns 0, -1 for another d. */
int ddpm_attention16_backward(const float *qkv, const float *probs, const float *dout, float *dqkv, int64_t n,
                              int64_t heads, int64_t d, float scale, int threads)
{
    const int64_t inner = heads * d, row = 3 * inner;
    if (d != 16 && d != 32 && d != 64)
        return -1;
#pragma omp parallel num_threads(threads)
    {
        float vt[64 * 16], p[16 * 16], ds[16 * 16];
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n * heads; ++i) {
            const int64_t b = i / heads, h = i % heads;
            const float *q = qkv + b * 16 * row + h * d, *g = dout + b * 16 * inner + h * d;
            float *dq = dqkv + b * 16 * row + h * d;
            if (d == 32)
                one_head16_backward(q, q + inner, q + 2 * inner, probs + i * 256, g, row, inner, dq, dq + inner,
                                    dq + 2 * inner, 32, scale, vt, p, ds);
            else if (d == 64)
                one_head16_backward(q, q + inner, q + 2 * inner, probs + i * 256, g, row, inner, dq, dq + inner,
                                    dq + 2 * inner, 64, scale, vt, p, ds);
            else
                one_head16_backward(q, q + inner, q + 2 * inner, probs + i * 256, g, row, inner, dq, dq + inner,
                                    dq + 2 * inner, 16, scale, vt, p, ds);
        }
    }
    return 0;
}

/* CALL(R) with R the constant 1..6 equal to r (a tile of r <= 6 rows): each R compiles its own register tile */
#define WITH_ROWS_1_TO_6(r, CALL) \
    do { \
        switch (r) { \
        case 6: CALL(6); break; \
        case 5: CALL(5); break; \
        case 4: CALL(4); break; \
        case 3: CALL(3); break; \
        case 2: CALL(2); break; \
        default: CALL(1); break; \
        } \
    } while (0)

/* The weight gradient of a 3x3 convolution (stride 1, padding 1): one tile of dw, rows co0.. co0 + R - 1 of tap
   (kh, kw) and 16 input channels from ci0, summed over the nb images at xi / dyi (channels_last) and each image's
   pixels that the tap reaches, in order: acc[r] += dy[p, co0 + r] x[p + tap, ci0 ..] (a fused multiply-add per
   lane), starting from what dwt holds. R is a constant where inlined: R x 16 / VW accumulators in registers. */
static inline __attribute__((always_inline)) void conv3x3_dw_tile(const float *xi, const float *dyi, float *dwt,
    int64_t nb, int64_t h, int64_t w, int64_t cin, int64_t cout, int64_t kh, int64_t kw, int64_t co0, int64_t ci0,
    const int R)
{
    vf acc[6][16 / VW];
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < 16 / VW; ++v) acc[r][v] = *(const vf *)(dwt + r * 9 * cin + VW * v);
    const int64_t i0 = kh == 0, i1 = kh == 2 ? h - 1 : h, j0 = kw == 0, j1 = kw == 2 ? w - 1 : w;
    for (int64_t b = 0; b < nb; ++b)
        for (int64_t i = i0; i < i1; ++i) {
            const float *xr = xi + (b * h * w + (i + kh - 1) * w + kw - 1) * cin + ci0;
            const float *dr = dyi + (b * h * w + i * w) * cout + co0;
            for (int64_t j = j0; j < j1; ++j) {
                vf xv[16 / VW];
                for (int v = 0; v < 16 / VW; ++v) xv[v] = *(const vf *)(xr + j * cin + VW * v);
                for (int r = 0; r < R; ++r) {
                    const float g = dr[j * cout + r];
                    for (int v = 0; v < 16 / VW; ++v) acc[r][v] += g * xv[v];
                }
            }
        }
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < 16 / VW; ++v) *(vf *)(dwt + r * 9 * cin + VW * v) = acc[r][v];
}

/* The weight and bias gradients of a 3x3 convolution with stride 1 and padding 1 (no dilation, no groups), from
   its channels_last input x [n, h, w, cin] and output gradient dy [n, h, w, cout]:
   dw[co, kh, kw, ci] = sum over images and pixels p of dy[p, co] x[p + (kh - 1, kw - 1), ci] (zero outside),
   db[co] = sum dy[p, co] (db may be NULL). dw is [cout, 3, 3, cin] (a channels_last [cout, cin, 3, 3]).
   Each tile of dw (a tap, 6 output channels, 16 input channels) is one thread's, summed over the images in order
   and, within an image, over its pixels in order: the bits depend neither on the thread count nor on the vector
   width. Images go in blocks of at least 128 pixels, so that a tile's accumulators stay in registers (AVX2 AMD
   EPYC, 2 threads, batch 128, the dim-32 model's shapes: 153-183 GFLOP/s, against 81-114 for oneDNN's).
   Returns 0, or -1 where cin is not a multiple of 16. */
int ddpm_conv3x3_weight_grad(const float *x, const float *dy, float *dw, float *db, int64_t n, int64_t h, int64_t w,
                             int64_t cin, int64_t cout, int threads)
{
    if (cin % 16 || cin <= 0 || cout <= 0)
        return -1;
    const int64_t per = h * w >= 128 ? 1 : (128 + h * w - 1) / (h * w); /* images per block */
    const int64_t ncob = (cout + 5) / 6, ncib = cin / 16, tiles = 9 * ncob * ncib;
    for (int64_t k = 0; k < cout * 9 * cin; ++k)
        dw[k] = 0.f;
#pragma omp parallel num_threads(threads)
    {
        for (int64_t b = 0; b < n; b += per) {
            const int64_t nb = n - b < per ? n - b : per;
            const float *xi = x + b * h * w * cin, *dyi = dy + b * h * w * cout;
            /* static, the same count each time: a thread gets the same tiles in every block, so no barrier */
#pragma omp for schedule(static) nowait
            for (int64_t u = 0; u < tiles; ++u) {
                const int64_t tap = u / (ncob * ncib), co0 = 6 * (u / ncib % ncob), ci0 = 16 * (u % ncib);
                const int64_t kh = tap / 3, kw = tap % 3, r = cout - co0 < 6 ? cout - co0 : 6;
                float *dwt = dw + co0 * 9 * cin + tap * cin + ci0;
#define DW_TILE(R) conv3x3_dw_tile(xi, dyi, dwt, nb, h, w, cin, cout, kh, kw, co0, ci0, R)
                WITH_ROWS_1_TO_6(r, DW_TILE);
#undef DW_TILE
            }
        }
    }
    if (db) {
        for (int64_t c = 0; c < cout; ++c)
            db[c] = 0.f;
        for (int64_t p = 0; p < n * h * w; ++p)
            for (int64_t c = 0; c < cout; ++c)
                db[c] += dy[p * cout + c];
    }
    return 0;
}

/* A 3x3 convolution with stride 1 and padding 1 by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016,
   eq. 8): each 2x2 output tile is Y = A^T [(G g G^T) . (B^T d B)] A for its 4x4 input tile d, 16 products per tile
   and channel pair where the direct form has 36. With the weights transformed once (U = G g G^T, by the caller),
   the 16 elementwise products summed over input channels are 16 matrix products M_e = V_e U_e; the transforms
   are additions and subtractions only. */

/* V[e][t][ci] = (B^T d B)_e of the 4x4 input tile of each of this block's tiles t (zeros outside the map), one
   vector of input channels at a time; planes e are pv floats apart. B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]. */
/* The next 2x2 output tile (row-major per image, image after image): its image b and top-left output (y0, x0) */
static inline void winograd_next(int64_t h, int64_t w, int64_t *b, int64_t *y0, int64_t *x0)
{
    if ((*x0 += 2) < w)
        return;
    *x0 = 0;
    if ((*y0 += 2) < h)
        return;
    *y0 = 0;
    ++*b;
}

static void winograd_in(const float *x, float *V, int64_t pv, int64_t b0, int64_t nb, int64_t h, int64_t w,
                        int64_t cin)
{
    int64_t b = b0, y0 = 0, x0 = 0;
    for (int64_t t = 0; t < nb * ((h + 1) / 2) * ((w + 1) / 2); ++t, winograd_next(h, w, &b, &y0, &x0)) {
        for (int64_t c = 0; c < cin; c += VW) {
            vf d[4][4], q[4][4];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) {
                    const int64_t r = y0 - 1 + i, s = x0 - 1 + j;
                    d[i][j] = r >= 0 && r < h && s >= 0 && s < w ? *(const vf *)(x + ((b * h + r) * w + s) * cin + c)
                                                                 : (vf){0};
                }
            for (int j = 0; j < 4; ++j) {
                q[0][j] = d[0][j] - d[2][j];
                q[1][j] = d[1][j] + d[2][j];
                q[2][j] = d[2][j] - d[1][j];
                q[3][j] = d[1][j] - d[3][j];
            }
            for (int i = 0; i < 4; ++i) {
                float *o = V + 4 * i * pv + t * cin + c;
                *(vf *)o = q[i][0] - q[i][2];
                *(vf *)(o + pv) = q[i][1] + q[i][2];
                *(vf *)(o + 2 * pv) = q[i][2] - q[i][1];
                *(vf *)(o + 3 * pv) = q[i][1] - q[i][3];
            }
        }
    }
}

/* M[t][co0 ..] = sum over ci in order of V[t][ci] U[ci][co0 ..] for R tiles from t0 and 16 output channels: R x 16 / VW
   accumulators in registers (R a constant where inlined). */
static inline __attribute__((always_inline)) void winograd_mm(const float *V, const float *U, float *M, int64_t cin,
                                                              int64_t cout, int64_t t0, int64_t co0, const int R)
{
    vf acc[6][16 / VW];
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < 16 / VW; ++v) acc[r][v] = (vf){0};
    const float *vr = V + t0 * cin;
    for (int64_t c = 0; c < cin; ++c) {
        vf u[16 / VW];
        for (int v = 0; v < 16 / VW; ++v) u[v] = *(const vf *)(U + c * cout + co0 + VW * v);
        for (int r = 0; r < R; ++r) {
            const float a = vr[r * cin + c];
            for (int v = 0; v < 16 / VW; ++v) acc[r][v] += a * u[v];
        }
    }
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < 16 / VW; ++v) *(vf *)(M + (t0 + r) * cout + co0 + VW * v) = acc[r][v];
}

/* y = A^T M A + bias for each tile's 2x2 outputs inside the map, A^T = [1 1 1 0; 0 1 -1 -1]. */
static void winograd_out(const float *M, int64_t pm, const float *bias, float *y, int64_t b0, int64_t nb, int64_t h,
                         int64_t w, int64_t cout)
{
    int64_t b = b0, y0 = 0, x0 = 0;
    for (int64_t t = 0; t < nb * ((h + 1) / 2) * ((w + 1) / 2); ++t, winograd_next(h, w, &b, &y0, &x0)) {
        for (int64_t c = 0; c < cout; c += VW) {
            vf m[4][4], s[2][4];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j)
                    m[i][j] = *(const vf *)(M + (4 * i + j) * pm + t * cout + c);
            for (int j = 0; j < 4; ++j) {
                s[0][j] = m[0][j] + m[1][j] + m[2][j];
                s[1][j] = m[1][j] - m[2][j] - m[3][j];
            }
            const vf bv = bias ? *(const vf *)(bias + c) : (vf){0};
            for (int i = 0; i < 2 && y0 + i < h; ++i) {
                float *o = y + ((b * h + y0 + i) * w + x0) * cout + c;
                *(vf *)o = s[i][0] + s[i][1] + s[i][2] + bv;
                if (x0 + 1 < w)
                    *(vf *)(o + cout) = s[i][1] - s[i][2] - s[i][3] + bv;
            }
        }
    }
}

/* y [n, h, w, cout] = the 3x3 convolution (stride 1, padding 1) of x [n, h, w, cin] (channels_last) with the
   transformed weights U [16, cin, cout] (U_e = (G g G^T)_e, G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1]) plus bias
   (or NULL). Images go to threads whole, in blocks whose tile count is a multiple of 6 where it can be (48 tiles
   for 8x8 maps, 24 for 4x4), the blocks' planes one cache line more than their size apart (planes 12 KiB apart
   thrashed the L1 cache: 1.18x instead of 1.41x at 64 -> 32 channels). Each output's sums run in a fixed order:
   the bits depend neither on the thread count nor on the vector width. AVX2 AMD EPYC, 2 threads, batch 400:
   1.45-1.73x oneDNN's direct convolution, and closer to float64 (relative error 2-3e-7 against oneDNN's 4-11e-7).
   Returns 0, -1 where cin or cout is not a multiple of 16, 1 where scratch could not be allocated. */
int ddpm_conv3x3_winograd(const float *x, const float *U, const float *bias, float *y, int64_t n, int64_t h, int64_t w,
                          int64_t cin, int64_t cout, int threads)
{
    if (cin % 16 || cout % 16 || cin <= 0 || cout <= 0)
        return -1;
    const int64_t tiles = (h + 1) / 2 * ((w + 1) / 2);
    int64_t per = 1; /* images per block */
    while (per < 64 && per * tiles < 48 && (per * tiles < 16 || per * tiles % 6))
        ++per;
    if (per * tiles % 6 && tiles < 16)
        per = (16 + tiles - 1) / tiles;
    const int64_t blocks = (n + per - 1) / per, pv = per * tiles * cin + 16, pm = per * tiles * cout + 16;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(|:failed)
    {
        float *V = malloc(sizeof(float) * 16 * (pv + pm)), *M = V + 16 * pv;
        failed = V == NULL;
#pragma omp for schedule(static)
        for (int64_t k = 0; k < blocks; ++k) {
            if (!V)
                continue;
            const int64_t b0 = k * per, nb = n - b0 < per ? n - b0 : per, T = nb * tiles;
            winograd_in(x, V, pv, b0, nb, h, w, cin);
            for (int64_t e = 0; e < 16; ++e)
                for (int64_t co0 = 0; co0 < cout; co0 += 16)
                    for (int64_t t0 = 0; t0 < T; t0 += 6) {
                        const float *Ve = V + e * pv, *Ue = U + e * cin * cout;
                        float *Me = M + e * pm;
                        const int64_t r = T - t0 < 6 ? T - t0 : 6;
#define MM_TILE(R) winograd_mm(Ve, Ue, Me, cin, cout, t0, co0, R)
                        WITH_ROWS_1_TO_6(r, MM_TILE);
#undef MM_TILE
                    }
            winograd_out(M, pm, bias, y, b0, nb, h, w, cout);
        }
        free(V);
    }
    return failed;
}

/* Subnormal floats flushed to zero, as results (FTZ) and as inputs (DAZ), on each of ``threads`` threads of the
   OpenMP pool that PyTorch, oneDNN and these kernels share (x86: MXCSR bits 0x8000 and 0x0040; a thread keeps
   them while the pool lives). On x86 an operation on a subnormal costs about a hundred cycles; the default
   run's train and sample stages ran 8% and 13% faster with the flag, bit for bit the same
   (benchmarks/results/flush_denormals_avx2.md). Returns how many threads took it; 0 off x86. */
int ddpm_flush_denormals(int threads)
{
    int done = 0;
#if defined(__x86_64__) || defined(__i386__)
#pragma omp parallel num_threads(threads) reduction(+:done)
    {
        _mm_setcsr(_mm_getcsr() | 0x8040u);
        done += 1;
    }
#endif
    return done;
}

/* The widest vector instruction set this build was compiled for (its -march decides): recorded with every
   model file and run that the kernels computed (ddpm/kernels.py, kernel_record). */
const char *ddpm_isa(void)
{
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__)
    return "avx2";
#elif defined(__AVX__)
    return "avx";
#elif defined(__SSE4_2__)
    return "sse4.2";
#elif defined(__ARM_FEATURE_SVE)
    return "sve";
#elif defined(__ARM_NEON)
    return "neon";
#else
    return "generic";
#endif
}
