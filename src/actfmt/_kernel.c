/* actfmt._kernel: one pass over a block of rows of bfloat16 / float16 / float32 values computing, in float64,
 * everything actfmt's statistics and deep validation need (see actfmt/kernel.py, which wraps it and holds the
 * numpy fallback with the same semantics):
 *
 *   col_sum[d] += sum of the finite values of column d       col_sq[d] += sum of their squares
 *   col_bad[d] += number of NaN / Inf values of column d     rownorm2[r] = sum of squares of row r
 *                                                            (NaN if the row holds a NaN, else +Inf if an Inf)
 *   returns (abs_max_bits, nan, inf, zero_rows, good_rows, norm_sum, norm_max, norm_argmax) where the last
 *   five are over the rows holding no NaN / Inf ("good" rows): all-zero rows, their count, the sum and the
 *   maximum of their norms sqrt(rownorm2) and the first row reaching that maximum (-1 if none).
 *
 * Every value of these dtypes is exact in float64 and so is its square (at most 48 significant bits), so the
 * only rounding is that of the float64 additions.  An AVX-512 (F, BW, DQ, VL) version, else an AVX2 + FMA + F16C
 * one, is chosen at run time when the CPU has them; the portable version computes the same figures (to float64
 * rounding of the sums' order: the per-dimension sums add the rows in the same order in every version).
 * The GIL is released during the pass.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define ACTFMT_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif

enum { KIND_BF16 = 0, KIND_F16 = 1, KIND_F32 = 2 };

typedef struct {
    const void *data;
    Py_ssize_t rows, cols;
    int kind;
    double *col_sum, *col_sq; /* NULL: no column figures wanted */
    int64_t *col_bad;
    double *rownorm2;
    /* results */
    uint32_t absmax_bits;
    int64_t nan, inf;
    uint8_t *row_flag; /* per row: 1 = holds an Inf, 2 = holds a NaN */
} job_t;

/* -- scalar decoding ------------------------------------------------------------------------------------- */
static inline double f16_to_double(uint16_t h) {
    uint32_t e = (h >> 10) & 0x1F, m = h & 0x3FF;
    double v;
    if (e == 0)
        v = ldexp((double)m, -24);
    else
        v = ldexp((double)(m | 0x400), (int)e - 25);
    return (h & 0x8000) ? -v : v;
}

static inline double bf16_to_double(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return (double)f;
}

static inline double f32_to_double(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return (double)f;
}

/* One element, the careful way: a NaN / Inf is counted (column, row, block) and left out of the sums. */
static inline void scalar_one(job_t *j, Py_ssize_t r, Py_ssize_t d, double *row_acc) {
    uint32_t bits, mag, expo;
    double x;
    if (j->kind == KIND_F32) {
        bits = ((const uint32_t *)j->data)[r * j->cols + d];
        mag = bits & 0x7FFFFFFFu;
        expo = 0x7F800000u;
    } else {
        bits = ((const uint16_t *)j->data)[r * j->cols + d];
        mag = bits & 0x7FFFu;
        expo = j->kind == KIND_BF16 ? 0x7F80u : 0x7C00u;
    }
    if ((mag & expo) == expo) {
        if (mag & ~expo) {
            j->nan++;
            j->row_flag[r] |= 2;
        } else {
            j->inf++;
            j->row_flag[r] |= 1;
        }
        if (j->col_bad) j->col_bad[d]++;
        return;
    }
    if (mag > j->absmax_bits) j->absmax_bits = mag;
    x = j->kind == KIND_F32 ? f32_to_double(bits) : j->kind == KIND_BF16 ? bf16_to_double((uint16_t)bits)
                                                                          : f16_to_double((uint16_t)bits);
    if (j->col_sum) {
        j->col_sum[d] += x;
        j->col_sq[d] += x * x;
    }
    *row_acc += x * x;
}

/* rows [r0, r1), columns [c0, c1) */
static void scalar_rows(job_t *j, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1, int add) {
    for (Py_ssize_t r = r0; r < r1; r++) {
        double acc = 0.0;
        for (Py_ssize_t d = c0; d < c1; d++) scalar_one(j, r, d, &acc);
        j->rownorm2[r] = add ? j->rownorm2[r] + acc : acc;
    }
}

#ifdef ACTFMT_X86
/* -- AVX2 ------------------------------------------------------------------------------------------------ */
#define TGT __attribute__((target("avx2,fma,f16c")))
#define TILE_R 4
#define TILE_C 8

/* 8 values of row `r` from column `d` as two float64 vectors, and their bits as 8 x 32 (magnitude) */
TGT static inline void load8(const job_t *j, Py_ssize_t r, Py_ssize_t d, __m256d *lo, __m256d *hi,
                             __m256i *mag) {
    __m256 f;
    if (j->kind == KIND_F32) {
        __m256i v = _mm256_loadu_si256((const __m256i *)((const uint32_t *)j->data + r * j->cols + d));
        *mag = _mm256_and_si256(v, _mm256_set1_epi32(0x7FFFFFFF));
        f = _mm256_castsi256_ps(v);
    } else {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)j->data + r * j->cols + d));
        __m256i w = _mm256_cvtepu16_epi32(h);
        *mag = _mm256_and_si256(w, _mm256_set1_epi32(0x7FFF));
        if (j->kind == KIND_BF16)
            f = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
        else
            f = _mm256_cvtph_ps(h);
    }
    *lo = _mm256_cvtps_pd(_mm256_castps256_ps128(f));
    *hi = _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
}

TGT static inline double hsum4(__m256d v) {
    __m128d a = _mm256_castpd256_pd128(v), b = _mm256_extractf128_pd(v, 1);
    a = _mm_add_pd(a, b);
    return _mm_cvtsd_f64(_mm_add_sd(a, _mm_unpackhi_pd(a, a)));
}

TGT static inline void avx2_tiles(job_t *j, const int cols_wanted) {
    const Py_ssize_t rows = j->rows, cols = j->cols;
    const Py_ssize_t cvec = cols - cols % TILE_C;
    const __m256i expo = _mm256_set1_epi32(j->kind == KIND_F32 ? 0x7F800000 : j->kind == KIND_BF16 ? 0x7F80
                                                                                                  : 0x7C00);
    __m256i vmax = _mm256_setzero_si256();
    Py_ssize_t r = 0;
    for (; r + TILE_R <= rows; r += TILE_R) {
        __m256d acc[TILE_R][2];
        double extra[TILE_R] = {0};
        for (int i = 0; i < TILE_R; i++) acc[i][0] = acc[i][1] = _mm256_setzero_pd();
        for (Py_ssize_t d = 0; d < cvec; d += TILE_C) {
            __m256d lo[TILE_R], hi[TILE_R];
            __m256i mag[TILE_R], special = _mm256_setzero_si256();
            for (int i = 0; i < TILE_R; i++) {
                load8(j, r + i, d, &lo[i], &hi[i], &mag[i]);
                special = _mm256_or_si256(special, _mm256_cmpeq_epi32(_mm256_and_si256(mag[i], expo), expo));
            }
            if (__builtin_expect(!_mm256_testz_si256(special, special), 0)) {
                for (int i = 0; i < TILE_R; i++)
                    for (Py_ssize_t k = d; k < d + TILE_C; k++) scalar_one(j, r + i, k, &extra[i]);
                continue;
            }
            if (cols_wanted) {
                __m256d s0 = _mm256_loadu_pd(j->col_sum + d), s1 = _mm256_loadu_pd(j->col_sum + d + 4);
                __m256d q0 = _mm256_loadu_pd(j->col_sq + d), q1 = _mm256_loadu_pd(j->col_sq + d + 4);
                for (int i = 0; i < TILE_R; i++) {
                    s0 = _mm256_add_pd(s0, lo[i]);
                    s1 = _mm256_add_pd(s1, hi[i]);
                    q0 = _mm256_fmadd_pd(lo[i], lo[i], q0);
                    q1 = _mm256_fmadd_pd(hi[i], hi[i], q1);
                }
                _mm256_storeu_pd(j->col_sum + d, s0);
                _mm256_storeu_pd(j->col_sum + d + 4, s1);
                _mm256_storeu_pd(j->col_sq + d, q0);
                _mm256_storeu_pd(j->col_sq + d + 4, q1);
            }
            for (int i = 0; i < TILE_R; i++) {
                acc[i][0] = _mm256_fmadd_pd(lo[i], lo[i], acc[i][0]);
                acc[i][1] = _mm256_fmadd_pd(hi[i], hi[i], acc[i][1]);
                vmax = _mm256_max_epu32(vmax, mag[i]);
            }
        }
        for (int i = 0; i < TILE_R; i++) {
            j->rownorm2[r + i] = hsum4(_mm256_add_pd(acc[i][0], acc[i][1])) + extra[i];
        }
        if (cvec < cols) scalar_rows(j, r, r + TILE_R, cvec, cols, 1);
    }
    {
        uint32_t m[8];
        _mm256_storeu_si256((__m256i *)m, vmax);
        for (int i = 0; i < 8; i++)
            if (m[i] > j->absmax_bits) j->absmax_bits = m[i];
    }
    if (r < rows) scalar_rows(j, r, rows, 0, cols, 0);
}

TGT static void avx2_with_cols(job_t *j) { avx2_tiles(j, 1); }
TGT static void avx2_rows_only(job_t *j) { avx2_tiles(j, 0); }

static int have_avx2(void) {
    static int known = -1;
    if (known < 0) {
        unsigned a, b, c, d;
        int ok = 0;
        if (__get_cpuid(1, &a, &b, &c, &d)) {
            const unsigned fma = 1u << 12, osxsave = 1u << 27, avx = 1u << 28, f16c = 1u << 29;
            if ((c & (fma | osxsave | avx | f16c)) == (fma | osxsave | avx | f16c)) {
                unsigned lo, hi;
                __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
                if ((lo & 6) == 6 && __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & (1u << 5))) ok = 1;
            }
        }
        known = ok;
    }
    return known;
}

/* -- AVX-512 (F + BW + DQ + VL): the AVX2 tiles, 16 columns at a time ---------------------------------------- */
#define TGT512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))
#define TILE_C16 16

TGT512 static inline void load16(const job_t *j, Py_ssize_t r, Py_ssize_t d, __m512d *lo, __m512d *hi,
                                 __m512i *mag) {
    __m512 f;
    if (j->kind == KIND_F32) {
        __m512i v = _mm512_loadu_si512((const void *)((const uint32_t *)j->data + r * j->cols + d));
        *mag = _mm512_and_si512(v, _mm512_set1_epi32(0x7FFFFFFF));
        f = _mm512_castsi512_ps(v);
    } else {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)j->data + r * j->cols + d));
        __m512i w = _mm512_cvtepu16_epi32(h);
        *mag = _mm512_and_si512(w, _mm512_set1_epi32(0x7FFF));
        if (j->kind == KIND_BF16)
            f = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
        else
            f = _mm512_cvtph_ps(h);
    }
    *lo = _mm512_cvtps_pd(_mm512_castps512_ps256(f));
    *hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(f, 1));
}

TGT512 static inline void avx512_tiles(job_t *j, const int cols_wanted) {
    const Py_ssize_t rows = j->rows, cols = j->cols;
    const Py_ssize_t cvec = cols - cols % TILE_C16;
    const __m512i expo = _mm512_set1_epi32(j->kind == KIND_F32 ? 0x7F800000 : j->kind == KIND_BF16 ? 0x7F80
                                                                                                  : 0x7C00);
    __m512i vmax = _mm512_setzero_si512();
    Py_ssize_t r = 0;
    for (; r + TILE_R <= rows; r += TILE_R) {
        __m512d acc[TILE_R][2];
        double extra[TILE_R] = {0};
        for (int i = 0; i < TILE_R; i++) acc[i][0] = acc[i][1] = _mm512_setzero_pd();
        for (Py_ssize_t d = 0; d < cvec; d += TILE_C16) {
            __m512d lo[TILE_R], hi[TILE_R];
            __m512i mag[TILE_R];
            __mmask16 special = 0;
            for (int i = 0; i < TILE_R; i++) {
                load16(j, r + i, d, &lo[i], &hi[i], &mag[i]);
                special |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(mag[i], expo), expo);
            }
            if (__builtin_expect(special != 0, 0)) {
                for (int i = 0; i < TILE_R; i++)
                    for (Py_ssize_t k = d; k < d + TILE_C16; k++) scalar_one(j, r + i, k, &extra[i]);
                continue;
            }
            if (cols_wanted) {
                __m512d s0 = _mm512_loadu_pd(j->col_sum + d), s1 = _mm512_loadu_pd(j->col_sum + d + 8);
                __m512d q0 = _mm512_loadu_pd(j->col_sq + d), q1 = _mm512_loadu_pd(j->col_sq + d + 8);
                for (int i = 0; i < TILE_R; i++) {
                    s0 = _mm512_add_pd(s0, lo[i]);
                    s1 = _mm512_add_pd(s1, hi[i]);
                    q0 = _mm512_fmadd_pd(lo[i], lo[i], q0);
                    q1 = _mm512_fmadd_pd(hi[i], hi[i], q1);
                }
                _mm512_storeu_pd(j->col_sum + d, s0);
                _mm512_storeu_pd(j->col_sum + d + 8, s1);
                _mm512_storeu_pd(j->col_sq + d, q0);
                _mm512_storeu_pd(j->col_sq + d + 8, q1);
            }
            for (int i = 0; i < TILE_R; i++) {
                acc[i][0] = _mm512_fmadd_pd(lo[i], lo[i], acc[i][0]);
                acc[i][1] = _mm512_fmadd_pd(hi[i], hi[i], acc[i][1]);
                vmax = _mm512_max_epu32(vmax, mag[i]);
            }
        }
        for (int i = 0; i < TILE_R; i++)
            j->rownorm2[r + i] = _mm512_reduce_add_pd(_mm512_add_pd(acc[i][0], acc[i][1])) + extra[i];
        if (cvec < cols) scalar_rows(j, r, r + TILE_R, cvec, cols, 1);
    }
    {
        uint32_t m = (uint32_t)_mm512_reduce_max_epu32(vmax);
        if (m > j->absmax_bits) j->absmax_bits = m;
    }
    if (r < rows) scalar_rows(j, r, rows, 0, cols, 0);
}

TGT512 static void avx512_with_cols(job_t *j) { avx512_tiles(j, 1); }
TGT512 static void avx512_rows_only(job_t *j) { avx512_tiles(j, 0); }

static int have_avx512(void) {
    static int known = -1;
    if (known < 0) {
        unsigned a, b, c, d;
        int ok = 0;
        if (have_avx2() && __get_cpuid_count(7, 0, &a, &b, &c, &d)) {
            const unsigned f = 1u << 16, dq = 1u << 17, bw = 1u << 30, vl = 1u << 31;
            if ((b & (f | dq | bw | vl)) == (f | dq | bw | vl)) {
                unsigned lo, hi;
                __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
                if ((lo & 0xE6) == 0xE6) ok = 1; /* the OS saves the opmask and ZMM state too */
            }
        }
        known = ok;
    }
    return known;
}
#endif

/* -- the portable version ---------------------------------------------------------------------------------- */
/* Plain C written so that a compiler vectorises it at baseline flags (SSE2 on x86-64, NEON on arm64): per row,
 * chunks of PCHUNK columns are checked for NaN / Inf (a chunk holding one takes the scalar path), decoded to
 * float64, added to the column sums and, in 8 lanes, to the row's sum of squares. */
#define PCHUNK 256

static inline void decode_chunk(const job_t *j, Py_ssize_t r, Py_ssize_t c0, int n, double *xs) {
    uint32_t u[PCHUNK];
    float f[PCHUNK];
    if (j->kind == KIND_F32) {
        memcpy(f, (const uint32_t *)j->data + r * j->cols + c0, (size_t)n * 4);
    } else {
        const uint16_t *h = (const uint16_t *)j->data + r * j->cols + c0;
        if (j->kind == KIND_BF16) {
            for (int k = 0; k < n; k++) u[k] = (uint32_t)h[k] << 16;
            memcpy(f, u, (size_t)n * 4);
        } else { /* float16: a normal value moved into float32's fields; a subnormal is m * 2^-24 */
            for (int k = 0; k < n; k++) {
                uint32_t m = h[k] & 0x7FFFu;
                u[k] = (m << 13) + (112u << 23);
            }
            memcpy(f, u, (size_t)n * 4);
            for (int k = 0; k < n; k++) {
                uint32_t m = h[k] & 0x7FFFu;
                float v = m < 0x400u ? (float)m * 0x1p-24f : f[k];
                f[k] = (h[k] & 0x8000u) ? -v : v;
            }
        }
    }
    for (int k = 0; k < n; k++) xs[k] = (double)f[k];
}

static void portable(job_t *j) {
    const Py_ssize_t rows = j->rows, cols = j->cols;
    const uint32_t magmask = j->kind == KIND_F32 ? 0x7FFFFFFFu : 0x7FFFu;
    const uint32_t expo = j->kind == KIND_F32 ? 0x7F800000u : j->kind == KIND_BF16 ? 0x7F80u : 0x7C00u;
    double xs[PCHUNK];
    for (Py_ssize_t r = 0; r < rows; r++) {
        double lane[8] = {0}, extra = 0.0;
        for (Py_ssize_t c0 = 0; c0 < cols; c0 += PCHUNK) {
            int n = (int)(cols - c0 < PCHUNK ? cols - c0 : PCHUNK);
            uint32_t sp = 0, mx = 0;
            if (j->kind == KIND_F32) {
                const uint32_t *b = (const uint32_t *)j->data + r * cols + c0;
                for (int k = 0; k < n; k++) {
                    uint32_t m = b[k] & magmask;
                    sp |= (m & expo) == expo;
                    mx = m > mx ? m : mx;
                }
            } else {
                const uint16_t *b = (const uint16_t *)j->data + r * cols + c0;
                for (int k = 0; k < n; k++) {
                    uint32_t m = b[k] & magmask;
                    sp |= (m & expo) == expo;
                    mx = m > mx ? m : mx;
                }
            }
            if (sp) {
                for (Py_ssize_t d = c0; d < c0 + n; d++) scalar_one(j, r, d, &extra);
                continue;
            }
            if (mx > j->absmax_bits) j->absmax_bits = mx;
            decode_chunk(j, r, c0, n, xs);
            if (j->col_sum) {
                double *s = j->col_sum + c0, *q = j->col_sq + c0;
                for (int k = 0; k < n; k++) {
                    s[k] += xs[k];
                    q[k] += xs[k] * xs[k];
                }
            }
            int k = 0;
            for (; k + 8 <= n; k += 8)
                for (int l = 0; l < 8; l++) lane[l] += xs[k + l] * xs[k + l];
            for (; k < n; k++) extra += xs[k] * xs[k];
        }
        j->rownorm2[r] = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7])) + extra;
    }
}

/* simd: 0 the portable version, 1 AVX2 at most, 2 the best this CPU has (AVX-512, else AVX2, else portable) */
static void run(job_t *j, int simd) {
#ifdef ACTFMT_X86
    if (simd >= 2 && have_avx512()) {
        if (j->col_sum)
            avx512_with_cols(j);
        else
            avx512_rows_only(j);
        return;
    }
    if (simd && have_avx2()) {
        if (j->col_sum)
            avx2_with_cols(j);
        else
            avx2_rows_only(j);
        return;
    }
#else
    (void)simd;
#endif
    portable(j);
}

/* -- Python ------------------------------------------------------------------------------------------------ */
static PyObject *py_moments(PyObject *self, PyObject *args) {
    Py_buffer data = {0}, col_sum = {0}, col_sq = {0}, col_bad = {0}, rownorm2 = {0};
    Py_ssize_t rows, cols;
    int kind, simd = 2, with_cols;
    PyObject *o_sum, *o_sq, *o_bad, *result = NULL;
    uint8_t *flags = NULL;
    job_t j;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*innOOOw*|i", &data, &kind, &rows, &cols, &o_sum, &o_sq, &o_bad, &rownorm2,
                          &simd))
        return NULL;
    with_cols = o_sum != Py_None;
    if (with_cols) {
        if (PyObject_GetBuffer(o_sum, &col_sum, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0 ||
            PyObject_GetBuffer(o_sq, &col_sq, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0 ||
            PyObject_GetBuffer(o_bad, &col_bad, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
            goto done;
    }
    if (kind < 0 || kind > 2 || rows < 0 || cols < 0) {
        PyErr_SetString(PyExc_ValueError, "bad kind or shape");
        goto done;
    }
    if (data.len != rows * cols * (kind == KIND_F32 ? 4 : 2) || rownorm2.len < rows * 8 ||
        (with_cols && (col_sum.len < cols * 8 || col_sq.len < cols * 8 || col_bad.len < cols * 8))) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match the shape");
        goto done;
    }
    flags = PyMem_RawCalloc(rows > 0 ? (size_t)rows : 1, 1);
    if (!flags) {
        PyErr_NoMemory();
        goto done;
    }
    memset(&j, 0, sizeof j);
    j.data = data.buf;
    j.rows = rows;
    j.cols = cols;
    j.kind = kind;
    j.col_sum = with_cols ? col_sum.buf : NULL;
    j.col_sq = with_cols ? col_sq.buf : NULL;
    j.col_bad = with_cols ? col_bad.buf : NULL;
    j.rownorm2 = rownorm2.buf;
    j.row_flag = flags;
    {
        int64_t zero = 0, good = 0, argmax = -1;
        double norm_sum = 0.0, norm_max = 0.0;
        Py_BEGIN_ALLOW_THREADS;
        run(&j, simd);
        for (Py_ssize_t r = 0; r < rows; r++) {
            if (flags[r]) {
                j.rownorm2[r] = (flags[r] & 2) ? (double)NAN : (double)INFINITY;
                continue;
            }
            double n2 = j.rownorm2[r], s = sqrt(n2);
            good++;
            zero += n2 == 0.0;
            norm_sum += s;
            if (s > norm_max) {
                norm_max = s;
                argmax = r;
            }
        }
        Py_END_ALLOW_THREADS;
        result = Py_BuildValue("(kLLLLddL)", (unsigned long)j.absmax_bits, (long long)j.nan, (long long)j.inf,
                               (long long)zero, (long long)good, norm_sum, norm_max, (long long)argmax);
    }
done:
    PyMem_RawFree(flags);
    PyBuffer_Release(&data);
    PyBuffer_Release(&rownorm2);
    if (col_sum.obj) PyBuffer_Release(&col_sum);
    if (col_sq.obj) PyBuffer_Release(&col_sq);
    if (col_bad.obj) PyBuffer_Release(&col_bad);
    return result;
}

static PyObject *py_simd(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
#ifdef ACTFMT_X86
    return PyLong_FromLong(have_avx512() ? 2 : have_avx2() ? 1 : 0);
#else
    return PyLong_FromLong(0);
#endif
}

static PyMethodDef methods[] = {
    {"moments", py_moments, METH_VARARGS,
     "moments(data, kind, rows, cols, col_sum, col_sq, col_bad, rownorm2, simd=2) -> (abs_max_bits, nan, "
     "inf, zero_rows, good_rows, norm_sum, norm_max, norm_argmax); kind 0 bfloat16, 1 float16, 2 float32; "
     "col_sum, col_sq, col_bad None for row figures only; simd 0 portable, 1 AVX2 at most, 2 the best."},
    {"simd", py_simd, METH_NOARGS, "The best version this CPU runs: 2 AVX-512, 1 AVX2, 0 portable."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "actfmt._kernel", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernel(void) { return PyModule_Create(&module); }
