/* Fused, cache-blocked CPU kernels of a graph node's aggregation (dynwire.layers.aggregation).
 *
 * Built at install time (setup.py, optional: without a C compiler with OpenMP the package
 * installs without it and the plain PyTorch kernels are used). Called through ctypes with raw
 * pointers; aggregation.py checks shapes, dtypes and layouts before every call. Every tensor is
 * a dense (B, N) block: sample b starts at element b * N.
 *
 *   forward:  out[b, :] = sum_k w[b, k] * xs[k][b, :]
 *   backward: slots[k][b, :] (+)= w[b, k] * g[b, :]   ("=" where fresh[k]; skipped when slots is NULL)
 *             dots[t, k] = <g[b, c0:c1], xs[k][b, c0:c1]> for task t = (b, chunk [c0, c1))
 *   tap:      out[b, :] = sum_k w[b, k] * gs[k][b, :],  dots[t, k] = <gs[k][b, c0:c1], x[b, c0:c1]> (k < Kd)
 *
 * One OpenMP parallel loop over (sample, chunk) tasks per call, shared with PyTorch's OpenMP
 * runtime (the library links libgomp.so.1, which torch has already loaded).
 *
 * Inside a task, forward and tap read up to LINES_MAX_K inputs together, line by line (a line is
 * one vector of GCC's vector extensions, as wide as the CPU's registers): the sum stays in
 * registers (the tap's dot products in per-lane partial sums) and every input is one sequential
 * read stream, all of them in flight at once. With more inputs than that the streams outrun the hardware prefetchers, so the
 * data is walked in blocks of BLK elements whose running sum stays in cache, and the inputs are
 * read LINES_MAX_K at a time, line by line. A block is 8192 elements (32 KiB of float), not one
 * L1's worth: every block starts a fresh run in each input stream, and the prefetchers, which stop
 * at 4 KiB pages, reach full speed only some way into a run. Other compilers take the *_blocked
 * kernels (inputs four at a time per block) for every node. The backward kernel (dot products and
 * slot updates: the path of gates per receiver) keeps a block of g in cache while it reads each
 * x_k and updates each slot, in blocks of BLK_SMALL below BLK_MIN_K streams, as the blocked tap.
 * bench/kernel_blocks.py measures these choices against torch.add.
 *
 * Every input is read from memory once, the sum written once; in backward g is read once and
 * every slot read and written once. A weight of exactly 0 (a closed edge of that sample) skips
 * its input in forward and its slot update in backward (0 * x adds nothing for finite x); the dot
 * product is still computed (straight-through gates need it).
 * Accumulation: float (double for float64) within a block or a lane, double across blocks and
 * lanes for the dots (a lane's partial dot product is flushed to double after every block).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifndef LINES_MAX_K
#define LINES_MAX_K 12 /* forward and tap: up to this many inputs read together, line by line */
#endif
#define LINES_CAP (LINES_MAX_K > 0 ? LINES_MAX_K : 1) /* array sizes (LINES_MAX_K=0: blocks only) */
#ifndef BLK
#define BLK 8192 /* more inputs: blocks of this many elements */
#endif
#ifndef BLK_SMALL
#define BLK_SMALL 1024 /* the backward kernel's block below BLK_MIN_K streams */
#endif
#ifndef BLK_MIN_K
#define BLK_MIN_K 8
#endif
/* Alternatives for bench/eval_levers.py only (both 0 in the shipped build, where the branches on them
 * compile away): PF_BYTES > 0 prefetches every input of a line-by-line sum that many bytes ahead
 * (past the 4 KiB pages where the hardware prefetchers stop); NT_STORE 1 writes every line-by-line
 * sum of float (in inference the node inputs) with non-temporal stores, which skip the read for
 * ownership of lines not in cache and leave the result out of the cache; the batch step fences them
 * (one thread reads its own such stores in order; OpenMP's barriers order them for the others). */
#ifndef PF_BYTES
#define PF_BYTES 0
#endif
#ifndef NT_STORE
#define NT_STORE 0
#endif
#if NT_STORE && defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
__attribute__((target("avx512f"))) static void nt_store64(void *p, const void *line) {
    _mm512_stream_ps((float *)p, _mm512_loadu_ps((const float *)line));
}
__attribute__((target("avx"))) static void nt_store32(void *p, const void *line) {
    _mm256_stream_ps((float *)p, _mm256_loadu_ps((const float *)line));
}
/* one line of `bytes` (16, 32 or 64) to p, aligned to `bytes`; 0 where it was not written so */
static inline int nt_store(void *p, const void *line, int bytes) {
    if ((uintptr_t)p % (uintptr_t)bytes) return 0;
    if (bytes == 64) nt_store64(p, line);
    else if (bytes == 32) nt_store32(p, line);
    else _mm_stream_ps((float *)p, _mm_loadu_ps((const float *)line));
    return 1;
}
#define NT_FENCE() _mm_sfence()
#else
#undef NT_STORE
#define NT_STORE 0
static inline int nt_store(void *p, const void *line, int bytes) { return (void)p, (void)line, (void)bytes, 0; }
#define NT_FENCE() ((void)0)
#endif

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

static inline float bf16_load(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t bf16_store(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                            /* round to nearest even */
    return (uint16_t)(u >> 16);
}

#define ID(v) (v)

#define MIN(a, b) ((a) < (b) ? (a) : (b))

/* The forward's elements after the last full line of a task (on other compilers, every element) */
#define DEFINE_TAILS(NAME, T, A, LD, ST)                                                                         \
    static void NAME##_fwd_tail(int c, const T *const *p, const A *v, T *out, int64_t off, int64_t ooff,         \
                                int64_t i0, int64_t c1, int relu) {                                              \
        for (int64_t i = i0; i < c1; i++) {                                                                      \
            A r = 0;                                                                                             \
            for (int q = 0; q < c; q++) r += v[q] * LD(p[q][off + i]);                                           \
            out[ooff + i] = ST(relu && r < 0 ? (A)0 : r);                                                        \
        }                                                                                                        \
    }                                                                                                            \

/* Line-by-line kernels (LINES_MAX_K inputs or fewer): a line is one vector of the ISA the kernel runs
 * on (GCC's vector extensions; `lw` elements of A), so every input's line is one load and the sum (in
 * the tap also each input's per-lane dot product) stays in a register. Each kernel is built for three
 * widths and picked at load time (lines_isa): 64 bytes with AVX-512, 32 with AVX2, 16 otherwise (and on
 * other architectures). A vector wider than the ISA's registers is not split into registers by GCC: it
 * lives on the stack, every += a store and a load, and its comparisons become scalar branches (64-byte
 * lines took 1.3-1.5x the chain's evaluation on an AVX2 machine). Plain loops over arrays of `lw`
 * elements are left half vectorized by GCC, and slower on cached data. */
#if defined(__GNUC__)
#if defined(__x86_64__) && defined(__linux__)
#define ISA_TARGET_v64 __attribute__((target("avx512f")))
#define ISA_TARGET_v32 __attribute__((target("avx2")))
#define ISA_LEVELS 3
#else
#define ISA_TARGET_v64
#define ISA_TARGET_v32
#define ISA_LEVELS 1
#endif
#define ISA_TARGET_v16
#ifdef LINES_BYTES /* one line width for every ISA (bench/kernel_blocks.py: the widths side by side) */
#define LINE_BYTES_v64 LINES_BYTES
#define LINE_BYTES_v32 LINES_BYTES
#define LINE_BYTES_v16 LINES_BYTES
#else
#define LINE_BYTES_v64 64
#define LINE_BYTES_v32 32
#define LINE_BYTES_v16 16
#endif
/* 2: AVX-512 (64-byte lines), 1: AVX2 (32), 0: other (16); set once when the library loads */
static int lines_isa = 0;
static int lines_isa_supported = 0;
__attribute__((constructor)) static void lines_isa_init(void) {
#if ISA_LEVELS == 3
    __builtin_cpu_init();
    lines_isa_supported = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
#endif
    lines_isa = lines_isa_supported;
}
/* The kernels' ISA level: the highest this CPU runs, or `level` (0-2) where that is lower (tests run
 * every level the machine has); returns the bytes per line of the level in use. */
int dynwire_lines_isa(int level) {
    static const int bytes[3] = {LINE_BYTES_v16, LINE_BYTES_v32, LINE_BYTES_v64};
    if (level >= 0) lines_isa = MIN(level, lines_isa_supported);
    return bytes[lines_isa];
}
/* ISA: v64 / v32 / v16; VB: bytes per line; TARGET: the kernels' target attribute. `lw`: elements per
 * line; `u`: lines per step of the forward (64 bytes) */
#define DEFINE_LINES_ISA(NAME, T, A, LD, ST, ISA, VB, TARGET)                                                    \
    enum { NAME##_##ISA##_lw = VB / sizeof(A), NAME##_##ISA##_u = VB < 64 ? 64 / VB : 1 };                       \
    typedef A NAME##_##ISA##_line __attribute__((vector_size(VB)));                                              \
    /* a line from / to storage (pointers: no vector arguments, whose ABI depends on the ISA) */                 \
    static inline void NAME##_##ISA##_ldline(NAME##_##ISA##_line *a, const T *p) {                               \
        if (sizeof(T) == sizeof(A))                                                                              \
            memcpy(a, p, sizeof *a);                                                                             \
        else                                                                                                     \
            for (int l = 0; l < NAME##_##ISA##_lw; l++) (*a)[l] = LD(p[l]);                                      \
    }                                                                                                            \
    static inline void NAME##_##ISA##_stline(T *p, const NAME##_##ISA##_line *a) {                               \
        if (sizeof(T) == sizeof(A))                                                                              \
            memcpy(p, a, sizeof *a);                                                                             \
        else                                                                                                     \
            for (int l = 0; l < NAME##_##ISA##_lw; l++) p[l] = ST((*a)[l]);                                      \
    }                                                                                                            \
    /* max(r, 0) lane by lane; NaN stays NaN, as in torch.relu */                                                \
    static inline void NAME##_##ISA##_relu(NAME##_##ISA##_line *r) {                                             \
        const NAME##_##ISA##_line zero = {0};                                                                    \
        const __typeof__(*r < zero) neg = *r < zero;                                                             \
        *r = (NAME##_##ISA##_line)((__typeof__(neg))*r & ~neg);                                                  \
    }                                                                                                            \
    /* out = sum_q v[q] * p[q] over [c0, c1), ReLU'd where relu; 64 bytes per step over the inputs (u lines of   \
     * 16 or 32 bytes in registers: the loop's pointer and weight loads per byte as with AVX-512) */             \
    TARGET static void NAME##_fwd_lines_##ISA(int c, const T *const *p, const A *v, T *out, int64_t off,         \
                                              int64_t ooff, int64_t c0, int64_t c1, int relu) {                  \
        const NAME##_##ISA##_line zero = {0};                                                                    \
        T *o = out + ooff;                                                                                       \
        int64_t i = c0;                                                                                          \
        for (; i + NAME##_##ISA##_u * NAME##_##ISA##_lw <= c1; i += NAME##_##ISA##_u * NAME##_##ISA##_lw) {      \
            NAME##_##ISA##_line r[NAME##_##ISA##_u];                                                             \
            for (int u = 0; u < NAME##_##ISA##_u; u++) r[u] = zero;                                              \
            for (int q = 0; q < c; q++) {                                                                        \
                const T *pq = p[q] + off + i;                                                                    \
                const A vq = v[q];                                                                               \
                if (PF_BYTES) __builtin_prefetch((const char *)pq + PF_BYTES, 0, 3);                             \
                for (int u = 0; u < NAME##_##ISA##_u; u++) {                                                     \
                    NAME##_##ISA##_line a;                                                                       \
                    NAME##_##ISA##_ldline(&a, pq + u * NAME##_##ISA##_lw);                                       \
                    r[u] += vq * a;                                                                              \
                }                                                                                                \
            }                                                                                                    \
            for (int u = 0; u < NAME##_##ISA##_u; u++) {                                                         \
                if (relu) NAME##_##ISA##_relu(&r[u]);                                                            \
                if (!(NT_STORE && sizeof(T) == 4 && sizeof(A) == 4 &&                                            \
                      nt_store(o + i + u * NAME##_##ISA##_lw, &r[u], VB)))                                       \
                    NAME##_##ISA##_stline(o + i + u * NAME##_##ISA##_lw, &r[u]);                                 \
            }                                                                                                    \
        }                                                                                                        \
        for (; i + NAME##_##ISA##_lw <= c1; i += NAME##_##ISA##_lw) {                                            \
            NAME##_##ISA##_line r = zero;                                                                        \
            for (int q = 0; q < c; q++) {                                                                        \
                NAME##_##ISA##_line a;                                                                           \
                NAME##_##ISA##_ldline(&a, p[q] + off + i);                                                       \
                r += v[q] * a;                                                                                   \
            }                                                                                                    \
            if (relu) NAME##_##ISA##_relu(&r);                                                                   \
            NAME##_##ISA##_stline(o + i, &r);                                                                    \
        }                                                                                                        \
        NAME##_fwd_tail(c, p, v, out, off, ooff, i, c1, relu);                                                   \
    }                                                                                                            \
                                                                                                                 \
    /* more than LINES_MAX_K inputs: blocks of BLK elements whose running sum stays in cache, the                \
     * inputs read LINES_MAX_K at a time, line by line */                                                        \
    TARGET static void NAME##_fwd_groups_##ISA(int64_t K, const T *const *xs, const A *w, T *out, int64_t off,   \
                                               int64_t ooff, int64_t c0, int64_t c1, int relu) {                 \
        const NAME##_##ISA##_line zero = {0};                                                                    \
        NAME##_##ISA##_line acc[BLK / NAME##_##ISA##_lw];                                                        \
        A tail[NAME##_##ISA##_lw];                                                                               \
        int64_t nz = 0;                                                                                          \
        for (int64_t k = 0; k < K; k++) nz += w[k] != 0;                                                         \
        for (int64_t s = c0; s < c1; s += BLK) {                                                                 \
            const int64_t n = MIN(BLK, c1 - s), nl = n / NAME##_##ISA##_lw;                                      \
            T *o = out + ooff + s;                                                                               \
            int64_t k = 0, used = 0;                                                                             \
            while (used < nz) {                                                                                  \
                const T *p[LINES_CAP];                                                                           \
                A v[LINES_CAP];                                                                                  \
                int c = 0;                                                                                       \
                for (; k < K && c < LINES_MAX_K; k++) {                                                          \
                    if (w[k] == 0) continue;                                                                     \
                    p[c] = xs[k] + off + s;                                                                      \
                    v[c] = w[k];                                                                                 \
                    c++;                                                                                         \
                }                                                                                                \
                const int first = used == 0;                                                                     \
                used += c;                                                                                       \
                const int last = used == nz;                                                                     \
                for (int64_t L = 0; L < nl; L++) {                                                               \
                    NAME##_##ISA##_line r = first ? zero : acc[L], a;                                            \
                    for (int q = 0; q < c; q++) {                                                                \
                        NAME##_##ISA##_ldline(&a, p[q] + L * NAME##_##ISA##_lw);                                 \
                        r += v[q] * a;                                                                           \
                    }                                                                                            \
                    if (!last) {                                                                                 \
                        acc[L] = r;                                                                              \
                        continue;                                                                                \
                    }                                                                                            \
                    if (relu) NAME##_##ISA##_relu(&r);                                                           \
                    NAME##_##ISA##_stline(o + L * NAME##_##ISA##_lw, &r);                                        \
                }                                                                                                \
                for (int64_t i = nl * NAME##_##ISA##_lw; i < n; i++) {                                           \
                    A r = first ? 0 : tail[i - nl * NAME##_##ISA##_lw];                                          \
                    for (int q = 0; q < c; q++) r += v[q] * LD(p[q][i]);                                         \
                    if (!last)                                                                                   \
                        tail[i - nl * NAME##_##ISA##_lw] = r;                                                    \
                    else                                                                                         \
                        o[i] = ST(relu && r < 0 ? (A)0 : r);                                                     \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
    }                                                                                                            \
    /* the lanes of the dot products' partial sums into dots[q0 + q], in double */                               \
    static inline void NAME##_##ISA##_tap_flush(int64_t nd, const NAME##_##ISA##_line *d, double *dots,          \
                                                int64_t q0) {                                                    \
        for (int64_t q = 0; q < nd; q++) {                                                                       \
            double t = 0;                                                                                        \
            for (int l = 0; l < NAME##_##ISA##_lw; l++) t += (double)d[q][l];                                    \
            dots[q0 + q] += t;                                                                                   \
        }                                                                                                        \
    }                                                                                                            \
    /* the tap over [c0, c1): out = sum_k w[k] * gs[k], dots[k] = <gs[k], x> (k < Kd). Blocks of BLK             \
     * elements; a block's inputs are read LINES_MAX_K at a time (all of them for most nodes),                   \
     * line by line, with x, the running sum in registers (in acc between groups) and the dot                    \
     * products per lane, in float within a block and in double across blocks */                                 \
    TARGET static void NAME##_tap_lines_##ISA(int64_t K, int64_t Kd, const T *const *gs, const A *w, const T *x, \
                                              T *out, double *dots, int64_t off, int64_t c0, int64_t c1) {       \
        const NAME##_##ISA##_line zero = {0};                                                                    \
        NAME##_##ISA##_line acc[BLK / NAME##_##ISA##_lw], d[LINES_CAP];                                          \
        A tail[NAME##_##ISA##_lw] = {0}; /* written before read; GCC cannot tell with 2-lane lines */            \
        for (int64_t k = 0; k < Kd; k++) dots[k] = 0.0;                                                          \
        for (int64_t s = c0; s < c1; s += BLK) {                                                                 \
            const int64_t n = MIN(BLK, c1 - s), nl = n / NAME##_##ISA##_lw, base = off + s;                      \
            for (int64_t g0 = 0; g0 < K; g0 += LINES_MAX_K) {                                                    \
                const int64_t g1 = MIN(g0 + LINES_MAX_K, K), gd = MIN(g1, Kd > g0 ? Kd : g0);                    \
                const int first = g0 == 0, last = g1 == K;                                                       \
                for (int64_t q = g0; q < gd; q++) d[q - g0] = zero;                                              \
                for (int64_t L = 0; L < nl; L++) {                                                               \
                    NAME##_##ISA##_line xl, e, r = first ? zero : acc[L];                                        \
                    if (gd > g0) NAME##_##ISA##_ldline(&xl, x + base + L * NAME##_##ISA##_lw);                   \
                    for (int64_t q = g0; q < gd; q++) {                                                          \
                        NAME##_##ISA##_ldline(&e, gs[q] + base + L * NAME##_##ISA##_lw);                         \
                        r += w[q] * e;                                                                           \
                        d[q - g0] += e * xl;                                                                     \
                    }                                                                                            \
                    for (int64_t q = gd; q < g1; q++) { /* further terms without a dot */                        \
                        NAME##_##ISA##_ldline(&e, gs[q] + base + L * NAME##_##ISA##_lw);                         \
                        r += w[q] * e;                                                                           \
                    }                                                                                            \
                    if (last)                                                                                    \
                        NAME##_##ISA##_stline(out + base + L * NAME##_##ISA##_lw, &r);                           \
                    else                                                                                         \
                        acc[L] = r;                                                                              \
                }                                                                                                \
                NAME##_##ISA##_tap_flush(gd - g0, d, dots, g0);                                                  \
                const int64_t done = nl * NAME##_##ISA##_lw; /* elements in full lines */                        \
                NAME##_tap_tail(g0, g1, Kd, gs, w, x, out, dots, base + done, n - done, tail, first, last);      \
            }                                                                                                    \
        }                                                                                                        \
    }
#define LINES_DISPATCH(FN, ...)                                                                                  \
    do {                                                                                                         \
        if (ISA_LEVELS == 3 && lines_isa == 2)                                                                   \
            FN##_v64(__VA_ARGS__);                                                                               \
        else if (ISA_LEVELS == 3 && lines_isa == 1)                                                              \
            FN##_v32(__VA_ARGS__);                                                                               \
        else                                                                                                     \
            FN##_v16(__VA_ARGS__);                                                                               \
    } while (0)
#define DEFINE_LINES(NAME, T, A, LD, ST)                                                                         \
    DEFINE_TAILS(NAME, T, A, LD, ST)                                                                             \
    /* the tap's m elements at p after a block's last full line, inputs g0..g1-1 (a running sum in               \
     * tail between groups unless first / last) */                                                               \
    static void NAME##_tap_tail(int64_t g0, int64_t g1, int64_t Kd, const T *const *gs, const A *w, const T *x,  \
                                T *out, double *dots, int64_t p, int64_t m, A *tail, int first, int last) {      \
        for (int64_t i = 0; i < m; i++) {                                                                        \
            const A xi = LD(x[p + i]);                                                                           \
            A r = first ? 0 : tail[i];                                                                           \
            for (int64_t q = g0; q < g1; q++) {                                                                  \
                const A e = LD(gs[q][p + i]);                                                                    \
                r += w[q] * e;                                                                                   \
                if (q < Kd) dots[q] += (double)(e * xi);                                                         \
            }                                                                                                    \
            if (last)                                                                                            \
                out[p + i] = ST(r);                                                                              \
            else                                                                                                 \
                tail[i] = r;                                                                                     \
        }                                                                                                        \
    }                                                                                                            \
    DEFINE_LINES_ISA(NAME, T, A, LD, ST, v64, LINE_BYTES_v64, ISA_TARGET_v64)                                    \
    DEFINE_LINES_ISA(NAME, T, A, LD, ST, v32, LINE_BYTES_v32, ISA_TARGET_v32)                                    \
    DEFINE_LINES_ISA(NAME, T, A, LD, ST, v16, LINE_BYTES_v16, ISA_TARGET_v16)                                    \
    static void NAME##_fwd_lines(int c, const T *const *p, const A *v, T *out, int64_t off, int64_t ooff,        \
                                 int64_t c0, int64_t c1, int relu) {                                             \
        LINES_DISPATCH(NAME##_fwd_lines, c, p, v, out, off, ooff, c0, c1, relu);                                 \
    }                                                                                                            \
    static void NAME##_fwd_groups(int64_t K, const T *const *xs, const A *w, T *out, int64_t off, int64_t ooff,  \
                                  int64_t c0, int64_t c1, int relu) {                                            \
        LINES_DISPATCH(NAME##_fwd_groups, K, xs, w, out, off, ooff, c0, c1, relu);                               \
    }                                                                                                            \
    static void NAME##_tap_lines(int64_t K, int64_t Kd, const T *const *gs, const A *w, const T *x, T *out,      \
                                 double *dots, int64_t off, int64_t c0, int64_t c1) {                            \
        LINES_DISPATCH(NAME##_tap_lines, K, Kd, gs, w, x, out, dots, off, c0, c1);                               \
    }
#ifndef LINES_GROUPS
#define LINES_GROUPS 1 /* more than LINES_MAX_K inputs: groups of lines (else the *_blocked kernels) */
#endif
#else /* other compilers: blocks only */
#undef LINES_MAX_K
#define LINES_MAX_K 0
#undef LINES_GROUPS
#define LINES_GROUPS 0
int dynwire_lines_isa(int level) { /* no line kernels */
    (void)level;
    return 0;
}
#define DEFINE_LINES(NAME, T, A, LD, ST)                                                                         \
    DEFINE_TAILS(NAME, T, A, LD, ST)                                                                             \
    /* called for no input at all (LINES_MAX_K is 0) */                                                          \
    static void NAME##_fwd_lines(int c, const T *const *p, const A *v, T *out, int64_t off, int64_t ooff,        \
                                 int64_t c0, int64_t c1, int relu) {                                             \
        NAME##_fwd_tail(c, p, v, out, off, ooff, c0, c1, relu);                                                  \
    }                                                                                                            \
    /* never called (LINES_GROUPS is 0) */                                                                       \
    static void NAME##_fwd_groups(int64_t K, const T *const *xs, const A *w, T *out, int64_t off, int64_t ooff,  \
                                  int64_t c0, int64_t c1, int relu) {                                            \
        NAME##_fwd_blocked(K, xs, w, out, off, ooff, c0, c1, relu);                                              \
    }                                                                                                            \
    static void NAME##_tap_blocked(int64_t K, int64_t Kd, const T *const *gs, const A *w, const T *x, T *out,    \
                                   double *dots, int64_t off, int64_t c0, int64_t c1);                           \
    /* never called (LINES_MAX_K is 0) */                                                                        \
    static void NAME##_tap_lines(int64_t K, int64_t Kd, const T *const *gs, const A *w, const T *x, T *out,      \
                                 double *dots, int64_t off, int64_t c0, int64_t c1) {                            \
        NAME##_tap_blocked(K, Kd, gs, w, x, out, dots, off, c0, c1);                                             \
    }
#endif

/* NAME: f32, f64, bf16; T: storage type; A: arithmetic type; LD/ST: conversions */
#define DEFINE_KERNELS(NAME, T, A, LD, ST)                                                                       \
    MULTIVERSION static void NAME##_fwd_blocked(int64_t K, const T *const *xs, const A *w, T *out, int64_t off,  \
                                             int64_t ooff, int64_t c0, int64_t c1, int relu) {                   \
        A acc[BLK];                                                                                              \
        /* more than LINES_MAX_K inputs (other compilers: every node) */                                         \
        const int64_t bs = BLK;                                                                                  \
        for (int64_t s = c0; s < c1; s += bs) {                                                                  \
            const int64_t n = MIN(bs, c1 - s);                                                                   \
            int first = 1;                                                                                       \
            int64_t k = 0;                                                                                       \
            for (;;) { /* the next (up to) 4 inputs with a non-zero weight: 4 read streams at once */            \
                const T *p[4];                                                                                   \
                A v[4];                                                                                          \
                int c = 0;                                                                                       \
                for (; k < K && c < 4; k++) {                                                                    \
                    if (w[k] == 0) continue;                                                                     \
                    p[c] = xs[k] + off + s;                                                                      \
                    v[c] = w[k];                                                                                 \
                    c++;                                                                                         \
                }                                                                                                \
                if (c == 0) break;                                                                               \
                switch (c) {                                                                                     \
                case 4:                                                                                          \
                    if (first)                                                                                   \
                        for (int64_t i = 0; i < n; i++)                                                          \
                            acc[i] = v[0] * LD(p[0][i]) + v[1] * LD(p[1][i]) + v[2] * LD(p[2][i]) + v[3] * LD(p[3][i]); \
                    else                                                                                         \
                        for (int64_t i = 0; i < n; i++)                                                          \
                            acc[i] += v[0] * LD(p[0][i]) + v[1] * LD(p[1][i]) + v[2] * LD(p[2][i]) + v[3] * LD(p[3][i]); \
                    break;                                                                                       \
                case 3:                                                                                          \
                    if (first)                                                                                   \
                        for (int64_t i = 0; i < n; i++)                                                          \
                            acc[i] = v[0] * LD(p[0][i]) + v[1] * LD(p[1][i]) + v[2] * LD(p[2][i]);               \
                    else                                                                                         \
                        for (int64_t i = 0; i < n; i++)                                                          \
                            acc[i] += v[0] * LD(p[0][i]) + v[1] * LD(p[1][i]) + v[2] * LD(p[2][i]);              \
                    break;                                                                                       \
                case 2:                                                                                          \
                    if (first)                                                                                   \
                        for (int64_t i = 0; i < n; i++) acc[i] = v[0] * LD(p[0][i]) + v[1] * LD(p[1][i]);        \
                    else                                                                                         \
                        for (int64_t i = 0; i < n; i++) acc[i] += v[0] * LD(p[0][i]) + v[1] * LD(p[1][i]);       \
                    break;                                                                                       \
                default:                                                                                         \
                    if (first)                                                                                   \
                        for (int64_t i = 0; i < n; i++) acc[i] = v[0] * LD(p[0][i]);                             \
                    else                                                                                         \
                        for (int64_t i = 0; i < n; i++) acc[i] += v[0] * LD(p[0][i]);                            \
                }                                                                                                \
                first = 0;                                                                                       \
            }                                                                                                    \
            T *o = out + ooff + s;                                                                               \
            if (first) {                                                                                         \
                for (int64_t i = 0; i < n; i++) o[i] = ST((A)0);                                                 \
            } else if (relu) { /* max(sum, 0); NaN stays NaN as in torch.relu */                                 \
                for (int64_t i = 0; i < n; i++) o[i] = ST(acc[i] < 0 ? (A)0 : acc[i]);                           \
            } else {                                                                                             \
                for (int64_t i = 0; i < n; i++) o[i] = ST(acc[i]);                                               \
            }                                                                                                    \
        }                                                                                                        \
    }                                                                                                            \
                                                                                                                 \
    DEFINE_LINES(NAME, T, A, LD, ST)                                                                             \
                                                                                                                 \
    static void NAME##_fwd_task(int64_t K, const T *const *xs, const A *w, T *out, int64_t off, int64_t ooff,    \
                                int64_t c0, int64_t c1, int relu) {                                              \
        const T *p[LINES_CAP];                                                                                   \
        A v[LINES_CAP];                                                                                          \
        int c = 0;                                                                                               \
        for (int64_t k = 0; k < K; k++) {                                                                        \
            if (w[k] == 0) continue;                                                                             \
            if (c == LINES_MAX_K) {                                                                              \
                if (LINES_MAX_K > 0 && LINES_GROUPS)                                                             \
                    NAME##_fwd_groups(K, xs, w, out, off, ooff, c0, c1, relu);                                   \
                else                                                                                             \
                    NAME##_fwd_blocked(K, xs, w, out, off, ooff, c0, c1, relu);                                  \
                return;                                                                                          \
            }                                                                                                    \
            p[c] = xs[k];                                                                                        \
            v[c] = w[k];                                                                                         \
            c++;                                                                                                 \
        }                                                                                                        \
        NAME##_fwd_lines(c, p, v, out, off, ooff, c0, c1, relu);                                                 \
    }                                                                                                            \
                                                                                                                 \
    MULTIVERSION static void NAME##_bwd_task(int64_t K, const T *g, const T *const *xs, T *const *slots,         \
                                             const A *w, const uint8_t *fresh, double *dots, int64_t off,        \
                                             int64_t c0, int64_t c1) {                                           \
        A gb[BLK];                                                                                               \
        const int64_t bs = K >= BLK_MIN_K ? BLK : BLK_SMALL;                                                     \
        if (dots)                                                                                                \
            for (int64_t k = 0; k < K; k++) dots[k] = 0.0;                                                       \
        for (int64_t s = c0; s < c1; s += bs) {                                                                  \
            const int64_t n = MIN(bs, c1 - s);                                                                   \
            for (int64_t i = 0; i < n; i++) gb[i] = LD(g[off + s + i]);                                          \
            if (!slots) { /* dots only (the slots are summed later, by the consumer: pull), 4 inputs at a time */ \
                int64_t k = 0;                                                                                   \
                for (; k + 4 <= K; k += 4) {                                                                     \
                    const T *x0 = xs[k] + off + s, *x1 = xs[k + 1] + off + s;                                    \
                    const T *x2 = xs[k + 2] + off + s, *x3 = xs[k + 3] + off + s;                                \
                    A a0 = 0, a1 = 0, a2 = 0, a3 = 0;                                                            \
                    _Pragma("omp simd reduction(+ : a0, a1, a2, a3)") for (int64_t i = 0; i < n; i++) {          \
                        a0 += gb[i] * LD(x0[i]);                                                                 \
                        a1 += gb[i] * LD(x1[i]);                                                                 \
                        a2 += gb[i] * LD(x2[i]);                                                                 \
                        a3 += gb[i] * LD(x3[i]);                                                                 \
                    }                                                                                            \
                    dots[k] += (double)a0;                                                                       \
                    dots[k + 1] += (double)a1;                                                                   \
                    dots[k + 2] += (double)a2;                                                                   \
                    dots[k + 3] += (double)a3;                                                                   \
                }                                                                                                \
                for (; k < K; k++) {                                                                             \
                    const T *x = xs[k] + off + s;                                                                \
                    A acc = 0;                                                                                   \
                    _Pragma("omp simd reduction(+ : acc)") for (int64_t i = 0; i < n; i++) acc +=                \
                        gb[i] * LD(x[i]);                                                                        \
                    dots[k] += (double)acc;                                                                      \
                }                                                                                                \
                continue;                                                                                        \
            }                                                                                                    \
            for (int64_t k = 0; k < K; k++) {                                                                    \
                const A wk = w[k];                                                                               \
                T *sl = slots[k] + off + s;                                                                      \
                if (dots) {                                                                                      \
                    const T *x = xs[k] + off + s;                                                                \
                    A acc = 0;                                                                                   \
                    if (fresh[k]) {                                                                              \
                        _Pragma("omp simd reduction(+ : acc)") for (int64_t i = 0; i < n; i++) {                 \
                            acc += gb[i] * LD(x[i]);                                                             \
                            sl[i] = ST(wk * gb[i]);                                                              \
                        }                                                                                        \
                    } else if (wk != 0) {                                                                        \
                        _Pragma("omp simd reduction(+ : acc)") for (int64_t i = 0; i < n; i++) {                 \
                            acc += gb[i] * LD(x[i]);                                                             \
                            sl[i] = ST(LD(sl[i]) + wk * gb[i]);                                                  \
                        }                                                                                        \
                    } else {                                                                                     \
                        _Pragma("omp simd reduction(+ : acc)") for (int64_t i = 0; i < n; i++) acc +=            \
                            gb[i] * LD(x[i]);                                                                    \
                    }                                                                                            \
                    dots[k] += (double)acc;                                                                      \
                } else if (fresh[k]) {                                                                           \
                    for (int64_t i = 0; i < n; i++) sl[i] = ST(wk * gb[i]);                                      \
                } else if (wk != 0) {                                                                            \
                    for (int64_t i = 0; i < n; i++) sl[i] = ST(LD(sl[i]) + wk * gb[i]);                          \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
    }                                                                                                            \
                                                                                                                 \
    /* a node output's tap (backward): out = sum_k w[k] * gs[k] and, for the first Kd inputs (its consumers'     \
     * gradients), dots[k] = <gs[k], x> with x the node output (the gradients of its output edges' weights) */   \
    MULTIVERSION static void NAME##_tap_blocked(int64_t K, int64_t Kd, const T *const *gs, const A *w, const T *x, \
                                             T *out, double *dots, int64_t off, int64_t c0, int64_t c1) {        \
        A acc[BLK], xb[BLK];                                                                                     \
        const int64_t bs = K >= BLK_MIN_K ? BLK : BLK_SMALL;                                                     \
        for (int64_t k = 0; k < Kd; k++) dots[k] = 0.0;                                                          \
        for (int64_t s = c0; s < c1; s += bs) {                                                                  \
            const int64_t n = MIN(bs, c1 - s);                                                                   \
            for (int64_t i = 0; i < n; i++) {                                                                    \
                xb[i] = LD(x[off + s + i]);                                                                      \
                acc[i] = 0;                                                                                      \
            }                                                                                                    \
            int64_t k = 0;                                                                                       \
            for (; k + 4 <= Kd; k += 4) {                                                                        \
                const T *g0 = gs[k] + off + s, *g1 = gs[k + 1] + off + s;                                        \
                const T *g2 = gs[k + 2] + off + s, *g3 = gs[k + 3] + off + s;                                    \
                const A v0 = w[k], v1 = w[k + 1], v2 = w[k + 2], v3 = w[k + 3];                                  \
                A a0 = 0, a1 = 0, a2 = 0, a3 = 0;                                                                \
                _Pragma("omp simd reduction(+ : a0, a1, a2, a3)") for (int64_t i = 0; i < n; i++) {              \
                    const A e0 = LD(g0[i]), e1 = LD(g1[i]), e2 = LD(g2[i]), e3 = LD(g3[i]);                      \
                    acc[i] += v0 * e0 + v1 * e1 + v2 * e2 + v3 * e3;                                             \
                    a0 += e0 * xb[i];                                                                            \
                    a1 += e1 * xb[i];                                                                            \
                    a2 += e2 * xb[i];                                                                            \
                    a3 += e3 * xb[i];                                                                            \
                }                                                                                                \
                dots[k] += (double)a0;                                                                           \
                dots[k + 1] += (double)a1;                                                                       \
                dots[k + 2] += (double)a2;                                                                       \
                dots[k + 3] += (double)a3;                                                                       \
            }                                                                                                    \
            /* the last 1-3 dotted inputs in one pass, so acc and xb are walked once more, not up to 3 times */  \
            const int64_t r = Kd - k;                                                                            \
            if (r == 3) {                                                                                        \
                const T *g0 = gs[k] + off + s, *g1 = gs[k + 1] + off + s, *g2 = gs[k + 2] + off + s;             \
                const A v0 = w[k], v1 = w[k + 1], v2 = w[k + 2];                                                 \
                A a0 = 0, a1 = 0, a2 = 0;                                                                        \
                _Pragma("omp simd reduction(+ : a0, a1, a2)") for (int64_t i = 0; i < n; i++) {                  \
                    const A e0 = LD(g0[i]), e1 = LD(g1[i]), e2 = LD(g2[i]);                                      \
                    acc[i] += v0 * e0 + v1 * e1 + v2 * e2;                                                       \
                    a0 += e0 * xb[i];                                                                            \
                    a1 += e1 * xb[i];                                                                            \
                    a2 += e2 * xb[i];                                                                            \
                }                                                                                                \
                dots[k] += (double)a0;                                                                           \
                dots[k + 1] += (double)a1;                                                                       \
                dots[k + 2] += (double)a2;                                                                       \
            } else if (r == 2) {                                                                                 \
                const T *g0 = gs[k] + off + s, *g1 = gs[k + 1] + off + s;                                        \
                const A v0 = w[k], v1 = w[k + 1];                                                                \
                A a0 = 0, a1 = 0;                                                                                \
                _Pragma("omp simd reduction(+ : a0, a1)") for (int64_t i = 0; i < n; i++) {                      \
                    const A e0 = LD(g0[i]), e1 = LD(g1[i]);                                                      \
                    acc[i] += v0 * e0 + v1 * e1;                                                                 \
                    a0 += e0 * xb[i];                                                                            \
                    a1 += e1 * xb[i];                                                                            \
                }                                                                                                \
                dots[k] += (double)a0;                                                                           \
                dots[k + 1] += (double)a1;                                                                       \
            } else if (r == 1) {                                                                                 \
                const T *g0 = gs[k] + off + s;                                                                   \
                const A v0 = w[k];                                                                               \
                A a0 = 0;                                                                                        \
                _Pragma("omp simd reduction(+ : a0)") for (int64_t i = 0; i < n; i++) {                          \
                    const A e0 = LD(g0[i]);                                                                      \
                    acc[i] += v0 * e0;                                                                           \
                    a0 += e0 * xb[i];                                                                            \
                }                                                                                                \
                dots[k] += (double)a0;                                                                           \
            }                                                                                                    \
            k = Kd;                                                                                              \
            for (; k < K; k++) { /* further terms without a dot (other gradients of the output, weight 1) */     \
                const T *g0 = gs[k] + off + s;                                                                   \
                const A v0 = w[k];                                                                               \
                for (int64_t i = 0; i < n; i++) acc[i] += v0 * LD(g0[i]);                                        \
            }                                                                                                    \
            T *o = out + off + s;                                                                                \
            for (int64_t i = 0; i < n; i++) o[i] = ST(acc[i]);                                                   \
        }                                                                                                        \
    }                                                                                                            \
                                                                                                                 \
    static void NAME##_tap_task(int64_t K, int64_t Kd, const T *const *gs, const A *w, const T *x, T *out,       \
                                double *dots, int64_t off, int64_t c0, int64_t c1) {                             \
        if (LINES_MAX_K > 0 && (K <= LINES_MAX_K || LINES_GROUPS))                                               \
            NAME##_tap_lines(K, Kd, gs, w, x, out, dots, off, c0, c1);                                           \
        else                                                                                                     \
            NAME##_tap_blocked(K, Kd, gs, w, x, out, dots, off, c0, c1);                                         \
    }                                                                                                            \
    void dynwire_agg_tap_##NAME(int64_t B, int64_t N, int64_t K, int64_t Kd, const T *const *gs, const A *w,     \
                                const T *x, T *out, double *dots, int64_t chunk, int nthreads) {                 \
        const int64_t nch = (N + chunk - 1) / chunk;                                                             \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads)") for (int64_t t = 0; t < B * nch;      \
                                                                                t++) {                           \
            const int64_t b = t / nch, c0 = (t % nch) * chunk;                                                   \
            NAME##_tap_task(K, Kd, gs, w + b * K, x, out, dots + t * Kd, b * N, c0, MIN(c0 + chunk, N));         \
        }                                                                                                        \
    }                                                                                                            \
                                                                                                                 \
    void dynwire_agg_forward_##NAME(int64_t B, int64_t N, int64_t K, const T *const *xs, const A *w, T *out,     \
                                    int64_t chunk, int nthreads, int relu) {                                     \
        const int64_t nch = (N + chunk - 1) / chunk;                                                             \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads)") for (int64_t t = 0; t < B * nch;      \
                                                                                t++) {                           \
            const int64_t b = t / nch, c0 = (t % nch) * chunk;                                                   \
            NAME##_fwd_task(K, xs, w + b * K, out, b * N, b * N, c0, MIN(c0 + chunk, N), relu);                  \
        }                                                                                                        \
    }                                                                                                            \
                                                                                                                 \
    void dynwire_agg_backward_##NAME(int64_t B, int64_t N, int64_t K, const T *g, const T *const *xs,            \
                                     T *const *slots, const A *w, const uint8_t *fresh, double *dots,            \
                                     int64_t chunk, int nthreads) {                                              \
        const int64_t nch = (N + chunk - 1) / chunk;                                                             \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads)") for (int64_t t = 0; t < B * nch;      \
                                                                                t++) {                           \
            const int64_t b = t / nch, c0 = (t % nch) * chunk;                                                   \
            NAME##_bwd_task(K, g, xs, slots, w + b * K, fresh, dots ? dots + t * K : NULL, b * N, c0,            \
                            MIN(c0 + chunk, N));                                                                 \
        }                                                                                                        \
    }

DEFINE_KERNELS(f32, float, float, ID, ID)
DEFINE_KERNELS(f64, double, double, ID, ID)
DEFINE_KERNELS(bf16, uint16_t, float, bf16_load, bf16_store)

/* A router and its edge gate in inference (dynwire.layers.router, Eq. 4-5), one call per node:
 *   alpha[b, k] = sigmoid(bias[k] + sum_c W[k, c] * mean_hw(y[b, c, :]))      y: dense (B, C, HW), or
 *   (B, HW, C) where hwc (channels_last: a sample's channels are its innermost dimension)
 *   mode 0 "masked": value = alpha * sigmoid(alpha - tau[k]), open = alpha >= tau[k]
 *   mode 1 "hard":   value = alpha,                           open = alpha >= tau[k]
 *   mode 2 "soft":   value = alpha * sigmoid(alpha - tau[k]), open not written
 * value, open and alpha_last (alpha[:, K-1]) are written through element strides, straight into the
 * stage's (B, N, N) edge matrices. The mean is summed in the arithmetic type per channel, as one
 * pass over y (the memory-bound part; with hwc, one position's channels at a time); W is (K, C)
 * row-major. */
#define DEFINE_ROUTER(NAME, T)                                                                                   \
    MULTIVERSION static void NAME##_router_sample(int64_t C, int64_t HW, int hwc, const T *y, const T *W,        \
                                                  const T *bias, int64_t K, const T *tau, int mode, T *value,    \
                                                  int64_t vk, uint8_t *open, int64_t ok, T *alpha_last) {        \
        T pooled[1024];                                                                                          \
        T *pool = C <= 1024 ? pooled : (T *)malloc(sizeof(T) * C);                                               \
        const T inv = (T)1 / (T)HW;                                                                              \
        if (hwc) {                                                                                               \
            for (int64_t c = 0; c < C; c++) pool[c] = 0;                                                         \
            for (int64_t i = 0; i < HW; i++) {                                                                   \
                const T *p = y + i * C;                                                                          \
                _Pragma("omp simd") for (int64_t c = 0; c < C; c++) pool[c] += p[c];                             \
            }                                                                                                    \
            for (int64_t c = 0; c < C; c++) pool[c] *= inv;                                                      \
        } else {                                                                                                 \
            for (int64_t c = 0; c < C; c++) {                                                                    \
                const T *p = y + c * HW;                                                                         \
                T acc = 0;                                                                                       \
                _Pragma("omp simd reduction(+ : acc)") for (int64_t i = 0; i < HW; i++) acc += p[i];             \
                pool[c] = acc * inv;                                                                             \
            }                                                                                                    \
        }                                                                                                        \
        for (int64_t k = 0; k < K; k++) {                                                                        \
            const T *wk = W + k * C;                                                                             \
            T z = bias[k];                                                                                       \
            for (int64_t c = 0; c < C; c++) z += wk[c] * pool[c];                                                \
            const T a = (T)1 / ((T)1 + (T)EXP(-z));                                                              \
            const T t = tau[k];                                                                                  \
            value[k * vk] = mode == 1 ? a : a / ((T)1 + (T)EXP(t - a));                                          \
            if (open) open[k * ok] = a >= t;                                                                     \
            if (k == K - 1 && alpha_last) *alpha_last = a;                                                       \
        }                                                                                                        \
        if (pool != pooled) free(pool);                                                                          \
    }                                                                                                            \
                                                                                                                 \
    void dynwire_router_gate_##NAME(int64_t B, int64_t C, int64_t HW, const T *y, const T *W, const T *bias,     \
                                    int64_t K, const T *tau, int mode, T *value, int64_t vb, int64_t vk,         \
                                    uint8_t *open, int64_t ob, int64_t ok, T *alpha_last, int64_t ab,            \
                                    int nthreads) {                                                              \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads)") for (int64_t b = 0; b < B; b++)       \
            NAME##_router_sample(C, HW, 0, y + b * C * HW, W, bias, K, tau, mode, value + b * vb, vk,            \
                                 open ? open + b * ob : NULL, ok, alpha_last ? alpha_last + b * ab : NULL);      \
    }

#define EXP expf
DEFINE_ROUTER(f32, float)
#undef EXP
#define EXP exp
DEFINE_ROUTER(f64, double)
#undef EXP

/* A node's input weights in inference (dynwire.graph._inference), one call per block node of a
 * complete DAG (inputs 0 .. K-1), reading the stage's (B, N, N) edge matrices row by row:
 *   w[b, k] = value[b, k] where open[b, k] and alive[b, k], else 0;  alive_out[b] = any of them
 * Returns how many samples keep the node alive. */
#define DEFINE_NODE_WEIGHTS(NAME, T)                                                                             \
    int64_t dynwire_node_weights_##NAME(int64_t B, int64_t K, const T *value, int64_t vb, const uint8_t *open,   \
                                        int64_t ob, const uint8_t *alive, int64_t ab, T *w, uint8_t *alive_out,  \
                                        int64_t aob) {                                                           \
        int64_t count = 0;                                                                                       \
        for (int64_t b = 0; b < B; b++) {                                                                        \
            const T *v = value + b * vb;                                                                         \
            const uint8_t *o = open + b * ob, *a = alive + b * ab;                                               \
            uint8_t any = 0;                                                                                     \
            for (int64_t k = 0; k < K; k++) {                                                                    \
                const uint8_t on = o[k] && a[k];                                                                 \
                w[b * K + k] = on ? v[k] : (T)0;                                                                 \
                any |= on;                                                                                       \
            }                                                                                                    \
            alive_out[b * aob] = any;                                                                            \
            count += any;                                                                                        \
        }                                                                                                        \
        return count;                                                                                            \
    }

DEFINE_NODE_WEIGHTS(f32, float)
DEFINE_NODE_WEIGHTS(f64, double)

/* One sample through a stage of a complete DAG in inference (dynwire.graph._inference, batch 1):
 * one call per block node i after the block ran, with the stage's plan and a zeroed scratch area.
 *   plan: n, C, HW, mode, removal, tau, hwc (1: the maps are channels_last, a sample (HW, C)), then
 *         per block node i: W_i, bias_i (router of node i, (n - i, C) row-major), then n + 1 relu
 *         flags (node j's aggregation applies max(., 0))
 *   scratch: xs (n + 1 pointers), value (N*N), alpha_out (N), w (N) of T, open (N*N), alive (N)
 *         bytes; N = n + 1, value/open receiver-major as the stage's edge matrices; zeroed, except
 *         open all 1 without removal and alive[0] = 1 (block 0 always runs)
 * Records y as node i's output, runs its router and gate (Eq. 4-5) into column i, then finds the
 * next node j > i with an open edge from a live node (Sec. 3.3: nodes with none are removed; the
 * output node n keeps its strongest edge from a live node), writes its input into out and returns
 * j. Without removal every edge is open and every node runs. */
#define DEFINE_SAMPLE(NAME, T)                                                                                   \
    int64_t dynwire_sample_step_##NAME(const int64_t *plan, void *scratch, int64_t i, const T *y, T *out) {      \
        const int64_t n = plan[0], C = plan[1], HW = plan[2], N = plan[0] + 1;                                   \
        const int mode = (int)plan[3], removal = (int)plan[4];                                                   \
        const T *tau = (const T *)(intptr_t)plan[5];                                                             \
        const int64_t *router = plan + 7, *relu = plan + 7 + 2 * n;                                              \
        const T **xs = (const T **)scratch;                                                                      \
        T *value = (T *)(xs + N), *alpha_out = value + N * N, *w = alpha_out + N;                                \
        uint8_t *open = (uint8_t *)(w + N), *alive = open + N * N;                                               \
        xs[i] = y;                                                                                               \
        NAME##_router_sample(C, HW, (int)plan[6], y, (const T *)(intptr_t)router[2 * i],                         \
                             (const T *)(intptr_t)router[2 * i + 1],                                             \
                             n - i, tau + i, mode, value + (i + 1) * N + i, N,                                   \
                             removal ? open + (i + 1) * N + i : NULL, N, alpha_out + i);                         \
        int64_t j = i + 1;                                                                                       \
        for (;; j++) {                                                                                           \
            if (dynwire_node_weights_##NAME(1, j, value + j * N, 0, open + j * N, 0, alive, 0, w, alive + j, 0)) \
                break;                                                                                           \
            if (j == n) { /* the output node: its strongest edge from a live node */                             \
                int64_t best = -1;                                                                               \
                for (int64_t k = 0; k < n; k++)                                                                  \
                    if (alive[k] && (best < 0 || alpha_out[k] > alpha_out[best])) best = k;                      \
                w[best] = value[n * N + best];                                                                   \
                break;                                                                                           \
            }                                                                                                    \
        }                                                                                                        \
        NAME##_fwd_task(j, (const T *const *)xs, w, out, 0, 0, 0, C * HW, (int)relu[j]);                         \
        return j;                                                                                                \
    }

DEFINE_SAMPLE(f32, float)
DEFINE_SAMPLE(f64, double)

/* A batch through a stage of a complete DAG in inference (dynwire.graph._inference, batch > 1): one
 * call per node j >= 1, with the plan of dynwire_sample_step and the stage's edge matrices
 * (EdgeMatrices: value and open (B, N, N) receiver-major, alpha_out (B, N)) and alive (B, N), all
 * dense. When y is not NULL it is node i = j - 1's output (B, C, HW; (B, HW, C) with the plan's hwc): its router and gate (Eq. 4-5)
 * fill column i first. Then, per sample, node j's input weights w (B, N scratch; closed edges and
 * removed inputs at 0, Sec. 3.3; the output node keeps its strongest edge from a live node) and
 * alive[b, j] (block nodes), and the sum of xs (node outputs; NULL for a node removed for every
 * sample, whose weights are all 0) into out. compact: the live samples' inputs are written to rows
 * 0 .. count-1 in order and idx[r] is the sample of row r; otherwise every row is written (zeros for
 * a removed sample). Without removal (open and alive NULL) every edge is open. On one thread a
 * sample's router and sum follow each other, so the sum reads y's sample from cache. Returns count,
 * the samples for which node j is alive.
 *
 * Partial sums (both NULL or not, independently; N <= PENDING_MAX_N): pout receives, per sample,
 * node j + 1's sum over inputs 0 .. j-1 (all of their weights are known once node j - 1's router
 * ran), read right after node j's sum while those inputs are in cache, not ReLU'd; pin is such a sum
 * for node j from the previous call, and node j's input is then pin + w[j-1] * x[j-1] (two reads
 * from memory instead of j; the output node's fallback edge sums from xs). A sum of up to
 * LINES_MAX_K inputs keeps its order, so either way gives the same bits. out may be pin (written in
 * place), except when compact with nthreads > 1. */
#ifndef PENDING_MAX_N
#define PENDING_MAX_N 64
#endif
#define DEFINE_BATCH(NAME, T)                                                                                    \
    static int NAME##_batch_weights(const int64_t *plan, int64_t i, const T *y, T *value, uint8_t *open,         \
                                    T *alpha_out, uint8_t *alive, int64_t j, T *w) {                             \
        const int64_t n = plan[0], C = plan[1], HW = plan[2], N = plan[0] + 1;                                   \
        const int mode = (int)plan[3];                                                                           \
        const T *tau = (const T *)(intptr_t)plan[5];                                                             \
        const int64_t *router = plan + 7;                                                                        \
        if (y)                                                                                                   \
            NAME##_router_sample(C, HW, (int)plan[6], y, (const T *)(intptr_t)router[2 * i],                     \
                                 (const T *)(intptr_t)router[2 * i + 1], n - i, tau + i, mode,                   \
                                 value + (i + 1) * N + i, N, open ? open + (i + 1) * N + i : NULL, N,            \
                                 alpha_out + i);                                                                 \
        if (!open) {                                                                                             \
            for (int64_t k = 0; k < j; k++) w[k] = value[j * N + k];                                             \
            return 1;                                                                                            \
        }                                                                                                        \
        uint8_t none = 0;                                                                                        \
        if (dynwire_node_weights_##NAME(1, j, value + j * N, 0, open + j * N, 0, alive, 0, w,                    \
                                        j < n ? alive + j : &none, 0))                                           \
            return 1;                                                                                            \
        if (j < n) return 0;                                                                                     \
        int64_t best = -1; /* the output node: its strongest edge from a live node */                            \
        for (int64_t k = 0; k < n; k++)                                                                          \
            if (alive[k] && (best < 0 || alpha_out[k] > alpha_out[best])) best = k;                              \
        w[best] = value[n * N + best];                                                                           \
        return 2;                                                                                                \
    }                                                                                                            \
                                                                                                                 \
    /* node j + 1's partial sum over inputs 0 .. j-1 for sample b (weights as batch_weights gives them) */      \
    static void NAME##_pending(int64_t N, const T *value, const uint8_t *open, const uint8_t *alive, int64_t j,  \
                               const T *const *xs, T *pout, int64_t off, int64_t CHW) {                          \
        T v[PENDING_MAX_N];                                                                                      \
        for (int64_t k = 0; k < j; k++)                                                                          \
            v[k] = !open || (open[(j + 1) * N + k] && alive[k]) ? value[(j + 1) * N + k] : (T)0;                 \
        NAME##_fwd_task(j, xs, v, pout, off, off, 0, CHW, 0);                                                    \
    }                                                                                                            \
                                                                                                                 \
    /* node j's input for sample b into row r: from pin where the previous call left its partial sum */        \
    static void NAME##_node_input(int64_t j, const T *const *xs, const T *wb, const T *pin, T *out, int64_t off, \
                                  int64_t ooff, int64_t CHW, int from_pin, int relu) {                           \
        if (from_pin) {                                                                                          \
            const T *q[2] = {pin, xs[j - 1]};                                                                    \
            const T v[2] = {(T)1, wb[j - 1]};                                                                    \
            NAME##_fwd_task(2, q, v, out, off, ooff, 0, CHW, relu);                                              \
        } else {                                                                                                 \
            NAME##_fwd_task(j, xs, wb, out, off, ooff, 0, CHW, relu);                                            \
        }                                                                                                        \
    }                                                                                                            \
                                                                                                                 \
    int64_t dynwire_batch_step_##NAME(const int64_t *plan, int64_t B, int64_t i, const T *y, T *value,           \
                                      uint8_t *open, T *alpha_out, uint8_t *alive, const T *const *xs,           \
                                      int64_t j, T *w, T *out, int64_t *idx, int compact, int nthreads,          \
                                      const T *pin, T *pout) {                                                   \
        const int64_t N = plan[0] + 1, CHW = plan[1] * plan[2];                                                  \
        const int relu = (int)plan[7 + 2 * plan[0] + j];                                                         \
        int64_t count = 0;                                                                                       \
        if (((pin || pout) && N > PENDING_MAX_N) || (pout && j >= N - 1)) return -1;                             \
        uint8_t *lives = nthreads > 1 ? (uint8_t *)malloc((size_t)B) : NULL;                                     \
        if (!lives) { /* one thread (or no memory for the flags): sample by sample */                            \
            for (int64_t b = 0; b < B; b++) {                                                                    \
                const int live = NAME##_batch_weights(plan, i, y ? y + b * CHW : NULL, value + b * N * N,        \
                                                      open ? open + b * N * N : NULL, alpha_out + b * N,         \
                                                      alive ? alive + b * N : NULL, j, w + b * N);               \
                if (live) idx[count++] = b;                                                                      \
                if (live || !compact)                                                                            \
                    NAME##_node_input(j, xs, w + b * N, pin, out, b * CHW, (compact ? count - 1 : b) * CHW, CHW, \
                                      pin && live == 1, live ? relu : 0);                                        \
                if (pout)                                                                                        \
                    NAME##_pending(N, value + b * N * N, open ? open + b * N * N : NULL,                         \
                                   alive ? alive + b * N : NULL, j, xs, pout, b * CHW, CHW);                     \
            }                                                                                                    \
            NT_FENCE();                                                                                          \
            return count;                                                                                        \
        }                                                                                                        \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads)") for (int64_t b = 0; b < B; b++)       \
            lives[b] = (uint8_t)NAME##_batch_weights(plan, i, y ? y + b * CHW : NULL, value + b * N * N,         \
                                                     open ? open + b * N * N : NULL, alpha_out + b * N,          \
                                                     alive ? alive + b * N : NULL, j, w + b * N);                \
        for (int64_t b = 0; b < B; b++)                                                                          \
            if (lives[b]) idx[count++] = b;                                                                      \
        /* a sample's input, then its partial sum, while the inputs just read are in cache */                   \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads)") for (int64_t b = 0; b < B; b++) {     \
            if (lives[b] || !compact) {                                                                          \
                int64_t r = b; /* compact: the row of a live sample, found in idx (ascending) */                 \
                if (compact) {                                                                                   \
                    int64_t lo = 0, hi = count - 1;                                                              \
                    while (lo < hi) {                                                                            \
                        const int64_t mid = (lo + hi) / 2;                                                       \
                        if (idx[mid] < b) lo = mid + 1; else hi = mid;                                           \
                    }                                                                                            \
                    r = lo;                                                                                      \
                }                                                                                                \
                NAME##_node_input(j, xs, w + b * N, pin, out, b * CHW, r * CHW, CHW, pin && lives[b] == 1,       \
                                  lives[b] ? relu : 0);                                                          \
            }                                                                                                    \
            if (pout)                                                                                            \
                NAME##_pending(N, value + b * N * N, open ? open + b * N * N : NULL, alive ? alive + b * N : NULL, \
                               j, xs, pout, b * CHW, CHW);                                                       \
        }                                                                                                        \
        free(lives);                                                                                             \
        NT_FENCE();                                                                                              \
        return count;                                                                                            \
    }

DEFINE_BATCH(f32, float)
DEFINE_BATCH(f64, double)

/* ABI version checked by aggregation.py: bump when a signature or a contract changes
 * (2: slots may be NULL, then only the dots are computed; 3: forward's relu flag, the router gate, the node
 * weights; 4: the batch-1 stage step; 5: the batch stage step, fwd_task's output offset;
 * 6: the tap with its output edges' dot products; 7: dynwire_lines_isa; 8: the batch step's partial sums,
 * dynwire_lines_max_k). */
int dynwire_agg_abi(void) { return 9; }

/* How many inputs a sum reads together, line by line, in their order (0: the blocked kernels only). */
int dynwire_lines_max_k(void) { return LINES_MAX_K; }

/* An importable (empty) extension module, so that setuptools can build it on every platform. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_aggkernel",
                                    "Fused aggregation kernels, called through ctypes.", -1, NULL};

PyMODINIT_FUNC PyInit__aggkernel(void) { return PyModule_Create(&module); }
