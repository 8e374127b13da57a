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
#include <string.h>

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

/* Philox4x32-10 on nb counters held one word array per counter word, in place, under key (k0, k1):
 * loops over the counters, so that the 32x32->64-bit products vectorise (vpmuludq). */
static void philox_rounds(uint32_t w[4][BLOCKS], int nb, uint32_t k0, uint32_t k1)
{
    for (int r = 0; r < 10; r++) {
        for (int i = 0; i < nb; i++) {
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
