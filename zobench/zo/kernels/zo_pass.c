/* One pass of a ZO step over a run of trainable values, in place, with no z temporary.
 *
 * z(seed, i) is a pure function of the step's seed and the value's global index i in the trainable set
 * (Philox4x32-10, Salmon et al. SC'11, the generator of Random123, cuRAND and torch's CUDA RNG): it does
 * not depend on the thread count, the tile size or how a caller splits the tensors, and
 * zobench/zo/philox.py computes the same numbers with torch ops (CPU without a compiler, CUDA).
 *
 *   key     = (seed & 0xffffffff, seed >> 32)
 *   counter = (block & 0xffffffff, block >> 32, 0, 0)
 *   rademacher: block = i / 128; z = +1 where bit i % 128 of the 128 output bits is set, else -1
 *               (bit b = bit b % 32 of word b / 32: the byte order of the sign table in directions.py)
 *   gaussian:   block = i / 4; words (a, b) = (0, 1) and (2, 3) give two Box-Muller pairs
 *               sqrt(-2 log u) (cos t, sin t), u = (a + 0.5) / 2^32, t = 2 pi (b + 0.5) / 2^32,
 *               computed in float64 and rounded once to float32: an error of an ulp of a double changes
 *               the float32 result only where it lies within that ulp of a float32 rounding boundary (one
 *               value in ~10^7 against torch's libm-based log/cos/sin: bench/zo_kernel.py), where in
 *               float32 it would move most values
 *
 * Built with -ffp-contract=off (kernels/build.py): no a*b+c is fused behind our back, so each rounding
 * here is one the torch fallback makes too. The one fused multiply-add, fmaf in the Gaussian term, is
 * written out because torch's vectorised add(x, z, alpha=c) is fmadd(z, c, x). A Rademacher term needs
 * none: c*z is +-c exactly, so x + (+-c) is the same number fused or not.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum { DIR_RADEMACHER = 0, DIR_GAUSSIAN = 1 };

/* Values per tile, small enough that a tile's values and its z stay in L1 while each term of a pass goes
 * over them. Tiles start at multiples of TILE in global index (the first and last of a pass may be cut
 * short), and TILE is a multiple of 128: the Philox blocks a tile touches lie inside it, at most TILE / 4
 * (Gaussian) or TILE / 128 (Rademacher), and their z fit in TILE values. */
#define TILE 1024
#define BLOCKS (TILE / 4)
_Static_assert(TILE % 128 == 0, "a tile holds whole Rademacher blocks");
/* Below this many values a pass stays on the calling thread: waking the team costs more than it saves. */
#define PARALLEL_MIN 65536

typedef union { uint32_t u; float f; } bits32;
typedef union { uint64_t u; double d; } bits64;

#ifdef __AVX512F__
/* The high 32 bits of the 32x32-bit products a * m, 16 lanes: the even lanes' products, and the odd lanes'
 * (moved down), by vpmuludq; their low 32 bits into *lo. */
static inline __m512i mul_hilo(__m512i a, __m512i m, __m512i *lo)
{
    __m512i even = _mm512_mul_epu32(a, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
    *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
    return _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}
#endif

/* Philox4x32-10 on nb counters held one word array per counter word, in place, under key (k0, k1):
 * loops over the counters, so that the 32x32->64-bit products vectorise (vpmuludq). */
static void philox_rounds(uint32_t w[4][BLOCKS], int nb, uint32_t k0, uint32_t k1)
{
    int i0 = 0;
#ifdef __AVX512F__
    /* 16 counters at a time in registers through all ten rounds (the loop's operations below) */
    const __m512i m0 = _mm512_set1_epi32((int)0xD2511F53u), m1 = _mm512_set1_epi32((int)0xCD9E8D57u);
    for (; i0 + 16 <= nb; i0 += 16) {
        __m512i x0 = _mm512_loadu_si512(w[0] + i0), x1 = _mm512_loadu_si512(w[1] + i0);
        __m512i x2 = _mm512_loadu_si512(w[2] + i0), x3 = _mm512_loadu_si512(w[3] + i0);
        uint32_t a = k0, b = k1;
        for (int r = 0; r < 10; r++) {
            __m512i lo0, lo1;
            __m512i hi0 = mul_hilo(x0, m0, &lo0), hi1 = mul_hilo(x2, m1, &lo1);
            x0 = _mm512_ternarylogic_epi32(hi1, x1, _mm512_set1_epi32((int)a), 0x96);  /* xor of three */
            x2 = _mm512_ternarylogic_epi32(hi0, x3, _mm512_set1_epi32((int)b), 0x96);
            x1 = lo1;
            x3 = lo0;
            a += 0x9E3779B9u;
            b += 0xBB67AE85u;
        }
        _mm512_storeu_si512(w[0] + i0, x0);
        _mm512_storeu_si512(w[1] + i0, x1);
        _mm512_storeu_si512(w[2] + i0, x2);
        _mm512_storeu_si512(w[3] + i0, x3);
    }
    if (i0 == nb)
        return;
#endif
    for (int r = 0; r < 10; r++) {
        for (int i = i0; i < nb; i++) {  /* (the counters from i0 on: all where no vector loop ran) */
            uint64_t p0 = (uint64_t)0xD2511F53u * w[0][i];
            uint64_t p1 = (uint64_t)0xCD9E8D57u * w[2][i];
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ w[1][i] ^ k0;
            uint32_t n2 = (uint32_t)(p0 >> 32) ^ w[3][i] ^ k1;
            w[0][i] = n0;
            w[1][i] = (uint32_t)p1;
            w[2][i] = n2;
            w[3][i] = (uint32_t)p0;
        }
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
}

/* The output words of blocks b0 .. b0+nb-1 for seed. */
static void philox_blocks(uint64_t seed, int64_t b0, int nb, uint32_t w[4][BLOCKS])
{
    for (int i = 0; i < nb; i++) {
        w[0][i] = (uint32_t)(b0 + i);
        w[1][i] = (uint32_t)((uint64_t)(b0 + i) >> 32);
        w[2][i] = w[3][i] = 0;
    }
    philox_rounds(w, nb, (uint32_t)seed, (uint32_t)(seed >> 32));
}

/* The bare block function, for the known-answer test. */
void zo_philox(const uint32_t *ctr, const uint32_t *key, uint32_t *out)
{
    uint32_t w[4][BLOCKS];
    for (int j = 0; j < 4; j++) w[j][0] = ctr[j];
    philox_rounds(w, 1, key[0], key[1]);
    for (int j = 0; j < 4; j++) out[j] = w[j][0];
}

static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* The float sign bit of z for indices g .. g+n-1 (z = +1 where the index's Philox bit is set): whole
 * blocks are expanded into buf, and the pointer returned is where index g sits in it. */
static const uint32_t *rademacher_tile(uint64_t seed, int64_t g, int n, uint32_t *buf)
{
    uint32_t w[4][BLOCKS];
    int64_t b0 = g >> 7;
    int nb = (int)(((g + n - 1) >> 7) - b0 + 1);
    philox_blocks(seed, b0, nb, w);
    for (int i = 0; i < nb; i++)
        for (int v = 0; v < 4; v++)
            for (int k = 0; k < 32; k++)
                buf[128 * i + 32 * v + k] = (~w[v][i] >> k & 1u) << 31;
    return buf + (g - b0 * 128);
}

/* Box-Muller's log, sin and cos are written out here with + - * / and sqrt only, each correctly rounded in
 * IEEE arithmetic on every CPU and GPU, rather than taken from libm: zo/philox.py repeats the same
 * operations with torch ops, so Gaussian z is the same number bit for bit everywhere (libm and torch's
 * log differ by an ulp now and then), and they vectorise where libm's scalar calls made a Gaussian pass
 * slower than the torch.Generator draw it replaces.
 *
 * log of x in (0, 1): fdlibm's e_log.c (< 1 ulp) without its special cases, branch-free. */
static inline double log01(double x)
{
    const double lg1 = 6.666666666666735130e-01, lg2 = 3.999999999940941908e-01,
                 lg3 = 2.857142874366239149e-01, lg4 = 2.222219843214978396e-01,
                 lg5 = 1.818357216161805012e-01, lg6 = 1.531383769920937332e-01,
                 lg7 = 1.479819860511658591e-01, ln2_hi = 6.93147180369123816490e-01,
                 ln2_lo = 1.90821492927058770002e-10;
    bits64 v = {.d = x};
    uint32_t hx = (uint32_t)(v.u >> 32) & 0x000fffffu;
    uint32_t i = (hx + 0x95f64u) & 0x100000u;  /* 1 where the mantissa is above sqrt(2): halve it */
    double k = (double)((int32_t)(v.u >> 52) - 1023 + (int32_t)(i >> 20));
    v.u = (uint64_t)(hx | (i ^ 0x3ff00000u)) << 32 | (v.u & 0xffffffffu);
    double f = v.d - 1.0, s = f / (2.0 + f), z = s * s, w = z * z;
    double r = z * (lg1 + w * (lg3 + w * (lg5 + w * lg7))) + w * (lg2 + w * (lg4 + w * lg6));
    double hfsq = 0.5 * f * f;
    double big = k * ln2_hi - ((hfsq - (s * (hfsq + r) + k * ln2_lo)) - f);
    double small = k * ln2_hi - ((s * (f - r) - k * ln2_lo) - f);
    return (int32_t)((hx - 0x6147au) | (0x6b851u - hx)) > 0 ? big : small;
}

/* sin and cos on [0, pi/4]: fdlibm's k_sin.c and k_cos.c (FreeBSD's branch-free forms). */
static inline double sin_k(double x)
{
    const double s1 = -1.66666666666666324348e-01, s2 = 8.33333333332248946124e-03,
                 s3 = -1.98412698298579493134e-04, s4 = 2.75573137070700676789e-06,
                 s5 = -2.50507602534068634195e-08, s6 = 1.58969099521155010221e-10;
    double z = x * x, w = z * z, r = s2 + z * (s3 + z * s4) + z * w * (s5 + z * s6);
    return x + z * x * (s1 + z * r);
}

static inline double cos_k(double x)
{
    const double c1 = 4.16666666666666019037e-02, c2 = -1.38888888888741095749e-03,
                 c3 = 2.48015872894767294178e-05, c4 = -2.75573143513906633035e-07,
                 c5 = 2.08757232129817482790e-09, c6 = -1.13596475577881948265e-11;
    double z = x * x, w = z * z, r = z * (c1 + z * (c2 + z * c3)) + w * w * (c4 + z * (c5 + z * c6));
    double hz = 0.5 * z, one_hz = 1.0 - hz;
    return one_hz + (((1.0 - one_hz) - hz) + z * r);
}

/* Gaussian z for indices g .. g+n-1, returned as for rademacher_tile. The angle 2 pi (u + 0.5) / 2^32 is
 * reduced on the integer u, exactly: its top two bits are the quadrant, and the octant past pi/4 is the
 * mirror 2^30 - 1 - m of the rest, so sin and cos only ever see [0, pi/4]. */
static const float *gaussian_tile(uint64_t seed, int64_t g, int n, float *buf)
{
    const double two_pi_2m32 = 2.0 * M_PI * 0x1p-32;
    uint32_t w[4][BLOCKS];
    int64_t b0 = g >> 2;
    int nb = (int)(((g + n - 1) >> 2) - b0 + 1);
    float out[4][BLOCKS];
    philox_blocks(seed, b0, nb, w);
    for (int p = 0; p < 2; p++) {
        for (int i = 0; i < nb; i++) {
            double rad = sqrt(-2.0 * log01(((double)w[2 * p][i] + 0.5) * 0x1p-32));
            uint32_t u = w[2 * p + 1][i], q = u >> 30, m = u & 0x3fffffffu, mirror = m >> 29;
            double y = ((double)(m ^ mirror * 0x3fffffffu) + 0.5) * two_pi_2m32;  /* 2^30-1-m if mirror */
            double sy = sin_k(y), cy = cos_k(y);
            /* quadrant q turns (sin, cos) into (s, c), (c, -s), (-s, -c), (-c, s); the mirror swaps too */
            uint32_t swap = mirror ^ (q & 1);
            bits64 sin_t = {.d = swap ? cy : sy}, cos_t = {.d = swap ? sy : cy};
            sin_t.u ^= (uint64_t)(q >> 1) << 63;
            cos_t.u ^= (uint64_t)((q ^ q >> 1) & 1) << 63;
            out[2 * p][i] = (float)(rad * cos_t.d);
            out[2 * p + 1][i] = (float)(rad * sin_t.d);
        }
    }
    for (int i = 0; i < nb; i++)
        for (int v = 0; v < 4; v++)
            buf[4 * i + v] = out[v][i];
    return buf + (g - b0 * 4);
}

static inline float bf16_to_float(uint16_t h) { bits32 v = {.u = (uint32_t)h << 16}; return v.f; }

/* Round to nearest even, NaN kept a (quiet) NaN: c10::BFloat16's conversion. */
static inline uint16_t float_to_bf16(float f)
{
    bits32 v = {.f = f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u)
        return 0x7fc0;
    return (uint16_t)((v.u + 0x7fffu + (v.u >> 16 & 1u)) >> 16);
}

static void load(const void *src, int dtype, int64_t j0, int n, float *x)
{
    if (dtype == DT_F32)
        memcpy(x, (const float *)src + j0, (size_t)n * sizeof *x);
    else if (dtype == DT_BF16)
        for (int j = 0; j < n; j++) x[j] = bf16_to_float(((const uint16_t *)src)[j0 + j]);
    else
        for (int j = 0; j < n; j++) x[j] = (float)((const _Float16 *)src)[j0 + j];
}

/* dst[at(j)] = x[j] rounded to dtype, at(j) = index[j0 + j] when index is given, else j0 + j. */
static void store(void *dst, int dtype, const int64_t *index, int64_t j0, int n, const float *x)
{
    if (index == NULL) {
        if (dtype == DT_F32)
            memcpy((float *)dst + j0, x, (size_t)n * sizeof *x);
        else if (dtype == DT_BF16)
            for (int j = 0; j < n; j++) ((uint16_t *)dst)[j0 + j] = float_to_bf16(x[j]);
        else
            for (int j = 0; j < n; j++) ((_Float16 *)dst)[j0 + j] = (_Float16)x[j];
    } else {
        if (dtype == DT_F32)
            for (int j = 0; j < n; j++) ((float *)dst)[index[j0 + j]] = x[j];
        else if (dtype == DT_BF16)
            for (int j = 0; j < n; j++) ((uint16_t *)dst)[index[j0 + j]] = float_to_bf16(x[j]);
        else
            for (int j = 0; j < n; j++) ((_Float16 *)dst)[index[j0 + j]] = (_Float16)x[j];
    }
}

/* x = x rounded to dtype and back: what a separate pass storing into a bf16/fp16 tensor leaves. */
static void round_to(int dtype, int n, float *x)
{
    if (dtype == DT_BF16)
        for (int j = 0; j < n; j++) x[j] = bf16_to_float(float_to_bf16(x[j]));
    else if (dtype == DT_F16)
        for (int j = 0; j < n; j++) x[j] = (float)(_Float16)x[j];
}

struct pass {
    int direction, dtype;
    int64_t offset;
    void *live;
    const int64_t *index;
    float *master;
    const uint64_t *seeds;
    const float *coefs;
    int nterms, nmaster, decay_at;
    float decay;
};

/* The z of one seed over the tile being worked on: the restore and the update of a step use the same z,
 * drawn once (a Gaussian z costs more than the memory traffic of a pass). */
struct zcache {
    int valid;
    uint64_t seed;
    const void *z;
    union { uint32_t sign[TILE]; float gauss[TILE]; } buf;
};

static void add_term(const struct pass *P, int t, int64_t g, int n, float *x, struct zcache *zc)
{
    float c = P->coefs[t];
    if (!zc->valid || zc->seed != P->seeds[t]) {
        zc->z = P->direction == DIR_RADEMACHER ? (const void *)rademacher_tile(P->seeds[t], g, n, zc->buf.sign)
                                               : (const void *)gaussian_tile(P->seeds[t], g, n, zc->buf.gauss);
        zc->valid = 1;
        zc->seed = P->seeds[t];
    }
    if (P->direction == DIR_RADEMACHER) {
        const uint32_t *sign = zc->z;
        uint32_t cb = ((bits32){.f = c}).u;
        for (int j = 0; j < n; j++) {
            bits32 cz = {.u = cb ^ sign[j]};  /* c * z, exactly */
            x[j] = x[j] + cz.f;
        }
    } else {
        const float *z = zc->z;
        for (int j = 0; j < n; j++) x[j] = fmaf(z[j], c, x[j]);
    }
}

static void tile(const struct pass *P, int64_t g, int n)
{
    float x[TILE];
    struct zcache zc = {.valid = 0};
    int64_t j0 = g - P->offset;
    /* Without a master each term is its own pass into the stored dtype: round after each. */
    int round_each = P->master == NULL && P->dtype != DT_F32;
    if (P->master != NULL)
        memcpy(x, P->master + j0, (size_t)n * sizeof *x);
    else
        load(P->live, P->dtype, j0, n, x);
    for (int t = 0; t <= P->nmaster; t++) {
        if (t == P->decay_at) {
            for (int j = 0; j < n; j++) x[j] = x[j] * P->decay;
            if (round_each) round_to(P->dtype, n, x);
        }
        if (t == P->nmaster)
            break;
        add_term(P, t, g, n, x, &zc);
        if (round_each) round_to(P->dtype, n, x);
    }
    if (P->master != NULL && (P->nmaster > 0 || P->decay_at >= 0))
        memcpy(P->master + j0, x, (size_t)n * sizeof *x);
    for (int t = P->nmaster; t < P->nterms; t++)
        add_term(P, t, g, n, x, &zc);
    store(P->live, P->dtype, P->index, j0, n, x);
}

/* The values: live[j] for j < n (live's own storage dtype), or, with a float32 master, master[j], live
 * then at index[j] (all of live when index is NULL). Global index of value j: offset + j.
 *
 * Terms 0 .. nmaster-1 go into the values in order (x = x + coefs[t] * z(seeds[t])), the decay
 * (x = x * decay) before term decay_at (decay_at = nmaster: after the last; -1: none); with a master,
 * master keeps the result, and terms nmaster .. nterms-1 go into what is written to live only (the
 * perturbation of a float32 base). Without a master nmaster == nterms. */
void zo_pass(int direction, int dtype, int64_t n, int64_t offset, void *live, const int64_t *index,
             float *master, const uint64_t *seeds, const float *coefs, int nterms, int nmaster,
             int decay_at, float decay, int nthreads)
{
    struct pass P = {direction, dtype, offset, live, index, master, seeds, coefs, nterms, nmaster,
                     decay_at, decay};
    if (n <= 0)
        return;
    int64_t first = offset / TILE, end = (offset + n + TILE - 1) / TILE;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && n >= PARALLEL_MIN)
    for (int64_t t = first; t < end; t++) {
        int64_t g = max64(t * TILE, offset), e = min64(t * TILE + TILE, offset + n);
        tile(&P, g, (int)(e - g));
    }
}

/* ---- QuZO's passes over low-bit codes (zobench/methods/quzo.py, zobench/zo/rounding.py) ----------------
 *
 * The rounding noise of value i, U(seed, i) = (h + v) / 2^16 in (0, 1), in two parts (rounding.py):
 *   h: 16 bits, half i % 2 (the low half first) of word (i / 2) % 4 of Philox block i / 8 under seed;
 *   v: in (0, 1), word i % 4 of Philox block i / 4 under the key seed ^ TIE_KEY, v = ((w >> 9) + 0.5) / 2^23.
 * A stochastic rounding asks only whether U < f for the value's fraction f: with F = 2^16 f and T = floor(F)
 * that is h < T, or, where h == T (one value in 65536), v < F - T, so a pass draws h for every value (a
 * Philox block per 8 values) and v only at those ties (noise_below). Antithetic noise 1 - U is h' = 65535 - h,
 * v' = 1 - v, both exact. */
#define TIE_KEY 0xD1B54A32D192ED03ull

/* The four words of each of blocks 0 .. nb-1 of w, block by block, into out (4 nb words). */
static void block_order(uint32_t w[4][BLOCKS], int nb, uint32_t *out)
{
    int i = 0;
#ifdef __AVX512F__
    /* 16 blocks at a time: the four words of a block brought together (unpacks within 128-bit lanes, then a
     * 4 x 4 transpose of the lanes) */
    for (; i + 16 <= nb; i += 16) {
        __m512 f[4];
        for (int v = 0; v < 4; v++) f[v] = _mm512_castsi512_ps(_mm512_loadu_si512(w[v] + i));
        __m512 ab_lo = _mm512_unpacklo_ps(f[0], f[1]), ab_hi = _mm512_unpackhi_ps(f[0], f[1]);
        __m512 cd_lo = _mm512_unpacklo_ps(f[2], f[3]), cd_hi = _mm512_unpackhi_ps(f[2], f[3]);
        /* lane k of x[r]: block 4k + r's four words */
        __m512 x[4] = {
            _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab_lo), _mm512_castps_pd(cd_lo))),
            _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab_lo), _mm512_castps_pd(cd_lo))),
            _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab_hi), _mm512_castps_pd(cd_hi))),
            _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab_hi), _mm512_castps_pd(cd_hi)))};
        __m512 t0 = _mm512_shuffle_f32x4(x[0], x[1], 0x44), t1 = _mm512_shuffle_f32x4(x[2], x[3], 0x44);
        __m512 t2 = _mm512_shuffle_f32x4(x[0], x[1], 0xEE), t3 = _mm512_shuffle_f32x4(x[2], x[3], 0xEE);
        _mm512_storeu_ps((float *)(out + 4 * i), _mm512_shuffle_f32x4(t0, t1, 0x88));
        _mm512_storeu_ps((float *)(out + 4 * i + 16), _mm512_shuffle_f32x4(t0, t1, 0xDD));
        _mm512_storeu_ps((float *)(out + 4 * i + 32), _mm512_shuffle_f32x4(t2, t3, 0x88));
        _mm512_storeu_ps((float *)(out + 4 * i + 48), _mm512_shuffle_f32x4(t2, t3, 0xDD));
    }
#endif
    for (; i < nb; i++)
        for (int v = 0; v < 4; v++) out[4 * i + v] = w[v][i];
}

/* h of values g .. g+n-1 (n <= TILE) into out, 65535 - h where antithetic. */
static void noise16_tile(uint64_t seed, int64_t g, int n, int antithetic, uint16_t *out)
{
    uint32_t w[4][BLOCKS], all[TILE / 2 + 8];
    int64_t b0 = g >> 3;
    int nb = (int)(((g + n - 1) >> 3) - b0 + 1);
    philox_blocks(seed, b0, nb, w);
    block_order(w, nb, all);
    /* word k's low 16 bits, then its high 16: the words' bytes in order on a little-endian machine */
    int skip = (int)(g - b0 * 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    memcpy(out, (const uint8_t *)all + 2 * skip, (size_t)n * sizeof *out);
#else
    for (int j = 0; j < n; j++) {
        int i = j + skip;
        out[j] = (uint16_t)(all[i >> 1] >> (16 * (i & 1)));
    }
#endif
    if (antithetic)
        for (int j = 0; j < n; j++) out[j] = (uint16_t)(65535 - out[j]);
}

/* v from its Philox word: the top 23 bits plus half a step, exact in float32 and strictly inside (0, 1). */
static inline float fine_of(uint32_t w) { return ((float)(w >> 9) + 0.5f) * 0x1p-23f; }

/* v of values g .. g+n-1 (n <= TILE) for the noise seed `seed`, into out (float32, exact). */
static void fine_tile(uint64_t seed, int64_t g, int n, float *out)
{
    uint32_t w[4][BLOCKS], all[TILE + 4];
    int64_t b0 = g >> 2;
    int nb = (int)(((g + n - 1) >> 2) - b0 + 1);
    philox_blocks(seed ^ TIE_KEY, b0, nb, w);
    block_order(w, nb, all);
    uint32_t *mine = all + (g - b0 * 4);
    for (int j = 0; j < n; j++) out[j] = fine_of(mine[j]);
}

/* At a tie (h == T): whether v (1 - v where antithetic) of value i lies below F - T. One Philox block. */
static int tie_up(uint64_t seed, int antithetic, int64_t i, double F, double T)
{
    uint64_t key = seed ^ TIE_KEY;
    uint32_t ctr[4] = {(uint32_t)(i >> 2), (uint32_t)((uint64_t)(i >> 2) >> 32), 0, 0};
    uint32_t k[2] = {(uint32_t)key, (uint32_t)(key >> 32)}, out[4];
    zo_philox(ctr, k, out);
    float v = fine_of(out[i & 3]);
    if (antithetic)
        v = 1.0f - v;
    return (double)v < F - T;
}

/* Whether U < f for value i, whose h (antithetic applied) is h: exactly the torch path's comparison of
 * (h + v) / 2^16 with f in float64 (a NaN fraction rounds down, as there). */
static inline int noise_below(uint64_t seed, int antithetic, int64_t i, uint32_t h, double f)
{
    double F = f * 65536.0, T = floor(F), hd = (double)h;
    return hd < T || (hd == T && tie_up(seed, antithetic, i, F, T));
}

/* out[j] = U(seed, start + j), j < n (float64: h and v both drawn; for the torch path and the tests). */
void zo_uniform(uint64_t seed, int64_t start, int64_t n, double *out, int nthreads)
{
    if (n <= 0)
        return;
    int64_t first = start / TILE, end = (start + n + TILE - 1) / TILE;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && n >= PARALLEL_MIN)
    for (int64_t t = first; t < end; t++) {
        int64_t g = max64(t * TILE, start), e = min64(t * TILE + TILE, start + n);
        uint16_t h[TILE];
        float v[TILE];
        noise16_tile(seed, g, (int)(e - g), 0, h);
        fine_tile(seed, g, (int)(e - g), v);
        for (int j = 0; j < e - g; j++) out[g - start + j] = ((double)h[j] + (double)v[j]) * 0x1p-16;
    }
}

/* The float z of one seed over g .. g+n-1 (a tile), into z (room for TILE values). */
static void z_tile(int direction, uint64_t seed, int64_t g, int n, float *z)
{
    if (direction == DIR_RADEMACHER && !(g & 127)) {  /* whole blocks from z[0]: +-1 straight from the bits */
        uint32_t w[4][BLOCKS], *out = (uint32_t *)(void *)z;
        int nb = (n + 127) >> 7;  /* the last block's tail lands in z's room beyond n (g + n <= the tile's end) */
        philox_blocks(seed, g >> 7, nb, w);
        for (int i = 0; i < nb; i++)
            for (int v = 0; v < 4; v++)
                for (int k = 0; k < 32; k++)
                    out[128 * i + 32 * v + k] = 0x3f800000u | (~w[v][i] >> k & 1u) << 31;
    } else if (direction == DIR_RADEMACHER) {
        uint32_t buf[TILE];
        const uint32_t *sign = rademacher_tile(seed, g, n, buf);
        for (int j = 0; j < n; j++) {
            bits32 v = {.u = 0x3f800000u ^ sign[j]};  /* +-1 */
            z[j] = v.f;
        }
    } else {
        float buf[TILE];
        const float *gz = gaussian_tile(seed, g, n, buf);
        memcpy(z, gz, (size_t)n * sizeof *z);
    }
}

struct grid4 {
    uint8_t *packed;
    int64_t offset;
    int block_shift;
    const float *absmax;
    const double *levels;
    const int64_t *rank, *code_of;
    int nlevels, direction, nterms, mode, has_decay, stochastic, antithetic;
    const uint64_t *seeds;
    const double *coefs;
    double lr, decay_coef;
    uint64_t noise_seed;
    uint8_t *moved;    /* one bit per value (bit v % 8 of byte v / 8, v the layer's index): moved one level */
    int restore;       /* modes 0 and 2: first restore the pending perturbation R (seed r_seed, signed eps r_coef) */
    uint64_t r_seed;
    double r_coef;
};

enum { GRID_PERTURB = 0, GRID_RESTORE = 1, GRID_UPDATE = 2 };

/* x[i] = level_of[code[i]] + d[i] / a for i in [j, e): AVX2's gather where there is one (same operations). */
static void levels_plus(const double *level_of, const int32_t *code, const double *d, double a, int j, int e,
                        double *x)
{
    int i = j;
#ifdef __AVX2__
    __m256d va = _mm256_set1_pd(a);
    for (; i + 4 <= e; i += 4) {
        __m256d lvl = _mm256_i32gather_pd(level_of, _mm_loadu_si128((const __m128i *)(code + i)), 8);
        _mm256_storeu_pd(x + i, _mm256_add_pd(lvl, _mm256_div_pd(_mm256_loadu_pd(d + i), va)));
    }
#endif
    for (; i < e; i++) x[i] = level_of[code[i]] + d[i] / a;
}

/* Bits b0 .. b0+n-1 of `bits` (bit p is bit p % 8 of byte p / 8) from / into flags[0 .. n-1] (0 or 1). The
 * bytes a call touches are its own: a partial first or last byte keeps its other bits. */
static void get_bits(const uint8_t *bits, int64_t b0, int n, uint8_t *flag)
{
    int j = 0;
    for (; j < n && (b0 + j) & 7; j++) flag[j] = bits[(b0 + j) >> 3] >> ((b0 + j) & 7) & 1;
#if defined(__AVX512BW__)
    for (; j + 64 <= n; j += 64) {  /* 8 bytes of bits to 64 flags */
        uint64_t m;
        memcpy(&m, bits + ((b0 + j) >> 3), 8);
        _mm512_storeu_si512(flag + j, _mm512_maskz_set1_epi8((__mmask64)m, 1));
    }
#endif
    for (; j + 8 <= n; j += 8) {
        uint8_t v = bits[(b0 + j) >> 3];
        for (int k = 0; k < 8; k++) flag[j + k] = v >> k & 1;
    }
    for (; j < n; j++) flag[j] = bits[(b0 + j) >> 3] >> ((b0 + j) & 7) & 1;
}

static void put_bits(uint8_t *bits, int64_t b0, int n, const uint8_t *flag)
{
    int j = 0;
    for (; j < n && (b0 + j) & 7; j++) {  /* up to the first whole byte */
        int64_t p = b0 + j;
        bits[p >> 3] = (uint8_t)((bits[p >> 3] & ~(1u << (p & 7))) | (unsigned)flag[j] << (p & 7));
    }
#if defined(__AVX512BW__)
    for (; j + 64 <= n; j += 64) {  /* 64 flags (0 or 1) to 8 bytes of bits */
        __m512i f = _mm512_loadu_si512(flag + j);
        uint64_t m = (uint64_t)_mm512_test_epi8_mask(f, f);
        memcpy(bits + ((b0 + j) >> 3), &m, 8);
    }
#endif
    for (; j + 8 <= n; j += 8) {
        const uint8_t *f = flag + j;
        bits[(b0 + j) >> 3] = (uint8_t)(f[0] | f[1] << 1 | f[2] << 2 | f[3] << 3 | f[4] << 4 | f[5] << 5 |
                                        f[6] << 6 | f[7] << 7);
    }
    for (; j < n; j++) {  /* the last, partial byte */
        int64_t p = b0 + j;
        bits[p >> 3] = (uint8_t)((bits[p >> 3] & ~(1u << (p & 7))) | (unsigned)flag[j] << (p & 7));
    }
}

/* Write a tile's codes back, packed two a byte (high nibble first). */
static void pack_codes(uint8_t *out, const int32_t *code, int n)
{
    for (int p = 0; p < n / 2; p++) out[p] = (uint8_t)(code[2 * p] << 4 | code[2 * p + 1]);
    if (n & 1)
        out[n >> 1] = (uint8_t)((out[n >> 1] & 15) | code[n - 1] << 4);
}

/* Whether any of f[0 .. n-1] lies outside [0, 1] (or is NaN): a loop without a branch, which vectorises, before
 * the value-by-value search that only such a fraction needs (an update's move of more than a level: rare, and
 * the branchy check alone took ~11% of QuZO's 4-bit passes). */
static inline int out_of_unit(const double *f, int n)
{
    int any = 0;
    for (int i = 0; i < n; i++) any |= !(f[i] >= 0 && f[i] <= 1);
    return any;
}

/* The target's interval found by searching the levels (searchsorted(right=True), then the level below and
 * the fraction, as rounding.round_to_levels does): the rank of its lower level, and the fraction in *frac. */
static int64_t level_search(const double *lv, int L, double target, double *frac)
{
    int64_t h = 0;
    for (int k = 0; k < L; k++) h += lv[k] <= target;
    h = h < 1 ? 1 : (h > L - 1 ? L - 1 : h);
    *frac = (target - lv[h - 1]) / (lv[h] - lv[h - 1]);
    return h - 1;
}

/* The level each value of a tile rounds to (its rank, into hi[]), from its code, the pass's delta and the noise
 * u: x = level(code) + delta / absmax, clamped to the grid, and its fraction in the interval between the code's
 * level and the next one the way of its delta (the tables: the interval the level search finds for a target
 * within it, the same fraction by the same operations). A target past it: a perturbation clips it to the next
 * level (a fraction past 0 or 1 rounds onto that level); an update, whose moves are not bounded, searches the
 * levels for it, value by value (rare: a move of more than a level). zr: the pending perturbation's z where
 * the caller drew it (the first term's, where the seeds agree), else NULL. */
static void grid4_targets(const struct grid4 *P, const float *zr, int64_t g, int n, int64_t j0, const uint16_t *u,
                          const double *level_of, const double *base_of, const double *gap_of,
                          const int64_t *lo_of, const int32_t *code, int32_t *hi32)
{
    float z[TILE];
    double d[TILE], x[TILE];
    int64_t hi[TILE];  /* 64-bit: the indices of the permutes below */
    const double *lv = P->levels;
    int L = P->nlevels;
    for (int t = 0; t < P->nterms; t++) {
        if (t == 0 && zr && P->r_seed == P->seeds[0])
            memcpy(z, zr, (size_t)n * sizeof *z);
        else
            z_tile(P->direction, P->seeds[t], g, n, z);
        double c = P->coefs[t];
        if (t == 0)
            for (int j = 0; j < n; j++) d[j] = (double)z[j] * c;
        else
            for (int j = 0; j < n; j++) d[j] = fma((double)z[j], c, d[j]);
    }
    if (P->mode == GRID_UPDATE) {
        double m = -P->lr;
        for (int j = 0; j < n; j++) d[j] = d[j] * m;
    }
    double lo_end = lv[0], hi_end = lv[L - 1];
    int sh = P->block_shift;
    for (int j = 0; j < n;) {  /* one run of values per absmax block */
        int64_t block = (j0 + j) >> sh;
        int e = (int)min64((int64_t)n, ((block + 1) << sh) - j0);
        double a = (double)P->absmax[block];
        if (P->has_decay) {
            double dc = P->decay_coef;
            for (int i = j; i < e; i++) d[i] = d[i] - dc * (level_of[code[i]] * a);
        }
        if (a > 0)
            levels_plus(level_of, code, d, a, j, e, x);
        else
            for (int i = j; i < e; i++) x[i] = level_of[code[i]] + 0.0;
        j = e;
    }
    for (int j = 0; j < n; j++) {
        double v = x[j];
        x[j] = v < lo_end ? lo_end : (v > hi_end ? hi_end : v);
    }
    double target[TILE];
    memcpy(target, x, (size_t)n * sizeof *x);
    for (int j = 0; j < n; j++) hi[j] = code[j];  /* 64-bit indices into the tables below */
    for (int j = 0; j < n; j++) hi[j] += d[j] > 0 ? 16 : 0;
    int j = 0;
#ifdef __AVX512F__
    {  /* the 32-entry tables in registers, looked up by permutes rather than gathers from memory (the same
        * values: the operations on them are the loop's below) */
        __m512d b0 = _mm512_loadu_pd(base_of), b1 = _mm512_loadu_pd(base_of + 8);
        __m512d b2 = _mm512_loadu_pd(base_of + 16), b3 = _mm512_loadu_pd(base_of + 24);
        __m512d g0 = _mm512_loadu_pd(gap_of), g1 = _mm512_loadu_pd(gap_of + 8);
        __m512d g2 = _mm512_loadu_pd(gap_of + 16), g3 = _mm512_loadu_pd(gap_of + 24);
        __m512i l0 = _mm512_loadu_si512(lo_of), l1 = _mm512_loadu_si512(lo_of + 8);
        __m512i l2 = _mm512_loadu_si512(lo_of + 16), l3 = _mm512_loadu_si512(lo_of + 24);
        __m512i sixteen = _mm512_set1_epi64(16);
        for (; j + 8 <= n; j += 8) {
            __m512i i = _mm512_loadu_si512(hi + j);
            __mmask8 up = _mm512_test_epi64_mask(i, sixteen);  /* entries 16..31: the upward intervals */
            __m512d base = _mm512_mask_blend_pd(up, _mm512_permutex2var_pd(b0, i, b1),
                                                _mm512_permutex2var_pd(b2, i, b3));
            __m512d gap = _mm512_mask_blend_pd(up, _mm512_permutex2var_pd(g0, i, g1),
                                               _mm512_permutex2var_pd(g2, i, g3));
            __m512i lo = _mm512_mask_blend_epi64(up, _mm512_permutex2var_epi64(l0, i, l1),
                                                 _mm512_permutex2var_epi64(l2, i, l3));
            _mm512_storeu_pd(x + j, _mm512_div_pd(_mm512_sub_pd(_mm512_loadu_pd(x + j), base), gap));
            _mm512_storeu_si512(hi + j, lo);
        }
    }
#endif
    for (; j < n; j++) {
        int64_t i = hi[j];
        x[j] = (x[j] - base_of[i]) / gap_of[i];
        hi[j] = lo_of[i];
    }
    if (P->mode != GRID_PERTURB && out_of_unit(x, n))
        for (int j = 0; j < n; j++)
            if (!(x[j] >= 0 && x[j] <= 1))
                hi[j] = level_search(lv, L, target[j], &x[j]);
    if (P->stochastic)
        for (int j = 0; j < n; j++) hi[j] += noise_below(P->noise_seed, P->antithetic, g + j, u[j], x[j]);
    else
        for (int j = 0; j < n; j++) hi[j] += x[j] >= 0.5;
    for (int j = 0; j < n; j++) hi32[j] = (int32_t)hi[j];
}

/* grid4_targets for one Rademacher term and no decay, with its numbers: delta is +-c (z c exactly) times the
 * update's -lr, so within an absmax block a value's target and fraction depend only on its code and the sign
 * of its z. Each block's 32 (rank, fraction) pairs are computed once, by the operations grid4_targets does
 * for such a value, and each value looks its own up: one division per pair where the general path makes two
 * per value. */
static void grid4_two(const struct grid4 *P, const float *zr, int64_t g, int n, int64_t j0, const uint16_t *u,
                      const double *level_of, const double *base_of, const double *gap_of,
                      const int64_t *lo_of, const int32_t *code, int32_t *hi)
{
    float zbuf[TILE];
    const float *z = zr;
    if (!z) {
        z_tile(P->direction, P->seeds[0], g, n, zbuf);
        z = zbuf;
    }
    const double *lv = P->levels;
    int L = P->nlevels, sh = P->block_shift;
    double lo_end = lv[0], hi_end = lv[L - 1];
    double frac_of[32], dd[2];
    int64_t rank_of[32];
    int ways[2];
    for (int s = 0; s < 2; s++) {  /* s: z = +1; the delta and its way do not depend on the block */
        dd[s] = (double)(s ? 1.0f : -1.0f) * P->coefs[0];
        if (P->mode == GRID_UPDATE)
            dd[s] = dd[s] * -P->lr;
        ways[s] = dd[s] > 0 ? 16 : 0;
    }
#ifdef __AVX512F__
    /* The 32 pairs of a block computed in registers (the loop's operations below, 8 at a time: no store and
     * reload of the tables for every 64 values), kept where no fraction needs the level search */
    __m512d lv0 = _mm512_loadu_pd(level_of), lv1 = _mm512_loadu_pd(level_of + 8);
    __m512d lo_e = _mm512_set1_pd(lo_end), hi_e = _mm512_set1_pd(hi_end), zero = _mm512_setzero_pd();
    __m512d one_d = _mm512_set1_pd(1.0), half = _mm512_set1_pd(0.5), scale16 = _mm512_set1_pd(65536.0);
    __m512d minus1 = _mm512_set1_pd(-1.0);
    __m512i sixteen = _mm512_set1_epi32(16), one = _mm512_set1_epi32(1);
    __m512d b[4], gp[4];
    __m512i rk[4];
    for (int s = 0; s < 2; s++)
        for (int h = 0; h < 2; h++) {
            b[2 * s + h] = _mm512_loadu_pd(base_of + ways[s] + 8 * h);
            gp[2 * s + h] = _mm512_loadu_pd(gap_of + ways[s] + 8 * h);
            rk[2 * s + h] = _mm512_loadu_si512(lo_of + ways[s] + 8 * h);
        }
#endif
    for (int j = 0; j < n;) {  /* one run of values per absmax block */
        int64_t block = (j0 + j) >> sh;
        int e = (int)min64((int64_t)n, ((block + 1) << sh) - j0);
        double a = (double)P->absmax[block];
        int in_regs = 0;
#ifdef __AVX512F__
        __m512d f[4];
        __m512i r[4];
        {
            __mmask8 out = 0;
            __m512d q[2] = {_mm512_set1_pd(a > 0 ? dd[0] / a : 0.0), _mm512_set1_pd(a > 0 ? dd[1] / a : 0.0)};
            for (int k = 0; k < 4; k++) {
                __m512d v = _mm512_add_pd(k & 1 ? lv1 : lv0, q[k >> 1]);
                v = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(v, lo_e, _CMP_LT_OQ), v, lo_e);
                v = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(v, hi_e, _CMP_GT_OQ), v, hi_e);
                f[k] = _mm512_div_pd(_mm512_sub_pd(v, b[k]), gp[k]);
                r[k] = rk[k];
                out |= _mm512_cmp_pd_mask(f[k], zero, _CMP_NGE_UQ) | _mm512_cmp_pd_mask(f[k], one_d, _CMP_NLE_UQ);
            }
            in_regs = P->mode == GRID_PERTURB || !out;
        }
#endif
        if (!in_regs)
            for (int s = 0; s < 2; s++) {
                double q = a > 0 ? dd[s] / a : 0.0;
                int way = ways[s];
                double *frac = frac_of + 16 * s, v[16];
                int64_t *rank = rank_of + 16 * s;
                for (int c = 0; c < 16; c++) {  /* (vectorises: no branch) */
                    v[c] = a > 0 ? level_of[c] + q : level_of[c] + 0.0;
                    v[c] = v[c] < lo_end ? lo_end : (v[c] > hi_end ? hi_end : v[c]);
                    frac[c] = (v[c] - base_of[c + way]) / gap_of[c + way];
                    rank[c] = lo_of[c + way];
                }
                if (P->mode != GRID_PERTURB && out_of_unit(frac, 16))
                    for (int c = 0; c < 16; c++)
                        if (!(frac[c] >= 0 && frac[c] <= 1))
                            rank[c] = level_search(lv, L, v[c], &frac[c]);
            }
        int i = j;
#ifdef __AVX512F__
        if (!in_regs)
            for (int k = 0; k < 4; k++) {
                f[k] = _mm512_loadu_pd(frac_of + 8 * k);
                r[k] = _mm512_loadu_si512(rank_of + 8 * k);
            }
        /* The 32 pairs as int32 tables of 16 entries a way (a value's index: its code, plus 16 where z > 0): the
         * rank, and what a value's 16 noise bits h are compared with, T = floor(2^16 f) (noise_below: h < T
         * rounds up, h == T is a tie), clamped to [-1, 65536], which keeps every comparison (a NaN f: -1, never
         * up); rounding to the nearest, T = 65536 where f >= 0.5 and -1 elsewhere, compared with h = 0 */
        __m512i T[2], R[2];
        for (int s2 = 0; s2 < 2; s2++) {
            __m256i t8[2], r8[2];
            for (int h2 = 0; h2 < 2; h2++) {
                __m512d fk = f[2 * s2 + h2], tk;
                if (P->stochastic) {
                    tk = _mm512_roundscale_pd(_mm512_mul_pd(fk, scale16), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
                    tk = _mm512_min_pd(_mm512_max_pd(tk, minus1), scale16);  /* max: -1 where tk is NaN */
                } else
                    tk = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(fk, half, _CMP_GE_OQ), minus1, scale16);
                t8[h2] = _mm512_cvtpd_epi32(tk);
                r8[h2] = _mm512_cvtepi64_epi32(r[2 * s2 + h2]);
            }
            T[s2] = _mm512_inserti64x4(_mm512_castsi256_si512(t8[0]), t8[1], 1);
            R[s2] = _mm512_inserti64x4(_mm512_castsi256_si512(r8[0]), r8[1], 1);
        }
        /* each value looks its pair up by permutes and compares its noise: 16 values at a time */
        for (; i + 16 <= e; i += 16) {
            __m512i c = _mm512_loadu_si512(code + i);
            __mmask16 pos = _mm512_cmp_ps_mask(_mm512_loadu_ps(z + i), _mm512_setzero_ps(), _CMP_GT_OQ);
            __m512i idx = _mm512_mask_or_epi32(c, pos, c, sixteen);
            __m512i t = _mm512_permutex2var_epi32(T[0], idx, T[1]), rank = _mm512_permutex2var_epi32(R[0], idx, R[1]);
            __m512i h = P->stochastic ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(u + i)))
                                      : _mm512_setzero_si512();
            __mmask16 up = _mm512_cmplt_epi32_mask(h, t), tie = _mm512_cmpeq_epi32_mask(h, t);
            if (tie) {  /* one value in 65536: its fraction from the pairs, and v drawn (noise_below) */
                double fr[32];
                int32_t ix[16];
                for (int k = 0; k < 4; k++) _mm512_storeu_pd(fr + 8 * k, f[k]);
                _mm512_storeu_si512(ix, idx);
                for (int l = 0; l < 16; l++)
                    if (tie >> l & 1) {
                        double F = fr[ix[l]] * 65536.0;
                        if (tie_up(P->noise_seed, P->antithetic, g + i + l, F, floor(F)))
                            up |= (__mmask16)(1u << l);
                    }
            }
            _mm512_storeu_si512(hi + i, _mm512_mask_add_epi32(rank, up, rank, one));
        }
        if (i < e && in_regs)  /* a tail: the scalar loops read the tables */
            for (int k = 0; k < 4; k++) {
                _mm512_storeu_pd(frac_of + 8 * k, f[k]);
                _mm512_storeu_si512(rank_of + 8 * k, r[k]);
            }
#endif
        if (P->stochastic)
            for (; i < e; i++) {
                int t = code[i] + (z[i] > 0 ? 16 : 0);
                hi[i] = rank_of[t] + noise_below(P->noise_seed, P->antithetic, g + i, u[i], frac_of[t]);
            }
        else
            for (; i < e; i++) {
                int t = code[i] + (z[i] > 0 ? 16 : 0);
                hi[i] = rank_of[t] + (frac_of[t] >= 0.5);
            }
        j = e;
    }
}

/* One tile: the pending perturbation restored from its bits, each value's new level found (grid4_two for one
 * Rademacher term without decay, the common case; grid4_targets otherwise), the codes selected and packed
 * back. Simple loops over the values (most vectorise; the per-code tables looked up by AVX-512 permutes), the
 * same operations per value as the torch path. */
static void grid4_tile(const struct grid4 *P, int64_t g, int n)
{
    float zr[TILE];
    uint16_t u[TILE];  /* the rounding noise's 16 bits (noise16_tile) */
    int32_t code[TILE], rank[16], code_of[16] = {0};  /* code_of: L entries used, 16 loaded */
    int32_t hi[TILE];  /* each value's new rank */
    uint8_t flag[TILE];  /* perturb: the value moved; restore: it moved in the pending perturbation */
    double level_of[16];
    int32_t back_up[16], back_down[16], own[16];  /* per code: the code one level down / up; its level's own? */
    /* A perturbation's interval, per code c and way (index c + 16 * (delta > 0)): its lower level's rank, that
     * level and the gap to the next, the interval the level search finds for any target within a level of
     * the code's (at a target past the next level its fraction passes 0 or 1, which rounds onto that level:
     * the one-level clip); the grid's end levels take the interval below or above them, as the search does */
    double base_of[32], gap_of[32];
    int64_t lo_of[32];
    const double *lv = P->levels;
    int L = P->nlevels;
    int64_t j0 = g - P->offset;  /* a multiple of 8 (the caller's check): no byte of codes or bits is shared */
    for (int c = 0; c < 16; c++) {
        rank[c] = (int32_t)P->rank[c];
        level_of[c] = lv[rank[c]];
    }
    for (int k = 0; k < L; k++) code_of[k] = (int32_t)P->code_of[k];
    for (int c = 0; c < 16; c++) {  /* branch-free lookups in the loops below (the signs of z are random) */
        int r = rank[c] < L ? rank[c] : L - 1;
        back_up[c] = code_of[r > 0 ? r - 1 : 0];         /* where a value that moved up came from */
        back_down[c] = code_of[r + 1 < L ? r + 1 : L - 1];
        own[c] = code_of[r] == c;
        int lo_down = r > 0 ? r - 1 : 0, lo_up = r < L - 1 ? r : L - 2;
        lo_of[c] = lo_down;
        lo_of[c + 16] = lo_up;
        base_of[c] = lv[lo_down];
        base_of[c + 16] = lv[lo_up];
        gap_of[c] = lv[lo_down + 1] - lv[lo_down];
        gap_of[c + 16] = lv[lo_up + 1] - lv[lo_up];
    }
    const uint8_t *bytes = P->packed + (j0 >> 1);
    for (int p = 0; p < n / 2; p++) {
        code[2 * p] = bytes[p] >> 4;
        code[2 * p + 1] = bytes[p] & 15;
    }
    if (n & 1)
        code[n - 1] = bytes[n >> 1] >> 4;
    uint8_t *bits = P->moved ? P->moved + (j0 >> 3) : NULL;
    int restoring = P->mode == GRID_RESTORE || P->restore;
    if (restoring) {  /* a moved value goes back one level against its move's sign: exactly its code before */
        uint64_t rs = P->mode == GRID_RESTORE ? P->seeds[0] : P->r_seed;
        double rc = P->mode == GRID_RESTORE ? P->coefs[0] : P->r_coef;
        z_tile(P->direction, rs, g, n, zr);
        get_bits(bits, 0, n, flag);
        int j = 0;
#if defined(__AVX512BW__) && defined(__AVX512VL__)
        {  /* the 16-entry tables in a register each, looked up by permutes (the same selection as below) */
            __m512i t_up = _mm512_loadu_si512(back_up), t_down = _mm512_loadu_si512(back_down);
            __m512d vrc = _mm512_set1_pd(rc), zero = _mm512_setzero_pd();
            for (; j + 16 <= n; j += 16) {
                __m512i c = _mm512_loadu_si512(code + j);
                __mmask8 u0 = _mm512_cmp_pd_mask(_mm512_mul_pd(_mm512_cvtps_pd(_mm256_loadu_ps(zr + j)), vrc), zero,
                                                 _CMP_GT_OQ);
                __mmask8 u1 = _mm512_cmp_pd_mask(_mm512_mul_pd(_mm512_cvtps_pd(_mm256_loadu_ps(zr + j + 8)), vrc),
                                                 zero, _CMP_GT_OQ);
                __mmask16 up = (__mmask16)(u0 | (unsigned)u1 << 8);
                __m128i f8 = _mm_loadu_si128((const __m128i *)(flag + j));
                __mmask16 f = _mm_test_epi8_mask(f8, f8);
                __m512i back = _mm512_mask_blend_epi32(up, _mm512_permutexvar_epi32(c, t_down),
                                                       _mm512_permutexvar_epi32(c, t_up));
                _mm512_storeu_si512(code + j, _mm512_mask_blend_epi32(f, c, back));
            }
        }
#endif
        for (; j < n; j++) {
            int c = code[j], up = (double)zr[j] * rc > 0, f = flag[j];  /* arithmetic, not branches */
            code[j] = (1 - f) * c + f * (up * back_up[c] + (1 - up) * back_down[c]);
        }
        if (P->mode == GRID_RESTORE) {
            pack_codes(P->packed + (j0 >> 1), code, n);
            return;
        }
    }
    if (P->stochastic)
        noise16_tile(P->noise_seed, g, n, P->antithetic, u);
    if (P->direction == DIR_RADEMACHER && P->nterms == 1 && !P->has_decay)
        grid4_two(P, restoring && P->r_seed == P->seeds[0] ? zr : NULL, g, n, j0, u, level_of, base_of, gap_of,
                  lo_of, code, hi);
    else
        grid4_targets(P, restoring ? zr : NULL, g, n, j0, u, level_of, base_of, gap_of, lo_of, code, hi);
    int k = 0;
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    {  /* the same selections as the loops below, 16 values at a time, the tables in registers */
        __m512i t_rank = _mm512_loadu_si512(rank), t_own = _mm512_loadu_si512(own);
        __m512i t_code = _mm512_loadu_si512(code_of);
        for (; k + 16 <= n; k += 16) {
            __m512i c = _mm512_loadu_si512(code + k);
            __m512i moved = _mm512_loadu_si512(hi + k);
            __mmask16 stays = _mm512_cmpeq_epi32_mask(moved, _mm512_permutexvar_epi32(c, t_rank));
            __m512i to = _mm512_permutexvar_epi32(moved, t_code);
            if (P->mode == GRID_PERTURB) {
                __m512i own_c = _mm512_permutexvar_epi32(c, t_own);
                __mmask16 go = _mm512_test_epi32_mask(own_c, own_c) & (__mmask16)~stays;
                _mm_storeu_si128((__m128i *)(flag + k), _mm_maskz_mov_epi8(go, _mm_set1_epi8(1)));
                _mm512_storeu_si512(code + k, _mm512_mask_blend_epi32(go, c, to));
            } else {
                _mm512_storeu_si512(code + k, _mm512_mask_blend_epi32(stays, to, c));
            }
        }
    }
#endif
    if (P->mode == GRID_PERTURB) {
        for (; k < n; k++) {
            /* one level at most (the interval above): a target past the next level is clipped to it */
            int c = code[k], moved = hi[k], go = own[c] & (moved != rank[c]);
            flag[k] = (uint8_t)go;
            code[k] = go ? code_of[moved] : c;
        }
        put_bits(bits, 0, n, flag);
    } else {
        for (; k < n; k++) {
            int c = code[k], moved = hi[k];
            code[k] = moved == rank[c] ? c : code_of[moved];
        }
    }
    pack_codes(P->packed + (j0 >> 1), code, n);
}

/* QuZO's pass over a 4-bit layer's codes (packed two a byte, high nibble first; absmax per block of
 * 2^block_shift values; n values, global index of the first: offset, a multiple of 8) on its levels
 * (ascending, distinct; rank of each code, one code per rank), in place:
 *   mode 0, perturb: delta = coefs[0] * z(seeds[0])                   (coefs[0]: the signed eps)
 *   mode 1, restore: the perturbation by coefs[0] * z(seeds[0]) taken back
 *   mode 2, update:  delta = -lr * sum_t coefs[t] z(seeds[t]) [- decay_coef * weight]
 * x = level(code) + delta / absmax, rounded onto the levels: stochastically with u(noise_seed) (1 - u when
 * antithetic), else to the nearest (ties up); a code whose level does not change keeps its code. A
 * perturbation moves a value at most one level, so that it can be taken back from one bit: a value whose x
 * lies beyond the next level in its move's direction (a block of tiny absmax) moves to that level (its
 * perturbation clipped), one whose code is not its level's own (FP4's -0) is left unperturbed; the values
 * that moved get their bit in moved[] (the others 0), and the restore moves them one level back against the
 * sign of their delta, to exactly the code they had. With `restore` (modes 0 and 2) the pending perturbation R (seed r_seed, signed eps r_coef, its bits
 * in moved[]) is taken back first, in the same pass, z drawn once where R shares the first term's seed.
 * Every operation is the one quzo.py's torch path does, in the same order, in float64 (terms after the
 * first fused as torch's add(alpha) fuses them). With `then` (mode 2), each tile is perturbed straight after
 * its update, as mode 0 would (seed t_seed, signed eps t_coef, noise t_noise, antithetic where t_coef < 0),
 * while its codes and bits are in cache: an update and the next step's first perturbation in one pass over
 * the layer's memory, the codes of the two passes. */
void zo_grid4(uint8_t *packed, int64_t n, int64_t offset, const float *absmax, int block_shift,
              const double *levels, const int64_t *rank, const int64_t *code_of, int nlevels, int direction,
              const uint64_t *seeds, const double *coefs, int nterms, int mode, double lr, int has_decay,
              double decay_coef, int stochastic, uint64_t noise_seed, int antithetic, uint8_t *moved,
              int restore, uint64_t r_seed, double r_coef, int then, uint64_t t_seed, double t_coef,
              uint64_t t_noise, int nthreads)
{
    struct grid4 P = {packed, offset, block_shift, absmax, levels, rank, code_of, nlevels, direction, nterms,
                      mode, has_decay, stochastic, antithetic, seeds, coefs, lr, decay_coef, noise_seed, moved,
                      restore, r_seed, r_coef};
    struct grid4 Q = {packed, offset, block_shift, absmax, levels, rank, code_of, nlevels, direction, 1,
                      GRID_PERTURB, 0, stochastic, t_coef < 0, &t_seed, &t_coef, 0.0, 0.0, t_noise, moved, 0, 0, 0.0};
    if (n <= 0 || nterms < 1)
        return;
    then = then && mode == GRID_UPDATE;
    int64_t first = offset / TILE, end = (offset + n + TILE - 1) / TILE;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && n >= PARALLEL_MIN)
    for (int64_t t = first; t < end; t++) {
        int64_t g = max64(t * TILE, offset), e = min64(t * TILE + TILE, offset + n);
        grid4_tile(&P, g, (int)(e - g));
        if (then)
            grid4_tile(&Q, g, (int)(e - g));
    }
}

/* QuZO on int8 codes (one step per code, the row's unit SCB[row] / 127), values j0 .. j0+n-1 of a layer of
 * `cols` columns whose value 0 has global index `offset` (z and noise are keyed by global index), in place:
 *   mode 0, perturb: x = coefs[0] z / unit, d = round(x); a code that +d or -d would push out of [-127, 127]
 *                    keeps its value, and its position j - j0 goes to kept_out (ascending; the call
 *                    returns how many); whether d rounded up (d - floor(x)) goes to the layer's bits `ups`
 *                    (value v at bit v + offset % 8)
 *   mode 1, restore: the same d, floor(x) + its bit, subtracted, except at the perturbation's kept values,
 *                    kept_at[0 .. n_kept_at - 1] (their j - j0, ascending) (no noise)
 *   mode 2, update:  x = (-lr sum_t coefs[t] z_t [- decay_coef code unit]) / unit, code = clamp(code + round(x))
 * round: floor(x) + (u < x - floor(x)) with u(noise_seed) (1 - u when antithetic), or to the nearest (ties
 * up); x = 0 where unit is 0. With `restore` (modes 0 and 2), the pending perturbation R (its seed and signed
 * eps; kept_at its kept values, ups its bits) is first restored in the same pass, as mode 1 would: one pass where
 * two would read and write every code, z drawn once where R shares the first term's seed, and no noise drawn
 * for R (its bits say how it rounded). The torch path's operations, in the same order, in float64. */
struct int8pass {
    int8_t *codes;
    uint8_t *kept;             /* out: the perturbation's kept flags, a bit each (value j0 + l at bit l + start % 8,
                                  start = offset + j0, so that each tile owns its bytes) */
    const int64_t *kept_at;    /* in: the pending perturbation's kept values */
    int64_t n_kept_at;
    int64_t j0, cols, offset;
    const float *scb;
    int direction, nterms, mode, has_decay, stochastic, antithetic;
    const uint64_t *seeds;
    const double *coefs;
    double lr, decay_coef;
    uint64_t noise_seed;
    int restore;
    uint64_t r_seed;
    double r_coef;
    uint8_t *ups;  /* the layer's bits: whether the perturbation of value v rounded up, at bit v + offset % 8 */
};

/* A move in steps clamped to +-2^20: more steps than that take any code in [-127, 127] out of range whatever
 * their number (a perturbation keeps the code, an update clamps it), and a move past int64's range (a row of
 * tiny scale) would convert to nonsense. zobench/zo/rounding.py's `steps` clamps the torch path's alike. */
static inline double clamp_steps(double x) { return x < -1048576.0 ? -1048576.0 : (x > 1048576.0 ? 1048576.0 : x); }

/* The pending perturbation's kept flags of a tile's n values, l0 the first one's index in the pass (j - j0):
 * 1 at the kept_at positions in [l0, l0 + n), found by bisection. */
static void kept_tile(const struct int8pass *P, int64_t l0, int n, uint8_t *out)
{
    memset(out, 0, (size_t)n);
    int64_t lo = 0, hi = P->n_kept_at;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (P->kept_at[mid] < l0)
            lo = mid + 1;
        else
            hi = mid;
    }
    for (; lo < P->n_kept_at && P->kept_at[lo] < l0 + n; lo++) out[P->kept_at[lo] - l0] = 1;
}

/* int8_tile's common case, one Rademacher term and no decay, on one row's run [j, e) of a tile: a value's
 * step is one of two per row by the sign of its z (z c is +-c exactly), so each row's numbers (floor, rounding
 * threshold, and the restore's floor) are computed once by int8_tile's operations and each value picks its
 * own in one loop of int32 and float lanes (16 a vector). The same codes, kept flags and bits as the general
 * loops. */
static void int8_two_run(const struct int8pass *P, int mode, int restoring, int stochastic, double unit,
                         double r_coef, double lr, int64_t g, const float *restrict z0, const float *restrict zr,
                         const uint16_t *restrict u, const int32_t *restrict keep_in, const int32_t *restrict up_in,
                         int32_t *restrict c, int32_t *restrict keep_out, int32_t *restrict up_out, int j, int e)
{
    int32_t r_low[2] = {0, 0}, low[2], bit[2], thr[2];
    double F[2];
    int32_t b_of[TILE];  /* stochastic: each value's rounding (h < T, its tie resolved) */
    if (restoring && unit > 0) {
        r_low[1] = (int32_t)floor(clamp_steps(((double)1.0f * r_coef) / unit));
        r_low[0] = (int32_t)floor(clamp_steps(((double)-1.0f * r_coef) / unit));
    }
    for (int s = 0; s < 2; s++) {
        double est1 = (double)(s ? 1.0f : -1.0f) * P->coefs[0];
        double x1 = !(unit > 0) ? 0.0 : clamp_steps(mode == 0 ? est1 / unit : (est1 * lr) / unit);
        double f = floor(x1);
        low[s] = (int32_t)f;
        bit[s] = x1 - f >= 0.5;  /* rounding to the nearest */
        F[s] = (x1 - f) * 65536.0;  /* stochastic (noise_below): h < thr rounds up, h == thr is a tie */
        thr[s] = (int32_t)floor(F[s]);
    }
    if (stochastic && mode != 1) {
        int32_t ties = 0;
        for (int i = j; i < e; i++) {  /* (vectorises) */
            int32_t t = z0[i] > 0 ? thr[1] : thr[0], h = u[i];
            b_of[i] = h < t;
            ties |= h == t;
        }
        if (ties)  /* one value in 65536 */
            for (int i = j; i < e; i++) {
                int s = z0[i] > 0;
                if (u[i] == thr[s])
                    b_of[i] = tie_up(P->noise_seed, P->antithetic, g + i, F[s], (double)thr[s]);
            }
    }
    for (int i = j; i < e; i++) {
        int32_t v = c[i];
        if (restoring)
            v -= (1 - keep_in[i]) * ((zr[i] > 0 ? r_low[1] : r_low[0]) + up_in[i]);
        if (mode == 1) {
            c[i] = v;
            continue;
        }
        int s = z0[i] > 0;
        int32_t b = stochastic ? b_of[i] : (s ? bit[1] : bit[0]);
        int32_t d = (s ? low[1] : low[0]) + b;
        if (mode == 0) {  /* a code that +d or -d would push out of [-127, 127] stays */
            int32_t plus = v + d, minus = v - d;
            int32_t k = (plus > 127) | (plus < -127) | (minus > 127) | (minus < -127);
            keep_out[i] = k;
            up_out[i] = b;
            c[i] = k ? v : plus;
        } else {
            int32_t w = v + d;
            c[i] = w < -127 ? -127 : (w > 127 ? 127 : w);
        }
    }
}

/* One tile in simple loops over a row's run of values (each vectorises: no branch on the value, the row's
 * unit constant over the run), the same operations per value as the torch path, in the same order. */
static void int8_tile(const struct int8pass *P, int64_t g, int n)
{
    float z0[TILE], z[TILE];
    uint16_t u[TILE];  /* the rounding noise's 16 bits (noise16_tile) */
    double est[TILE], x[TILE];
    /* codes, the rounded step and its parts (floor, rounding bit), the kept flags and bits widened: every
     * loop below then works on one element type, and vectorises */
    int64_t c[TILE], d[TILE], low[TILE], bit[TILE], keep[TILE], was_up[TILE];
    uint8_t up[TILE];  /* restore: the pending perturbation's rounding (read); perturb: this one's (written) */
    int64_t local = g - P->offset;  /* the layer's value index of g */
    int64_t b0 = local + (P->offset & 7);  /* its bit in ups: tiles after a layer's first start on a byte */
    z_tile(P->direction, P->seeds[0], g, n, z0);
    int two = P->direction == DIR_RADEMACHER && P->nterms == 1 && !P->has_decay;  /* below, at the row's run */
    if (!two)
        for (int j = 0; j < n; j++) est[j] = (double)z0[j] * P->coefs[0];
    for (int t = 1; t < P->nterms; t++) {
        z_tile(P->direction, P->seeds[t], g, n, z);
        double cf = P->coefs[t];
        for (int j = 0; j < n; j++) est[j] = fma((double)z[j], cf, est[j]);
    }
    int mode = P->mode, restoring = mode == 1 || P->restore, stochastic = P->stochastic && mode != 1;
    const float *restrict zr = z0;  /* R's z: the first term's where R has its seed */
    if (restoring && mode != 1 && P->r_seed != P->seeds[0]) {
        z_tile(P->direction, P->r_seed, g, n, z);
        zr = z;
    }
    if (stochastic)
        noise16_tile(P->noise_seed, g, n, P->antithetic, u);
    double r_coef = mode == 1 ? P->coefs[0] : P->r_coef, lr = -P->lr, dc = P->decay_coef;
    int8_t *codes = P->codes + local;
    int64_t k0 = local - P->j0 + ((P->offset + P->j0) & 7);  /* the tile's first kept bit */
    uint8_t kout[TILE];  /* perturb: its kept flags, before they go to P->kept's bits */
    uint8_t kin[TILE];  /* restoring: the pending perturbation's kept flags */
    if (restoring)
        kept_tile(P, local - P->j0, n, kin);
    /* One Rademacher term and no decay (QuZO's default): a value's x is one of two numbers per row, by the
     * sign of its z (z c is +-c exactly), so each row's two are computed once (the same operations on the same
     * numbers) and each value picks its own: no division or floor per value (int8_two_run) */
    if (two) {
        int32_t c32[TILE], keep_in[TILE], up_in[TILE], keep_out[TILE], up_out[TILE];
        for (int j = 0; j < n; j++) c32[j] = codes[j];
        if (restoring) {
            get_bits(P->ups, b0, n, up);
            for (int j = 0; j < n; j++) keep_in[j] = kin[j];
            for (int j = 0; j < n; j++) up_in[j] = up[j];
        }
        for (int j = 0; j < n;) {
            int64_t row = (local + j) / P->cols;
            int e = (int)min64((int64_t)n, (row + 1) * P->cols - local);
            int8_two_run(P, mode, restoring, stochastic, (double)P->scb[row] / 127.0, r_coef, lr, g, z0, zr, u,
                         keep_in, up_in, c32, keep_out, up_out, j, e);
            j = e;
        }
        for (int j = 0; j < n; j++) codes[j] = (int8_t)c32[j];
        if (mode == 0) {
            for (int j = 0; j < n; j++) kout[j] = (uint8_t)keep_out[j];
            put_bits(P->kept, k0, n, kout);
            for (int j = 0; j < n; j++) up[j] = (uint8_t)up_out[j];
            put_bits(P->ups, b0, n, up);
        }
        return;
    }
    for (int j = 0; j < n; j++) c[j] = codes[j];
    if (restoring) {
        get_bits(P->ups, b0, n, up);
        for (int j = 0; j < n; j++) keep[j] = kin[j];
        for (int j = 0; j < n; j++) was_up[j] = up[j];
    }
    /* Several terms, Gaussian z or weight decay: a division and a floor per value, on int64 lanes */
    for (int j = 0; j < n;) {  /* one run of values per row */
        int64_t row = (local + j) / P->cols;
        int e = (int)min64((int64_t)n, (row + 1) * P->cols - local);
        double unit = (double)P->scb[row] / 127.0;
        if (restoring) {  /* the perturbation's step, from its rounding bit; kept values never moved */
            if (!(unit > 0))
                for (int i = j; i < e; i++) low[i] = 0;  /* floor(0.0) */
            else if (P->direction == DIR_RADEMACHER) {  /* z = +-1: the row's two floors, as the loop below */
                int64_t l_pos = (int64_t)floor(clamp_steps(((double)1.0f * r_coef) / unit));
                int64_t l_neg = (int64_t)floor(clamp_steps(((double)-1.0f * r_coef) / unit));
                for (int i = j; i < e; i++) low[i] = zr[i] > 0 ? l_pos : l_neg;
            } else
                for (int i = j; i < e; i++) low[i] = (int64_t)floor(clamp_steps(((double)zr[i] * r_coef) / unit));
            for (int i = j; i < e; i++) c[i] -= (1 - keep[i]) * (low[i] + was_up[i]);
        }
        if (mode == 1) {
            j = e;
            continue;
        }
        if (!(unit > 0))
            for (int i = j; i < e; i++) x[i] = 0.0;
        else if (mode == 0)
            for (int i = j; i < e; i++) x[i] = clamp_steps(est[i] / unit);
        else if (P->has_decay)
            for (int i = j; i < e; i++) {
                double delta = est[i] * lr;
                delta = delta - dc * ((double)c[i] * unit);
                x[i] = clamp_steps(delta / unit);
            }
        else
            for (int i = j; i < e; i++) x[i] = clamp_steps((est[i] * lr) / unit);
        /* round(x) onto whole steps: stochastically with u, else to the nearest */
        if (stochastic)
            for (int i = j; i < e; i++) {
                double f = floor(x[i]);
                low[i] = (int64_t)f;
                bit[i] = noise_below(P->noise_seed, P->antithetic, g + i, u[i], x[i] - f);
            }
        else
            for (int i = j; i < e; i++) {
                double f = floor(x[i]);
                low[i] = (int64_t)f;
                bit[i] = x[i] - f >= 0.5;
            }
        for (int i = j; i < e; i++) d[i] = low[i] + bit[i];
        if (mode == 0)
            for (int i = j; i < e; i++) {  /* a code that +d or -d would push out of [-127, 127] stays */
                int64_t plus = c[i] + d[i], minus = c[i] - d[i];
                keep[i] = (plus > 127) | (plus < -127) | (minus > 127) | (minus < -127);
                c[i] = keep[i] ? c[i] : plus;
            }
        else
            for (int i = j; i < e; i++) {
                int64_t v = c[i] + d[i];
                c[i] = v < -127 ? -127 : (v > 127 ? 127 : v);
            }
        j = e;
    }
    for (int j = 0; j < n; j++) codes[j] = (int8_t)c[j];
    if (mode == 0) {
        for (int j = 0; j < n; j++) kout[j] = (uint8_t)keep[j];
        put_bits(P->kept, k0, n, kout);
        for (int j = 0; j < n; j++) up[j] = (uint8_t)bit[j];
        put_bits(P->ups, b0, n, up);
    }
}

/* Bits 64w .. 64w+63 of `bits` (bit p is bit p % 8 of byte p / 8, as get_bits reads them) as one word, bit p at
 * bit p - 64w: one load where the machine is little-endian. */
static inline uint64_t bit_word(const uint8_t *bits, int64_t w)
{
    uint64_t v = 0;
    for (int k = 0; k < 8; k++) v |= (uint64_t)bits[8 * w + k] << (8 * k);
    return v;
}

/* zo_int8 over nl runs of values in one parallel loop: run r is values j0[r] .. j0[r]+n[r]-1 of a layer whose
 * value 0 has global index offset[r] (codes[r], cols[r], scb[r], ups[r] its own; kept_at[r] / n_kept_at[r] the
 * pending perturbation's kept positions in the run, from j0[r]); the other arguments are the pass's, as above.
 * QuZO's passes over a model are one call (one parallel loop over every tile of every layer), where a call a
 * layer paid Python's and OpenMP's overhead two hundred times a step.
 *
 * With `then` (mode 2): each tile perturbed straight after its update, as zo_grid4's `then`. A perturbation
 * (mode 0, or `then`) leaves its kept positions in *kept_out (malloc'd here, freed by zo_free; run by run,
 * ascending, each from its run's j0) and their number per run in kept_n[r]: the tiles set them as bits (a byte
 * a value would be n bytes written and scanned again; they are a few a row), read 64 at a time after the loop.
 * Returns their total (0 where the pass perturbs nothing), -1 where memory could not be had before the pass (then
 * nothing was moved), or -2 where the positions' memory could not be had after it (the codes moved, their kept
 * positions are lost). */
int64_t zo_int8(int nl, int8_t *const *codes, const int64_t *j0, const int64_t *n, const int64_t *cols,
                const int64_t *offset, const float *const *scb, uint8_t *const *ups, const int64_t *const *kept_at,
                const int64_t *n_kept_at, int direction, const uint64_t *seeds, const double *coefs, int nterms,
                int mode, double lr, int has_decay, double decay_coef, int stochastic, uint64_t noise_seed,
                int antithetic, int restore, uint64_t r_seed, double r_coef, int then, uint64_t t_seed,
                double t_coef, uint64_t t_noise, int nthreads, int64_t **kept_out, int64_t *kept_n)
{
    *kept_out = NULL;
    if (nl <= 0 || nterms < 1)
        return 0;
    int kept = mode == 0 || (then && mode == 2);
    then = then && mode == 2;
    struct int8pass *P = calloc((size_t)nl, sizeof *P), *Q = calloc((size_t)nl, sizeof *Q);
    int64_t *tiles = calloc((size_t)nl + 1, sizeof *tiles), *words = calloc((size_t)nl + 1, sizeof *words);
    uint8_t *bits = NULL;
    int64_t m = -1;  /* until the memory is had */
    if (!P || !Q || !tiles || !words)
        goto done;
    for (int r = 0; r < nl; r++) {  /* run r's tiles and kept words follow run r - 1's */
        int64_t start = offset[r] + j0[r];
        tiles[r + 1] = tiles[r] + (n[r] > 0 ? (start + n[r] + TILE - 1) / TILE - start / TILE : 0);
        words[r + 1] = words[r] + (kept && n[r] > 0 ? ((start & 7) + n[r] + 63) / 64 : 0);
    }
    if (kept && !(bits = calloc((size_t)words[nl] + 1, 8)))
        goto done;
    for (int r = 0; r < nl; r++) {
        P[r] = (struct int8pass){codes[r], bits ? bits + 8 * words[r] : NULL, kept_at[r], n_kept_at[r], j0[r], cols[r],
                                 offset[r], scb[r], direction, nterms, mode, has_decay, stochastic, antithetic, seeds,
                                 coefs, lr, decay_coef, noise_seed, restore, r_seed, r_coef, ups[r]};
        Q[r] = (struct int8pass){codes[r], P[r].kept, NULL, 0, j0[r], cols[r], offset[r], scb[r], direction, 1, 0, 0,
                                 stochastic, t_coef < 0, &t_seed, &t_coef, 0.0, 0.0, t_noise, 0, 0, 0.0, ups[r]};
    }
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && tiles[nl] * TILE >= PARALLEL_MIN)
    for (int64_t t = 0; t < tiles[nl]; t++) {
        int lo = 0, hi = nl - 1;  /* the run of tile t: the last r with tiles[r] <= t */
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (tiles[mid] <= t)
                lo = mid;
            else
                hi = mid - 1;
        }
        int64_t start = offset[lo] + j0[lo], at = start / TILE + (t - tiles[lo]);
        int64_t g = max64(at * TILE, start), e = min64(at * TILE + TILE, start + n[lo]);
        int8_tile(&P[lo], g, (int)(e - g));
        if (then)
            int8_tile(&Q[lo], g, (int)(e - g));
    }
    m = 0;
    if (kept) {
        for (int64_t w = 0; w < words[nl]; w++) m += __builtin_popcountll(bit_word(bits, w));
        if (!(*kept_out = malloc((size_t)(m > 0 ? m : 1) * sizeof **kept_out))) {
            m = -2;
        } else {
            int64_t i = 0;
            for (int r = 0; r < nl; r++) {
                int64_t s7 = (offset[r] + j0[r]) & 7, first = i;
                for (int64_t w = words[r]; w < words[r + 1]; w++)
                    for (uint64_t v = bit_word(bits, w); v; v &= v - 1)
                        (*kept_out)[i++] = 64 * (w - words[r]) + __builtin_ctzll(v) - s7;
                kept_n[r] = i - first;
            }
        }
    }
done:
    free(bits), free(P), free(Q), free(tiles), free(words);
    return m;
}

void zo_free(void *p) { free(p); }
