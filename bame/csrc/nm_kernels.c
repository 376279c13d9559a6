/*
 * Native CPU kernels for the N:M-sparse Linear products and for mask upkeep (top-N masks, LMA proposals,
 * flip counts); bame.native loads them with ctypes.
 *
 * C99 with two GCC/Clang extensions (__builtin_popcount, always_inline), no dependency beyond libc: compiled
 * on first use with ``cc -O3 -march=native -fPIC -shared``.
 * Every kernel works on a row range [r0, r1) so that Python threads (ctypes releases the GIL) can split
 * the work; a row's result never depends on the split, so any split gives bit-identical output.
 *
 * Token tables are float32 in the *tiled* transposed layout of bame/kernels/tiles.py: a (T, R) activation
 * (x or dY) is stored as (n_tiles, R, tw), tile c holding rows a[c*tw : (c+1)*tw]^T, the tokens past T
 * zero. One tile's table is contiguous (tw floats per row): it stays in L2 while every bag of a row range
 * is summed over it, without the cache-set conflicts of a power-of-two row stride. Indices and offsets
 * are int64.
 */

#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Version of the C interface; native.py checks it after loading a library. */
int64_t nm_abi_version(void) { return 11; }

/* The largest token tile (floats): the accumulators of one bag tile stay in registers. */
#define MAX_TW 64

/*
 * A minimal SIMD layer: AVX-512 or AVX2+FMA intrinsics when the compiler targets them (-march=native),
 * else one float per "vector" (portable C). Written with explicit vectors rather than left to the
 * auto-vectorizer: GCC's loop interchange turns the natural "for slot, for token" loop into a scalar
 * strided one.
 */
#if defined(__AVX512F__)
#include <immintrin.h>
#define VW 16
typedef __m512 vec;
#define VZERO() _mm512_setzero_ps()
#define VSET1(x) _mm512_set1_ps(x)
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps((p), (v))
#define VFMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define VMUL(a, b) _mm512_mul_ps((a), (b))
#define VADD(a, b) _mm512_add_ps((a), (b))
#define VHSUM(v) _mm512_reduce_add_ps(v)
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VW 8
typedef __m256 vec;
#define VZERO() _mm256_setzero_ps()
#define VSET1(x) _mm256_set1_ps(x)
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, v) _mm256_storeu_ps((p), (v))
#define VFMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define VMUL(a, b) _mm256_mul_ps((a), (b))
#define VADD(a, b) _mm256_add_ps((a), (b))
static inline float VHSUM(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
#else
#define VW 1
typedef float vec;
#define VZERO() 0.0f
#define VSET1(x) (x)
#define VLOAD(p) (*(p))
#define VSTORE(p, v) (*(p) = (v))
#define VFMA(a, b, c) ((a) * (b) + (c))
#define VMUL(a, b) ((a) * (b))
#define VADD(a, b) ((a) + (b))
#define VHSUM(v) (v)
#endif

/* The slots [p0, p1) of one bag into ``acc`` and ``acc2`` (W / VW vectors each): even and odd slots in
 * two sets of accumulators, twice the independent FMA chains, to hide the FMA latency. */
#define BAG_SLOTS(W)                                                                     \
    do {                                                                                 \
        int64_t p = p0;                                                                  \
        for (; p + 1 < p1; p += 2) {                                                     \
            const vec w0 = VSET1(w[wperm ? wperm[p] : p]);                               \
            const vec w1 = VSET1(w[wperm ? wperm[p + 1] : p + 1]);                       \
            const float *restrict row0 = tab + idx[p] * (W);                             \
            const float *restrict row1 = tab + idx[p + 1] * (W);                         \
            for (int v = 0; v < (W) / VW; ++v) {                                         \
                acc[v] = VFMA(w0, VLOAD(row0 + v * VW), acc[v]);                         \
                acc2[v] = VFMA(w1, VLOAD(row1 + v * VW), acc2[v]);                       \
            }                                                                            \
        }                                                                                \
        if (p < p1) {                                                                    \
            const vec w0 = VSET1(w[wperm ? wperm[p] : p]);                               \
            const float *restrict row0 = tab + idx[p] * (W);                             \
            for (int v = 0; v < (W) / VW; ++v) acc[v] = VFMA(w0, VLOAD(row0 + v * VW), acc[v]); \
        }                                                                                \
    } while (0)

/* One bag over one tile of compile-time width W (a multiple of VW): two sets of W / VW vector accumulators
 * (even and odd slots: twice the independent FMA chains, to hide the FMA latency), summed at the end. */
#define BAG_TILE(W)                                                                      \
    do {                                                                                 \
        vec acc[(W) / VW], acc2[(W) / VW];                                               \
        float buf[W];                                                                    \
        for (int v = 0; v < (W) / VW; ++v) acc[v] = acc2[v] = VZERO();                   \
        BAG_SLOTS(W);                                                                    \
        for (int v = 0; v < (W) / VW; ++v) VSTORE(buf + v * VW, VADD(acc[v], acc2[v]));  \
        for (int64_t j = 0; j < width; ++j) dst[j * ldt] = buf[j];                       \
    } while (0)

/*
 * Weighted row sums ("bags") over a tiled table:
 *     out[r, t] = sum_{p = off[r]}^{off[r+1] - 1} w[q(p)] * table[idx[p], t]      for r in [r0, r1), t < T
 * with q(p) = wperm[p] when wperm is not NULL, else p (so the input gradient reads the values in CSC
 * order without a separate permuting copy).
 *
 * table: (n_tiles, rows, tw) with n_tiles = ceil(T / tw), tw <= MAX_TW. out[r, t] is stored at
 * out[r * ldr + t * ldt]: (ldr, ldt) = (T, 1) gives a (bags, T) result, (1, bags) its transpose (T, bags),
 * written directly (no transposing copy afterwards).
 */
void nm_bag_f32(const float *restrict table, int64_t rows, int64_t T, int64_t tw, const int64_t *restrict idx,
                const int64_t *restrict off, const float *restrict w, const int64_t *restrict wperm,
                float *restrict out, int64_t ldr, int64_t ldt, int64_t r0, int64_t r1) {
    const int64_t n_tiles = (T + tw - 1) / tw;
    for (int64_t c = 0; c < n_tiles; ++c) {
        const float *restrict tab = table + c * rows * tw;
        const int64_t width = (T - c * tw < tw) ? T - c * tw : tw;
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t p0 = off[r], p1 = off[r + 1];
            float *restrict dst = out + r * ldr + c * tw * ldt;
            if (tw == 64) {
                BAG_TILE(64);
            } else if (tw == 32) {
                BAG_TILE(32);
            } else if (tw == 16) {
                BAG_TILE(16);
            } else { /* small or odd tiles (T < 16, say): scalar, runtime width */
                float acc[MAX_TW];
                for (int64_t j = 0; j < tw; ++j) acc[j] = 0.0f;
                for (int64_t p = p0; p < p1; ++p) {
                    const float wp = w[wperm ? wperm[p] : p];
                    const float *restrict row = tab + idx[p] * tw;
                    for (int64_t j = 0; j < tw; ++j) acc[j] += wp * row[j];
                }
                for (int64_t j = 0; j < width; ++j) dst[j * ldt] = acc[j];
            }
        }
    }
}

/* Dot product of a (held in W / VW registers) with a length-W row b: vector partial sums, then a fixed
 * pairwise reduction (the same order for every call, so results do not depend on the thread split). */
#define DOT_TILE(W, a, b, result)                                                        \
    do {                                                                                 \
        vec prod[(W) / VW];                                                              \
        for (int v = 0; v < (W) / VW; ++v) prod[v] = VMUL((a)[v], VLOAD((b) + v * VW));  \
        for (int half = (W) / VW / 2; half > 0; half /= 2)                               \
            for (int v = 0; v < half; ++v) prod[v] = VADD(prod[v], prod[v + half]);      \
        (result) = VHSUM(prod[0]);                                                        \
    } while (0)

/* All slots of row r for one tile of compile-time width W. */
#define DOT_ROW(W)                                                                       \
    do {                                                                                 \
        vec av[(W) / VW];                                                                \
        for (int v = 0; v < (W) / VW; ++v) av[v] = VLOAD(a + v * VW);                    \
        for (int64_t p = off[r]; p < off[r + 1]; ++p) {                                  \
            float d;                                                                     \
            DOT_TILE(W, av, tb + idx[p] * (W), d);                                       \
            out[p] = (c == 0) ? d : out[p] + d;                                          \
        }                                                                                \
    } while (0)

/*
 * Sampled dense-dense product (the weight gradient at kept slots only) over tiled tables:
 *     out[p] = sum_t A[r, t] * B[idx[p], t]      for p in [off[r], off[r+1]), r in [r0, r1)
 * A: (n_tiles, rows_a, tw) = dY^T; B: (n_tiles, rows_b, tw) = x^T (padding tokens are zero in both).
 * Slots with keep != NULL and keep[p] == 0 (padding) get 0. The tiles are the outer loop, so one tile of
 * B stays in L2 while out[] accumulates over the tiles.
 */
void nm_sampled_dot_f32(const float *restrict A, int64_t rows_a, const float *restrict B, int64_t rows_b,
                        int64_t T, int64_t tw, const int64_t *restrict idx, const int64_t *restrict off,
                        const uint8_t *restrict keep, float *restrict out, int64_t r0, int64_t r1) {
    const int64_t n_tiles = (T + tw - 1) / tw;
    for (int64_t c = 0; c < n_tiles; ++c) {
        const float *restrict ta = A + c * rows_a * tw;
        const float *restrict tb = B + c * rows_b * tw;
        for (int64_t r = r0; r < r1; ++r) {
            const float *restrict a = ta + r * tw;
            if (tw == 64) {
                DOT_ROW(64);
            } else if (tw == 32) {
                DOT_ROW(32);
            } else if (tw == 16) {
                DOT_ROW(16);
            } else {
                for (int64_t p = off[r]; p < off[r + 1]; ++p) {
                    const float *restrict b = tb + idx[p] * tw;
                    float d = 0.0f;
                    for (int64_t j = 0; j < tw; ++j) d += a[j] * b[j];
                    out[p] = (c == 0) ? d : out[p] + d;
                }
            }
        }
    }
    if (keep)
        for (int64_t r = r0; r < r1; ++r)
            for (int64_t p = off[r]; p < off[r + 1]; ++p)
                if (!keep[p]) out[p] = 0.0f;
}

/*
 * A row-major (T, R) matrix into the tiled transposed layout (n_tiles, R, tw), zero past T; this call
 * writes table rows [r0, r1) of every tile. Blocks of 16 x 16 keep reads and writes in whole cache lines.
 */
void nm_to_tiles_f32(const float *restrict a, int64_t T, int64_t R, int64_t tw, float *restrict out,
                     int64_t r0, int64_t r1) {
    const int64_t n_tiles = (T + tw - 1) / tw;
    for (int64_t c = 0; c < n_tiles; ++c) {
        float *restrict tile = out + c * R * tw;
        const int64_t width = (T - c * tw < tw) ? T - c * tw : tw;
        for (int64_t i0 = r0; i0 < r1; i0 += 16) {
            const int64_t i1 = (i0 + 16 < r1) ? i0 + 16 : r1;
            for (int64_t j0 = 0; j0 < width; j0 += 16) {
                const int64_t j1 = (j0 + 16 < width) ? j0 + 16 : width;
                for (int64_t i = i0; i < i1; ++i)
                    for (int64_t j = j0; j < j1; ++j) tile[i * tw + j] = a[(c * tw + j) * R + i];
            }
            if (width < tw)
                for (int64_t i = i0; i < i1; ++i)
                    memset(tile + i * tw + width, 0, (size_t)(tw - width) * sizeof(float));
        }
    }
}

/*
 * Slot values into a dense row-major matrix: row r of dense (stride ld) becomes zero except
 *     dense[r, idx[p]] = vals[p]      for p in [off[r], off[r+1]) with keep[p] (or keep NULL)
 * for r in [r0, r1): one pass over the dense rows (the dense gradient from the slot gradients).
 */
void nm_scatter_rows_f32(const float *restrict vals, const int64_t *restrict idx, const int64_t *restrict off,
                         const uint8_t *restrict keep, float *restrict dense, int64_t ncols, int64_t ld,
                         int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        float *restrict row = dense + r * ld;
        memset(row, 0, (size_t)ncols * sizeof(float));
        for (int64_t p = off[r]; p < off[r + 1]; ++p)
            if (!keep || keep[p]) row[idx[p]] = vals[p];
    }
}

/*
 * Slot values gathered from a dense row-major matrix (the packed values of the current weight):
 *     out[p] = dense[r, idx[p]]  (0 at padding slots: keep[p] == 0)      for p in [off[r], off[r+1])
 */
void nm_gather_rows_f32(const float *restrict dense, int64_t ld, const int64_t *restrict idx,
                        const int64_t *restrict off, const uint8_t *restrict keep, float *restrict out,
                        int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        const float *restrict row = dense + r * ld;
        for (int64_t p = off[r]; p < off[r + 1]; ++p) out[p] = (!keep || keep[p]) ? row[idx[p]] : 0.0f;
    }
}

/* out[q] = src[idx[q]] for q in [q0, q1) (the values in another slot order, e.g. W^T's CSR order). */
void nm_take_f32(const float *restrict src, const int64_t *restrict idx, float *restrict out, int64_t q0,
                 int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) out[q] = src[idx[q]];
}

/*
 * Top-N masks (bame.nm.topn_mask and topn_mask_grouped). Scores are a contiguous (G, M, R) float32
 * tensor; every group of M entries along the middle axis keeps its N largest:
 *     keep(g, i, r)  <=>  #{j : (g, j, r) beats (g, i, r)} < n
 * where j beats i when its score is larger, or equal with j < i (ties go to the lower index), every NaN
 * ranking above every number and -0.0 equal to +0.0: a strict total order, so exactly n entries are kept.
 * With `magnitude`, |score| is ranked. Scores become order-preserving int32 keys. Columns (g, r) are
 * processed in tiles of TOPN_TILE: keys in a (M, tile) buffer, then the M(M-1)/2 pairwise comparisons run
 * along the tile (vectorised). R == 1 (blocks of M consecutive scores) tiles across groups, with code
 * specialised for M = 8 and 16; for M = 2 and 4 each key is compared with its whole block in registers.
 */
#define TOPN_TILE 256
#define TOPN_MAX_M 32

static inline __attribute__((always_inline)) int32_t nm_score_key(float x, int64_t magnitude) {
    x = x + 0.0f; /* -0.0 -> +0.0 */
    int32_t b;
    memcpy(&b, &x, sizeof b);
    int32_t k = magnitude ? (b & INT32_MAX) : (b ^ ((b >> 31) & INT32_MAX)); /* negatives: flip magnitude bits */
    return x != x ? INT32_MAX : k;
}

static inline __attribute__((always_inline)) void nm_topn_tile(int32_t (*restrict key)[TOPN_TILE],
                                                               int32_t (*restrict def)[TOPN_TILE], int64_t m,
                                                               int64_t tile) {
    for (int64_t i = 0; i < m; ++i)
        for (int64_t t = 0; t < tile; ++t) def[i][t] = 0;
    for (int64_t i = 0; i < m; ++i)
        for (int64_t j = i + 1; j < m; ++j) {
            const int32_t *restrict ki = key[i], *restrict kj = key[j];
            int32_t *restrict di = def[i], *restrict dj = def[j];
            for (int64_t t = 0; t < tile; ++t) {
                int32_t jw = kj[t] > ki[t];
                di[t] += jw;
                dj[t] += 1 - jw;
            }
        }
}

/* Blocks [g0, g1) of M consecutive scores (R == 1); inlined with constant M and magnitude. */
static inline __attribute__((always_inline)) void nm_topn_blocks(const float *restrict s, int64_t M, int64_t n,
                                                                 int64_t magnitude, uint8_t *restrict out,
                                                                 int64_t g0, int64_t g1) {
    int32_t key[TOPN_MAX_M][TOPN_TILE], def[TOPN_MAX_M][TOPN_TILE];
    for (int64_t c = g0; c < g1; c += TOPN_TILE) {
        int64_t tile = g1 - c < TOPN_TILE ? g1 - c : TOPN_TILE;
        const float *restrict base = s + c * M;
        for (int64_t t = 0; t < tile; ++t)
            for (int64_t i = 0; i < M; ++i) key[i][t] = nm_score_key(base[t * M + i], magnitude);
        nm_topn_tile(key, def, M, tile);
        uint8_t *restrict ob = out + c * M;
        for (int64_t t = 0; t < tile; ++t)
            for (int64_t i = 0; i < M; ++i) ob[t * M + i] = def[i][t] < n;
    }
}

/* The same for small M (2, 4): every key against the whole block in registers, no tile buffers. */
static inline __attribute__((always_inline)) void nm_topn_blocks_direct(const float *restrict s, int64_t M, int64_t n,
                                                                 int64_t magnitude, uint8_t *restrict out,
                                                                 int64_t g0, int64_t g1) {
    int32_t k[TOPN_MAX_M], d[TOPN_MAX_M];
    for (int64_t c = g0; c < g1; ++c) {
        const float *restrict base = s + c * M;
        for (int64_t i = 0; i < M; ++i) {
            k[i] = nm_score_key(base[i], magnitude);
            d[i] = 0;
        }
        for (int64_t j = 0; j < M; ++j) {
            int32_t kj = k[j];
            for (int64_t i = 0; i < M; ++i) d[i] += (kj > k[i]) | ((kj == k[i]) & (j < i));
        }
        uint8_t *restrict ob = out + c * M;
        for (int64_t i = 0; i < M; ++i) ob[i] = d[i] < n;
    }
}

#define NM_TOPN_BLOCKS_CASE(fn, m)                                                                              \
    case m:                                                                                                     \
        if (magnitude) fn(s, m, n, 1, out, g0, g1);                                                             \
        else fn(s, m, n, 0, out, g0, g1);                                                                       \
        return;

/* Groups [g0, g1) of a (G, M, R) score tensor; `out` is the bool (0/1 byte) mask of the same layout. */
void nm_topn_mask_f32(const float *restrict s, int64_t M, int64_t R, int64_t n, int64_t magnitude,
                      uint8_t *restrict out, int64_t g0, int64_t g1) {
    if (R == 1) {
        switch (M) {
            NM_TOPN_BLOCKS_CASE(nm_topn_blocks_direct, 2)
            NM_TOPN_BLOCKS_CASE(nm_topn_blocks_direct, 4)
            NM_TOPN_BLOCKS_CASE(nm_topn_blocks, 8)
            NM_TOPN_BLOCKS_CASE(nm_topn_blocks, 16)
            default:
                nm_topn_blocks(s, M, n, magnitude, out, g0, g1);
                return;
        }
    }
    int32_t key[TOPN_MAX_M][TOPN_TILE], def[TOPN_MAX_M][TOPN_TILE];
    for (int64_t g = g0; g < g1; ++g)
        for (int64_t r = 0; r < R; r += TOPN_TILE) {
            int64_t tile = R - r < TOPN_TILE ? R - r : TOPN_TILE;
            const float *restrict base = s + g * M * R + r;
            for (int64_t i = 0; i < M; ++i)
                for (int64_t t = 0; t < tile; ++t) key[i][t] = nm_score_key(base[i * R + t], magnitude);
            nm_topn_tile(key, def, M, tile);
            uint8_t *restrict ob = out + g * M * R + r;
            for (int64_t i = 0; i < M; ++i)
                for (int64_t t = 0; t < tile; ++t) ob[i * R + t] = def[i][t] < n;
        }
}

/*
 * Flips per block (bame.nm.block_flips): out[k] = #{i : a[k*M + i] != b[k*M + i]} for blocks [k0, k1) of
 * two bool (0/1 byte) masks. Blocks of 2, 4 or 8 bytes are compared as one word: the XOR of 0/1 bytes has
 * one bit per differing entry, so its popcount is the count.
 */
static inline __attribute__((always_inline)) void nm_block_flips_words(const uint8_t *restrict a,
                                                                       const uint8_t *restrict b, int64_t M,
                                                                       int32_t *restrict out, int64_t k0,
                                                                       int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
        uint64_t x = 0, y = 0;
        memcpy(&x, a + k * M, (size_t)M);
        memcpy(&y, b + k * M, (size_t)M);
        out[k] = __builtin_popcountll(x ^ y);
    }
}

void nm_block_flips_u8(const uint8_t *restrict a, const uint8_t *restrict b, int64_t M, int32_t *restrict out,
                       int64_t k0, int64_t k1) {
    switch (M) { /* a constant size per case: each memcpy becomes one load */
        case 2: nm_block_flips_words(a, b, 2, out, k0, k1); return;
        case 4: nm_block_flips_words(a, b, 4, out, k0, k1); return;
        case 8: nm_block_flips_words(a, b, 8, out, k0, k1); return;
        default:
            for (int64_t k = k0; k < k1; ++k) {
                int32_t c = 0;
                for (int64_t i = 0; i < M; ++i) c += a[k * M + i] != b[k * M + i];
                out[k] = c;
            }
    }
}

/*
 * LMA's proposal (bame.lma.propose) in one pass over blocks [g0, g1) of M consecutive weights: the score
 * of an entry is |G*W| where the old mask keeps it and (G*G)*lr where it does not (the same float
 * operations as bame.lma.scores), and the top-N scores of every block are kept. A pruned entry replaces a
 * kept one only with a strictly higher score (bame.lma.stable_keys): the key is the score's bits (scores
 * are >= 0; NaN ranks highest) shifted left with the kept flag as the lowest bit, so a kept entry wins a
 * tie; other ties go to the lower index, as in nm_topn_mask_f32. Writes the bool proposal.
 */
static inline __attribute__((always_inline)) int32_t nm_lma_key(float score, uint8_t kept) {
    score = score + 0.0f; /* -0.0 -> +0.0 */
    uint32_t b;
    memcpy(&b, &score, sizeof b);
    if (score != score) b = 0x7FFFFFFFu;
    return (int32_t)(((b << 1) | (uint32_t)(kept != 0)) ^ 0x80000000u); /* unsigned order as signed order */
}

void nm_lma_propose_f32(const float *restrict w, const float *restrict g, const uint8_t *restrict old,
                        float lr, int64_t M, int64_t n, uint8_t *restrict out, int64_t g0, int64_t g1) {
    int32_t key[TOPN_MAX_M][TOPN_TILE], def[TOPN_MAX_M][TOPN_TILE];
    for (int64_t c = g0; c < g1; c += TOPN_TILE) {
        const int64_t tile = g1 - c < TOPN_TILE ? g1 - c : TOPN_TILE;
        for (int64_t t = 0; t < tile; ++t)
            for (int64_t i = 0; i < M; ++i) {
                const int64_t q = (c + t) * M + i;
                const float gv = g[q];
                const float score = old[q] ? fabsf(gv * w[q]) : (gv * gv) * lr;
                key[i][t] = nm_lma_key(score, old[q]);
            }
        nm_topn_tile(key, def, M, tile);
        for (int64_t t = 0; t < tile; ++t)
            for (int64_t i = 0; i < M; ++i) out[(c + t) * M + i] = def[i][t] < n;
    }
}

/*
 * LMA's regrowth statistics (bame.lma.regrowth) over blocks [g0, g1) of M consecutive weights: per block, the
 * best score of an entry the old mask prunes, (G*G)*lr, and the weakest score of a kept one, |G*W| (the float
 * operations of bame.lma.scores), -inf / +inf where a block has none, NaN where a score is NaN (as torch's
 * amax / amin). One pass, nothing weight-sized written.
 */
static inline __attribute__((always_inline)) void nm_lma_regrowth_blocks(
        const float *restrict w, const float *restrict g, const uint8_t *restrict old, float lr, int64_t M,
        float *restrict best, float *restrict weakest, int64_t g0, int64_t g1) {
    for (int64_t k = g0; k < g1; ++k) {
        float b = -INFINITY, s = INFINITY;
        int nan_kept = 0, nan_pruned = 0;
        for (int64_t i = 0; i < M; ++i) {
            const int64_t q = k * M + i;
            const float gv = g[q];
            if (old[q]) {
                const float v = fabsf(gv * w[q]);
                nan_kept |= v != v;
                s = v < s ? v : s;
            } else {
                const float v = (gv * gv) * lr;
                nan_pruned |= v != v;
                b = v > b ? v : b;
            }
        }
        best[k] = nan_pruned ? NAN : b;
        weakest[k] = nan_kept ? NAN : s;
    }
}

void nm_lma_regrowth_f32(const float *restrict w, const float *restrict g, const uint8_t *restrict old, float lr,
                         int64_t M, float *restrict best, float *restrict weakest, int64_t g0, int64_t g1) {
    switch (M) { /* a constant block size per case: the inner loop unrolls */
        case 4: nm_lma_regrowth_blocks(w, g, old, lr, 4, best, weakest, g0, g1); return;
        case 8: nm_lma_regrowth_blocks(w, g, old, lr, 8, best, weakest, g0, g1); return;
        case 16: nm_lma_regrowth_blocks(w, g, old, lr, 16, best, weakest, g0, g1); return;
        default: nm_lma_regrowth_blocks(w, g, old, lr, M, best, weakest, g0, g1);
    }
}

/*
 * Compressed storage's update gradient (bame.compressed.CompressedNM.stash): per block of M consecutive
 * gradient entries, blocks [k0, k1), the P entries of largest |G| among those the block's N slots do not
 * hold (slots: uint8 (K, N) in-block positions), NaN ranking as +inf and ties going to the lower position;
 * their positions and gradients, in that order. P <= M - N, M <= 64.
 */
void nm_top_pruned_f32(const float *restrict g, const uint8_t *restrict slots, int64_t M, int64_t N, int64_t P,
                       uint8_t *restrict out_idx, float *restrict out_val, int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
        uint64_t held = 0;
        for (int64_t j = 0; j < N; ++j) held |= 1ull << slots[k * N + j];
        if (P == 1) { /* 1:M: the one largest, by a running maximum */
            float best = -1.0f;
            int64_t at = 0;
            for (int64_t i = 0; i < M; ++i) {
                float a = fabsf(g[k * M + i]);
                if (a != a) a = INFINITY;
                const int take = !((held >> i) & 1ull) && a > best;
                best = take ? a : best;
                at = take ? i : at;
            }
            out_idx[k] = (uint8_t)at;
            out_val[k] = g[k * M + at];
            continue;
        }
        float top[64];
        uint8_t pos[64];
        int64_t count = 0;
        for (int64_t i = 0; i < M; ++i) {
            if ((held >> i) & 1ull) continue;
            float a = fabsf(g[k * M + i]);
            if (a != a) a = INFINITY;
            int64_t at = count < P ? count : P; /* insertion point: after every entry at least as large */
            while (at > 0 && a > top[at - 1]) --at;
            if (at >= P) continue;
            for (int64_t j = (count < P ? count : P - 1); j > at; --j) {
                top[j] = top[j - 1];
                pos[j] = pos[j - 1];
            }
            top[at] = a;
            pos[at] = (uint8_t)i;
            if (count < P) ++count;
        }
        for (int64_t j = 0; j < P; ++j) {
            out_idx[k * P + j] = pos[j];
            out_val[k * P + j] = g[k * M + pos[j]];
        }
    }
}

/*
 * The k-th smallest (0-based) of v[0..K) (OBF's rank thresholds, bame.obf.above_kth_largest): a radix
 * select on the order-preserving keys of nm_score_key, its cost independent of the values and of ties. A
 * 65536-bin histogram of the keys' upper halves finds the bin of the k-th smallest; a second pass histograms
 * the lower halves of that bin's keys. -0.0 and +0.0 are one key (returned as +0.0); callers keep NaN out.
 * Returns NaN if the histogram could not be allocated (the caller then uses another method).
 */
float nm_kth_smallest_f32(const float *restrict v, int64_t K, int64_t k) {
    int64_t *hist = calloc(65536, sizeof *hist);
    if (!hist) return NAN;
    for (int64_t i = 0; i < K; ++i) hist[((uint32_t)nm_score_key(v[i], 0) ^ 0x80000000u) >> 16]++;
    uint32_t hi = 0;
    while (hi < 65535u && k >= hist[hi]) k -= hist[hi++];
    memset(hist, 0, 65536 * sizeof *hist);
    for (int64_t i = 0; i < K; ++i) {
        uint32_t u = (uint32_t)nm_score_key(v[i], 0) ^ 0x80000000u;
        if ((u >> 16) == hi) hist[u & 65535u]++;
    }
    uint32_t lo = 0;
    while (lo < 65535u && k >= hist[lo]) k -= hist[lo++];
    free(hist);
    int32_t key = (int32_t)(((hi << 16) | lo) ^ 0x80000000u);
    int32_t bits = key ^ ((key >> 31) & INT32_MAX); /* the key map is its own inverse */
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

/*
 * SR-STE's sparse-refined term (bame.methods.sr_ste.add_sr_ste_decay) over entries [q0, q1):
 *     grad[q] = grad[q] + (lam * w[q]) * (1 - mask[q])
 * the operations of torch's grad.addcmul_(w, 1 - B, value=lam) in the same order; the product with 0 or 1
 * is exact, so a fused multiply-add gives the same result.
 */
void nm_srste_decay_f32(float *restrict grad, const float *restrict w, const uint8_t *restrict mask, float lam,
                        int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) grad[q] = grad[q] + (lam * w[q]) * (1.0f - (float)mask[q]);
}

/*
 * Bags over a tiled table, blocked by table rows (``chunks``): the same sums as nm_bag_f32, but every row's
 * bag is split into chunks whose table rows lie in one range, and all rows [r0, r1) take one chunk before
 * any takes the next. One chunk of a tile's table (a few dozen rows of tw floats) then stays in L1 while
 * every row's slots in it are summed; the running sums wait in ``scratch`` (bags x tw floats, in L2).
 *     chunk k of row r: p in [cptr[r * (nch + 1) + k], cptr[r * (nch + 1) + k + 1])
 * The forward of a compressed Linear layer (chunks of whole N:M blocks: every row has the same slot count
 * in a chunk) and its input gradient (the transposed structure, chunked by output rows) both use it.
 * The order of the sums depends on the chunking, not on the thread split.
 */
#define BAGC_TILE(W)                                                                     \
    do {                                                                                 \
        vec acc[(W) / VW], acc2[(W) / VW];                                               \
        for (int v = 0; v < (W) / VW; ++v) {                                             \
            acc[v] = first ? VZERO() : VLOAD(sc + v * VW);                               \
            acc2[v] = VZERO();                                                           \
        }                                                                                \
        BAG_SLOTS(W);                                                                    \
        for (int v = 0; v < (W) / VW; ++v) acc[v] = VADD(acc[v], acc2[v]);               \
        if (last) {                                                                      \
            float buf[W];                                                                \
            for (int v = 0; v < (W) / VW; ++v) VSTORE(buf + v * VW, acc[v]);             \
            for (int64_t j = 0; j < width; ++j) dst[j * ldt] = buf[j];                   \
        } else {                                                                         \
            for (int v = 0; v < (W) / VW; ++v) VSTORE(sc + v * VW, acc[v]);              \
        }                                                                                \
    } while (0)

void nm_bag_chunked_f32(const float *restrict table, int64_t rows, int64_t T, int64_t tw,
                        const int64_t *restrict idx, const int64_t *restrict cptr, int64_t nch,
                        const float *restrict w, const int64_t *restrict wperm, float *restrict out, int64_t ldr,
                        int64_t ldt, float *restrict scratch, int64_t r0, int64_t r1) {
    const int64_t n_tiles = (T + tw - 1) / tw;
    for (int64_t c = 0; c < n_tiles; ++c) {
        const float *restrict tab = table + c * rows * tw;
        const int64_t width = (T - c * tw < tw) ? T - c * tw : tw;
        for (int64_t k = 0; k < nch; ++k) {
            const int first = (k == 0), last = (k == nch - 1);
            for (int64_t r = r0; r < r1; ++r) {
                const int64_t p0 = cptr[r * (nch + 1) + k], p1 = cptr[r * (nch + 1) + k + 1];
                float *restrict sc = scratch + r * tw;
                float *restrict dst = out + r * ldr + c * tw * ldt;
                if (p0 == p1 && !first && !last) continue; /* nothing of this row in the chunk */
                if (tw == 64) {
                    BAGC_TILE(64);
                } else if (tw == 32) {
                    BAGC_TILE(32);
                } else if (tw == 16) {
                    BAGC_TILE(16);
                } else { /* small or odd tiles: scalar, runtime width */
                    float acc[MAX_TW];
                    for (int64_t j = 0; j < tw; ++j) acc[j] = first ? 0.0f : sc[j];
                    for (int64_t p = p0; p < p1; ++p) {
                        const float wp = w[wperm ? wperm[p] : p];
                        const float *restrict row = tab + idx[p] * tw;
                        for (int64_t j = 0; j < tw; ++j) acc[j] += wp * row[j];
                    }
                    if (last) {
                        for (int64_t j = 0; j < width; ++j) dst[j * ldt] = acc[j];
                    } else {
                        for (int64_t j = 0; j < tw; ++j) sc[j] = acc[j];
                    }
                }
            }
        }
    }
}

/*
 * Row-major Linear products (the "direct" formulations of bame/kernels/linear.py): x (T, in), dY (T, out)
 * and the results (T, out), (T, in) keep PyTorch's row-major layout. The kernels transpose 16 x 16 blocks
 * in registers on the way in and out, so no transposed copy of an activation is ever written to memory,
 * and every store is a whole 64-byte row segment (a bag kernel writing the (T, out) layout column by column
 * touches a cache line per float).
 *
 * The weight is in the row-major slot order of an N:M packing: K = in * N / M slots per row, slot p of row
 * r at p = r * K + k, its column cols[p] and value w[p]; every row has the same K, so 16 rows advance in
 * lockstep (one "group"): 16 independent FMA chains, one vector of 16 tokens each.
 *
 * Tokens go in tiles of RT = 16 (the forward and the input gradient: every result is computed by one tile
 * in a fixed order of slots) or chunks of ch tokens (the weight gradient: one partial sum per chunk, added
 * in chunk order by nm_sum_rows_f32). The threads of a call take runs of RUN tiles, or chunks, from one
 * shared counter (*next, starting at 0); nothing depends on which thread computes what. nm_rows_*_f32 is
 * one thread's share (Python threads call it together); nm_rows_*_par_f32 runs the call on the threads of
 * an OpenMP team (GOMP_parallel, torch's team: its idle workers spin after every torch op, and threads of
 * ours would compete with them for the cores). The kernels return 0, or -1 when scratch memory could not
 * be allocated.
 */
#define RT 16
#define RUN 4 /* tiles per claim of the forward and the input gradient (64 tokens) */

typedef void (*rows_gomp_fn)(void (*)(void *), void *, unsigned, unsigned);

/* One call of a row-major kernel, shared by its threads. */
typedef struct {
    const float *a, *b;          /* x or dY (fwd, dx); dY and x (dw) */
    int64_t T, R, in, K, ch;     /* tokens, rows, input features, slots per row, tokens per dw chunk */
    const int32_t *lo, *yo;      /* lockstep offsets (fwd, dx); x and dY table offsets of every slot (dw) */
    const float *lw;             /* lockstep values (fwd, dx) */
    const uint8_t *keep;         /* dw: slots that get a gradient (NULL: all) */
    float *out;
    int64_t *next;               /* the shared counter of runs or chunks */
    int64_t status;              /* -1 once a thread could not allocate its scratch */
} rows_job;

static inline int64_t rows_claim(int64_t *next) { return __atomic_fetch_add(next, 1, __ATOMIC_RELAXED); }

/* A zero-filled, cache-line aligned scratch of n floats (NULL on failure). */
static float *rows_scratch(int64_t n) {
    float *s = aligned_alloc(64, (size_t)((n * (int64_t)sizeof(float) + 63) / 64 * 64 + 64));
    if (s) memset(s, 0, (size_t)n * sizeof(float));
    return s;
}

#if defined(__AVX512F__)
/* r[i] (row i of a 16 x 16 block) becomes column i, in registers: 64 shuffles. */
static inline __attribute__((always_inline)) void rows_tr16(__m512 *r) {
    __m512 t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) { /* r[4i + j], 128-bit lane L: rows 4i..4i+3 of column 4L + j */
        const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
        const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int j = 0; j < 4; ++j) {
        const __m512 u0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x44), u1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xEE);
        const __m512 u2 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x44);
        const __m512 u3 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xEE);
        t[j] = _mm512_shuffle_f32x4(u0, u2, 0x88);
        t[4 + j] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
        t[8 + j] = _mm512_shuffle_f32x4(u1, u3, 0x88);
        t[12 + j] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
}

/* The sums of a[0..15] as one vector (lane j = the sum of a[j]'s lanes), in a fixed order: 30 shuffles. */
static inline __attribute__((always_inline)) __m512 rows_sum16(const __m512 *a) {
    __m512 b[8], c[4];
    for (int i = 0; i < 8; ++i)
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {
        const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
        c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    const __m512 e01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44), _mm512_shuffle_f32x4(c[0], c[1], 0xEE));
    const __m512 e23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44), _mm512_shuffle_f32x4(c[2], c[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(e01, e23, 0x88), _mm512_shuffle_f32x4(e01, e23, 0xDD));
}

static inline __mmask16 rows_mask(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }
#endif

/* Rows [0, nr) of a row-major matrix (lda floats per row, columns [0, nc)) towards the cache: the next tile's
 * input, requested while this tile computes (16 rows at a time are read column block by column block, an
 * order the hardware prefetchers do not follow). */
static inline void rows_prefetch(const float *a, int64_t lda, int64_t nr, int64_t nc) {
    for (int64_t j = 0; j < nr; ++j)
        for (int64_t c = 0; c < nc; c += 16) __builtin_prefetch(a + j * lda + c, 0, 3);
}

/* Rows [0, nr) (nr <= 16) of a row-major matrix (lda floats per row), columns [0, nc), transposed:
 * tab[c * ldt + j] = a[j * lda + c], zero for rows j >= nr. */
static void rows_load_t(const float *restrict a, int64_t lda, int64_t nr, int64_t nc, float *restrict tab,
                        int64_t ldt) {
#if defined(__AVX512F__)
    for (int64_t c0 = 0; c0 < nc; c0 += 16) {
        const int64_t w = nc - c0 < 16 ? nc - c0 : 16;
        const __mmask16 m = rows_mask(w);
        __m512 r[16];
        for (int j = 0; j < 16; ++j) r[j] = j < nr ? _mm512_maskz_loadu_ps(m, a + j * lda + c0) : _mm512_setzero_ps();
        rows_tr16(r);
        for (int64_t c = 0; c < w; ++c) _mm512_storeu_ps(tab + (c0 + c) * ldt, r[c]);
    }
#else
    for (int64_t c = 0; c < nc; ++c)
        for (int64_t j = 0; j < RT; ++j) tab[c * ldt + j] = j < nr ? a[j * lda + c] : 0.0f;
#endif
}

/* The inverse: y[j * ldy + c] = tab[c * ldt + j] for tokens j < nt, columns c < nc. */
static void rows_store_t(const float *restrict tab, int64_t ldt, int64_t nc, float *restrict y, int64_t ldy,
                         int64_t nt) {
#if defined(__AVX512F__)
    for (int64_t c0 = 0; c0 < nc; c0 += 16) {
        const int64_t w = nc - c0 < 16 ? nc - c0 : 16;
        const __mmask16 m = rows_mask(w);
        __m512 r[16];
        for (int c = 0; c < 16; ++c) r[c] = c < w ? _mm512_loadu_ps(tab + (c0 + c) * ldt) : _mm512_setzero_ps();
        rows_tr16(r);
        for (int64_t j = 0; j < nt; ++j) _mm512_mask_storeu_ps(y + j * ldy + c0, m, r[j]);
    }
#else
    for (int64_t j = 0; j < nt; ++j)
        for (int64_t c = 0; c < nc; ++c) y[j * ldy + c] = tab[c * ldt + j];
#endif
}

/* The lockstep layout of the slots of rows [0, R): lane i of group g at slot k is entry (g * K + k) * 16 + i,
 * the slot of row 16 g + i (lanes past the last row repeat it; their results are never used):
 * lo = its column times RT (the offset of its table row), lw = its value. -1 on failure. */
static int rows_lanes(rows_job *j, const int64_t *restrict cols, const float *restrict w) {
    const int64_t R = j->R, K = j->K, G = (R + RT - 1) / RT, n = G * K * RT > 0 ? G * K * RT : 1;
    int32_t *lo = malloc((size_t)n * sizeof *lo);
    float *lw = malloc((size_t)n * sizeof *lw);
    if (!lo || !lw) {
        free(lo), free(lw);
        return -1;
    }
    for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < RT; ++i) {
            const int64_t r = g * RT + i < R ? g * RT + i : R - 1;
            for (int64_t k = 0; k < K; ++k) {
                lo[(g * K + k) * RT + i] = (int32_t)(cols[r * K + k] * RT);
                lw[(g * K + k) * RT + i] = w[r * K + k];
            }
        }
    j->lo = lo, j->lw = lw;
    return 0;
}

/* The table offsets of every slot of the weight gradient (past nnz: the last slot's): x's (column * ch) and
 * dY's (row * ch). */
static int rows_dw_offsets(rows_job *j, const int64_t *restrict cols) {
    const int64_t nnz = j->R * j->K;
    int32_t *xo = malloc((size_t)(nnz + RT) * sizeof *xo), *yo = malloc((size_t)(nnz + RT) * sizeof *yo);
    if (!xo || !yo) {
        free(xo), free(yo);
        return -1;
    }
    for (int64_t p = 0; p < nnz + RT; ++p) {
        const int64_t q = p < nnz ? p : (nnz > 0 ? nnz - 1 : 0);
        xo[p] = nnz > 0 ? (int32_t)(cols[q] * j->ch) : 0;
        yo[p] = nnz > 0 ? (int32_t)(q / j->K * j->ch) : 0;
    }
    j->lo = xo, j->yo = yo;
    return 0;
}

static void rows_fail(rows_job *j) { __atomic_store_n(&j->status, -1, __ATOMIC_RELAXED); }

/*
 * The forward: y[t, r] = sum_{k < K} w[r * K + k] * x[t, cols[r * K + k]] (x: (T, in), y: (T, R), both
 * contiguous). A tile's 16 tokens of x are transposed into a table (in, 16) that stays in L1; each group
 * of 16 rows sums its slots' table rows (16 accumulators, one per row), transposes them and stores 16 row
 * segments y[t, 16 g : 16 g + 16].
 */
static void rows_fwd_job(void *p) {
    rows_job *j = p;
    const int64_t T = j->T, in = j->in, R = j->R, K = j->K, G = (R + RT - 1) / RT, tiles = (T + RT - 1) / RT;
    float *tab = rows_scratch(in * RT);
    if (!tab) {
        rows_fail(j);
        return;
    }
    for (int64_t run; (run = rows_claim(j->next)) * RUN < tiles;)
        for (int64_t c = run * RUN; c < (run + 1) * RUN && c < tiles; ++c) {
            const int64_t t = c * RT, nt = T - t < RT ? T - t : RT;
            rows_load_t(j->a + t * in, in, nt, in, tab, RT);
            if (t + RT < T) rows_prefetch(j->a + (t + RT) * in, in, T - t - RT < RT ? T - t - RT : RT, in);
            for (int64_t g = 0; g < G; ++g) {
                const int32_t *restrict o = j->lo + g * K * RT;
                const float *restrict wv = j->lw + g * K * RT;
                const int64_t nr = R - g * RT < RT ? R - g * RT : RT;
                float *restrict dst = j->out + t * R + g * RT;
#if defined(__AVX512F__)
                __m512 acc[RT];
                for (int i = 0; i < RT; ++i) acc[i] = _mm512_setzero_ps();
                for (int64_t k = 0; k < K; ++k, o += RT, wv += RT)
                    for (int i = 0; i < RT; ++i)
                        acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(wv[i]), _mm512_load_ps(tab + o[i]), acc[i]);
                rows_tr16(acc);
                const __mmask16 m = rows_mask(nr);
                for (int64_t i = 0; i < nt; ++i) _mm512_mask_storeu_ps(dst + i * R, m, acc[i]);
#else
                vec acc[RT][RT / VW];
                float buf[RT][RT];
                for (int i = 0; i < RT; ++i)
                    for (int v = 0; v < RT / VW; ++v) acc[i][v] = VZERO();
                for (int64_t k = 0; k < K; ++k, o += RT, wv += RT)
                    for (int i = 0; i < RT; ++i) {
                        const vec wi = VSET1(wv[i]);
                        for (int v = 0; v < RT / VW; ++v) acc[i][v] = VFMA(wi, VLOAD(tab + o[i] + v * VW), acc[i][v]);
                    }
                for (int i = 0; i < RT; ++i)
                    for (int v = 0; v < RT / VW; ++v) VSTORE(buf[i] + v * VW, acc[i][v]);
                rows_store_t(&buf[0][0], RT, nr, dst, R, nt);
#endif
            }
        }
    free(tab);
}

/*
 * The input gradient: dx[t, c] = sum_{(r, k): cols[r * K + k] = c} w[r * K + k] * dy[t, r] (dy: (T, R),
 * dx: (T, in), contiguous), as a scatter: a tile's 16 x 16 blocks of dY are transposed into registers (row
 * r's 16 tokens), and every slot adds w * dY^T[r] to its column's row of a (in, 16) table in L1, which is
 * transposed into dx at the tile's end. Each column sums its terms in the order of (group, lane, slot):
 * fixed by the structure.
 */
static void rows_dx_job(void *p) {
    rows_job *j = p;
    const int64_t T = j->T, in = j->in, R = j->R, K = j->K, G = (R + RT - 1) / RT, tiles = (T + RT - 1) / RT;
    float *tab = rows_scratch(in * RT);
    if (!tab) {
        rows_fail(j);
        return;
    }
    for (int64_t run; (run = rows_claim(j->next)) * RUN < tiles;)
        for (int64_t c = run * RUN; c < (run + 1) * RUN && c < tiles; ++c) {
            const int64_t t = c * RT, nt = T - t < RT ? T - t : RT;
            const float *restrict dy = j->a + t * R;
            memset(tab, 0, (size_t)(in * RT) * sizeof(float));
            if (t + RT < T) rows_prefetch(dy + RT * R, R, T - t - RT < RT ? T - t - RT : RT, R);
            for (int64_t g = 0; g < G; ++g) {
                const int32_t *restrict o = j->lo + g * K * RT;
                const float *restrict wv = j->lw + g * K * RT;
                const int64_t nr = R - g * RT < RT ? R - g * RT : RT;
#if defined(__AVX512F__)
                __m512 d[RT];
                const __mmask16 m = rows_mask(nr);
                for (int i = 0; i < RT; ++i)
                    d[i] = i < nt ? _mm512_maskz_loadu_ps(m, dy + i * R + g * RT) : _mm512_setzero_ps();
                rows_tr16(d);
                for (int i = 0; i < nr; ++i) /* a row's slots lie in distinct blocks: no chain through memory */
                    for (int64_t k = 0; k < K; ++k) {
                        float *restrict row = tab + o[k * RT + i];
                        _mm512_store_ps(row, _mm512_fmadd_ps(_mm512_set1_ps(wv[k * RT + i]), d[i], _mm512_load_ps(row)));
                    }
#else
                float buf[RT][RT];
                rows_load_t(dy + g * RT, R, nt, nr, &buf[0][0], RT);
                for (int i = 0; i < nr; ++i)
                    for (int64_t k = 0; k < K; ++k) {
                        const vec wi = VSET1(wv[k * RT + i]);
                        float *restrict row = tab + o[k * RT + i];
                        for (int v = 0; v < RT / VW; ++v)
                            VSTORE(row + v * VW, VFMA(wi, VLOAD(buf[i] + v * VW), VLOAD(row + v * VW)));
                    }
#endif
            }
            rows_store_t(tab, RT, in, j->out + t * in, in, nt);
        }
    free(tab);
}

/*
 * The weight gradient at the slots, per chunk of ch tokens (a multiple of 16):
 *     part[c, p] = sum_{t in chunk c} dy[t, p / K] * x[t, cols[p]]      (0 where keep[p] == 0)
 * (nnz = R * K slots; dy: (T, R), x: (T, in), contiguous). A chunk's x and dY are transposed into tables
 * (in, ch) and (R, ch) that stay in L2; slots go in blocks of 16, one vector accumulator each over the
 * chunk's tokens, reduced in a fixed order (rows_sum16) into one vector store.
 */
static void rows_dw_job(void *p) {
    rows_job *j = p;
    const int64_t T = j->T, in = j->in, R = j->R, ch = j->ch, nnz = R * j->K, chunks = (T + ch - 1) / ch;
    const float *restrict dy = j->a, *restrict x = j->b;
    float *xt = rows_scratch(in * ch), *dt = rows_scratch(R * ch);
    if (!xt || !dt) {
        free(xt), free(dt);
        rows_fail(j);
        return;
    }
    for (int64_t c; (c = rows_claim(j->next)) < chunks;) {
        const int64_t t = c * ch, nt = T - t < ch ? T - t : ch, nv = (nt + RT - 1) / RT;
        for (int64_t s = 0; s < nv; ++s) {
            const int64_t ns = nt - s * RT < RT ? nt - s * RT : RT, next = t + (s + 1) * RT;
            if (s + 1 < nv) {
                rows_prefetch(x + next * in, in, T - next < RT ? T - next : RT, in);
                rows_prefetch(dy + next * R, R, T - next < RT ? T - next : RT, R);
            }
            rows_load_t(x + (t + s * RT) * in, in, ns, in, xt + s * RT, ch);
            rows_load_t(dy + (t + s * RT) * R, R, ns, R, dt + s * RT, ch);
        }
        float *restrict out = j->out + c * nnz;
        for (int64_t p0 = 0; p0 < nnz; p0 += RT) {
            const int32_t *restrict a = j->lo + p0, *restrict b = j->yo + p0;
            const int64_t nb = nnz - p0 < RT ? nnz - p0 : RT;
#if defined(__AVX512F__)
            __m512 acc[RT];
            for (int i = 0; i < RT; ++i) acc[i] = _mm512_setzero_ps();
            for (int64_t v = 0; v < nv * RT; v += RT)
                for (int i = 0; i < RT; ++i)
                    acc[i] = _mm512_fmadd_ps(_mm512_load_ps(dt + b[i] + v), _mm512_load_ps(xt + a[i] + v), acc[i]);
            _mm512_mask_storeu_ps(out + p0, rows_mask(nb), rows_sum16(acc));
#else
            for (int i = 0; i < nb; ++i) {
                vec acc = VZERO();
                for (int64_t v = 0; v < nv * RT; v += VW) acc = VFMA(VLOAD(dt + b[i] + v), VLOAD(xt + a[i] + v), acc);
                out[p0 + i] = VHSUM(acc);
            }
#endif
            if (j->keep)
                for (int64_t i = 0; i < nb; ++i)
                    if (!j->keep[p0 + i]) out[p0 + i] = 0.0f;
        }
    }
    free(xt), free(dt);
}

/* One call: the shared layout built once, then run by this thread alone (next != NULL: the counter shared
 * with the other Python threads of the call, each building its own layout) or by an OpenMP team. */
static int64_t rows_call(void (*job)(void *), rows_job *j, const int64_t *cols, const float *w, void *gomp,
                         int64_t threads) {
    int64_t counter = 0;
    if (!j->next) j->next = &counter;
    if (w ? rows_lanes(j, cols, w) : rows_dw_offsets(j, cols)) return -1;
    if (gomp)
        ((rows_gomp_fn)gomp)(job, j, (unsigned)threads, 0);
    else
        job(j);
    free((void *)j->lo), free((void *)j->yo), free((void *)j->lw);
    return j->status;
}

/* y (T, R) = x (T, in) W^T for the slots (cols, w) of K per row: see rows_fwd_job. */
int64_t nm_rows_fwd_f32(const float *x, int64_t T, int64_t in, const int64_t *cols, const float *w, int64_t R,
                        int64_t K, float *y, int64_t *next) {
    rows_job j = {x, NULL, T, R, in, K, 0, NULL, NULL, NULL, NULL, y, next, 0};
    return rows_call(rows_fwd_job, &j, cols, w, NULL, 1);
}

int64_t nm_rows_fwd_par_f32(void *gomp, int64_t threads, const float *x, int64_t T, int64_t in,
                            const int64_t *cols, const float *w, int64_t R, int64_t K, float *y) {
    rows_job j = {x, NULL, T, R, in, K, 0, NULL, NULL, NULL, NULL, y, NULL, 0};
    return rows_call(rows_fwd_job, &j, cols, w, gomp, threads);
}

/* dx (T, in) = dy (T, R) W for the slots (cols, w) of K per row: see rows_dx_job. */
int64_t nm_rows_dx_f32(const float *dy, int64_t T, int64_t R, const int64_t *cols, const float *w, int64_t in,
                       int64_t K, float *dx, int64_t *next) {
    rows_job j = {dy, NULL, T, R, in, K, 0, NULL, NULL, NULL, NULL, dx, next, 0};
    return rows_call(rows_dx_job, &j, cols, w, NULL, 1);
}

int64_t nm_rows_dx_par_f32(void *gomp, int64_t threads, const float *dy, int64_t T, int64_t R,
                           const int64_t *cols, const float *w, int64_t in, int64_t K, float *dx) {
    rows_job j = {dy, NULL, T, R, in, K, 0, NULL, NULL, NULL, NULL, dx, NULL, 0};
    return rows_call(rows_dx_job, &j, cols, w, gomp, threads);
}

/* part (ceil(T / ch), R * K): the weight gradient's partial sums per chunk of ch tokens: see rows_dw_job. */
int64_t nm_rows_dw_f32(const float *dy, const float *x, int64_t T, int64_t R, int64_t in, const int64_t *cols,
                       int64_t K, const uint8_t *keep, int64_t ch, float *part, int64_t *next) {
    rows_job j = {dy, x, T, R, in, K, ch, NULL, NULL, NULL, keep, part, next, 0};
    return rows_call(rows_dw_job, &j, cols, NULL, NULL, 1);
}

int64_t nm_rows_dw_par_f32(void *gomp, int64_t threads, const float *dy, const float *x, int64_t T, int64_t R,
                           int64_t in, const int64_t *cols, int64_t K, const uint8_t *keep, int64_t ch, float *part) {
    rows_job j = {dy, x, T, R, in, K, ch, NULL, NULL, NULL, keep, part, NULL, 0};
    return rows_call(rows_dw_job, &j, cols, NULL, gomp, threads);
}

/*
 * Stride-1 convolutions of N:M weights on NCHW data (bame/kernels/conv.py): the forward, the input gradient
 * (the same bags over dY with the transposed terms) and the weight gradient at the kept slots.
 *
 * A convolution is a sum over kernel taps of shifted 1x1 products. A chunk of nb images is copied, channel
 * by channel, into one tall zero-padded plane ("stacked planes", thread-local scratch that stays in L2):
 * image j's input row h at row top + j * sh + h, its column w at column left + w, rows wp floats wide.
 * Image j's output row ho is grid row j * sh + ho, and every kept weight is a term (plane, shift) of its
 * output row:
 *     y[j, r, ho, wo] = sum_{q in [ptr[r], ptr[r+1])} w[q] * S[row[q]][(j * sh + ho) * wp + wo + shift[q]]
 * The zero columns between rows and the zero rows between images are the padding, shared by neighbours
 * (wp - W >= pad, sh - H >= pad), so one flat shift per term is right at every valid output position; the
 * grid positions in between (columns >= Wo, rows >= Ho of an image) are computed and not stored. Small
 * planes waste little (an 8x8 image is 81 grid positions for 64 outputs) and a tile of positions may span
 * several images. Any kernel size, dilation and padding (negative too) is one layout (conv.py: stacking).
 *
 * Positions go in tiles of CONV_TW (CONV_TV vector accumulators: eight independent FMA chains hide the FMA
 * latency); tiles are the outer loop, so the window of every plane a tile reads (C x (tile + shift) floats)
 * stays in L1 while every output row is summed over it. Results are written in 16-position groups: the
 * valid lanes of a group that belong to one image are consecutive outputs (AVX-512: compress + masked
 * store), described by a store plan built once per call.
 *
 * geo (int64[13]): B, C, H, W (input planes), Ho, Wo (output planes), top, left, sh, wp (the stacking), nb
 * (images per chunk), maxshift (the largest shift), per_part (images per partial sum of the weight
 * gradient, a multiple of nb). Work goes in chunks of nb images (per_part for the weight gradient), which
 * the threads of a call take one at a time from a shared counter (*next, starting at 0); every output is
 * computed by one chunk in a fixed order, so results never depend on which thread took which chunk. The kernels
 * return 0, or -1 when scratch memory could not be allocated. The *_par entry points run a kernel on an
 * OpenMP team (GOMP_parallel, passed in: torch's own runtime, whose idle workers would otherwise spin
 * against threads of ours), so the library itself needs no OpenMP.
 */
#ifndef CONV_TV
#if defined(__AVX512F__) || VW == 8
#define CONV_TV 8
#else
#define CONV_TV 16
#endif
#endif
#define CONV_TW (CONV_TV * VW) /* positions per tile: 128 (AVX-512), 64 (AVX2) or 16 (plain C) */
#define CONV_GROUP 16          /* positions per store group (one 16-bit mask) */

typedef struct {
    int64_t B, C, H, W, Ho, Wo, top, left, sh, wp, nb, maxshift, per_part;
    int64_t positions; /* grid positions of a chunk: ((nb - 1) * sh + Ho) * wp */
    int64_t tiles;     /* tiles of CONV_TW covering them */
    int64_t ld;        /* floats between stacked planes */
} conv_layout;

/* Floats of a stacked plane or grid of n floats, rounded to an odd number of cache lines (planes at a
 * multiple of 4 KiB apart would share L1 sets). */
static int64_t conv_ld(int64_t n) {
    int64_t lines = (n + 15) / 16;
    return (lines | 1) * 16;
}

static void conv_layout_init(conv_layout *L, const int64_t *geo) {
    L->B = geo[0], L->C = geo[1], L->H = geo[2], L->W = geo[3], L->Ho = geo[4], L->Wo = geo[5];
    L->top = geo[6], L->left = geo[7], L->sh = geo[8], L->wp = geo[9], L->nb = geo[10], L->maxshift = geo[11];
    L->per_part = geo[12];
    L->positions = ((L->nb - 1) * L->sh + L->Ho) * L->wp;
    L->tiles = (L->positions + CONV_TW - 1) / CONV_TW;
    const int64_t data = (L->top + (L->nb - 1) * L->sh + L->H) * L->wp, reads = L->tiles * CONV_TW + L->maxshift;
    L->ld = conv_ld(data > reads ? data : reads);
}

/*
 * Where a chunk's outputs go: every 16-position group of the grid has k runs of consecutive outputs (one
 * image, one output row), run i stored as the group's lanes mask[g * k + i], lane l at out + off[g * k + i]
 * + l (a masked store at a shifted address: the lanes keep their places). Groups with fewer runs are
 * padded with empty masks, so the store is the same k masked stores for every group (no branches).
 */
typedef struct {
    int64_t k, *off;
    uint16_t *mask;
} conv_plan;

/* The plan of a chunk of nimg images (positions of images >= nimg are not stored); -1 on failure. */
static int conv_plan_init(conv_plan *P, const conv_layout *L, int64_t nimg, int64_t ostride) {
    const int64_t groups = L->tiles * (CONV_TW / CONV_GROUP);
    P->k = 1;
    for (int pass = 0; pass < 2; ++pass) {
        if (pass == 1) {
            P->off = calloc((size_t)(groups * P->k), sizeof *P->off);
            P->mask = calloc((size_t)(groups * P->k), sizeof *P->mask);
            if (!P->off || !P->mask) {
                free(P->off), free(P->mask);
                return -1;
            }
        }
        for (int64_t g = 0; g < groups; ++g) {
            int64_t runs = 0, prev = -2;
            for (int64_t lane = 0; lane < CONV_GROUP; ++lane) {
                const int64_t p = g * CONV_GROUP + lane;
                if (p >= L->positions) break;
                const int64_t grow = p / L->wp, col = p % L->wp, j = grow / L->sh, ho = grow % L->sh;
                if (ho >= L->Ho || col >= L->Wo || j >= nimg) continue;
                if (p != prev + 1 || col == 0) { /* a new run */
                    if (pass == 1) P->off[g * P->k + runs] = j * ostride + ho * L->Wo + col - lane;
                    ++runs;
                }
                prev = p;
                if (pass == 1) P->mask[g * P->k + runs - 1] |= (uint16_t)(1u << lane);
            }
            if (pass == 0 && runs > P->k) P->k = runs;
        }
    }
    return 0;
}

static void conv_plan_free(conv_plan *P) { free(P->off), free(P->mask); }

/* A zeroed, cache-line aligned scratch of n floats (NULL on failure). */
static float *conv_scratch(int64_t n) {
    float *s = aligned_alloc(64, (size_t)((n * (int64_t)sizeof(float) + 63) / 64 * 64));
    if (s) memset(s, 0, (size_t)n * sizeof(float));
    return s;
}

/* n floats from s to d (or zeros when s is NULL). Rows are short (8 to 32 floats): inline masked vector
 * copies (a plain loop would become a memcpy call, costlier than the copy). */
static inline __attribute__((always_inline)) void conv_row(float *restrict d, const float *restrict s, int64_t n) {
#if defined(__AVX512F__)
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = (n - i >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(d + i, m, s ? _mm512_maskz_loadu_ps(m, s + i) : _mm512_setzero_ps());
    }
#else
    if (s)
        memcpy(d, s, (size_t)n * sizeof(float));
    else
        memset(d, 0, (size_t)n * sizeof(float));
#endif
}

/* Images [0, nimg) of src (planes of H x W, nch per image) into the stacked planes (the zeros around the
 * data were written once when the scratch was made); images in [nimg, nb) become zeros. */
static void conv_stack(const float *restrict src, int64_t nch, int64_t nimg, const conv_layout *L,
                       float *restrict dst) {
    for (int64_t c = 0; c < nch; ++c)
        for (int64_t j = 0; j < L->nb; ++j) {
            const float *restrict s = src + (j * nch + c) * L->H * L->W;
            float *restrict d = dst + c * L->ld + (L->top + j * L->sh) * L->wp + L->left;
            for (int64_t h = 0; h < L->H; ++h) conv_row(d + h * L->wp, j < nimg ? s + h * L->W : NULL, L->W);
        }
}

/* Output planes (nch per image, Ho x Wo) of images [0, nimg) onto the output grid (ld floats per plane,
 * zeros elsewhere, written once); images in [nimg, nb) become zeros. */
static void conv_grid(const float *restrict src, int64_t nch, int64_t nimg, const conv_layout *L, int64_t ld,
                      float *restrict dst) {
    for (int64_t c = 0; c < nch; ++c)
        for (int64_t j = 0; j < L->nb; ++j) {
            const float *restrict s = src + (j * nch + c) * L->Ho * L->Wo;
            float *restrict d = dst + c * ld + j * L->sh * L->wp;
            for (int64_t h = 0; h < L->Ho; ++h) conv_row(d + h * L->wp, j < nimg ? s + h * L->Wo : NULL, L->Wo);
        }
}

/* Tile t's accumulators into output plane O by the plan. */
static inline __attribute__((always_inline)) void conv_store(const vec *acc, const conv_plan *P, int64_t t,
                                                             float *restrict O) {
#if defined(__AVX512F__)
    for (int v = 0; v < CONV_TV; ++v) {
        const int64_t *off = P->off + (t * CONV_TV + v) * P->k;
        const uint16_t *mask = P->mask + (t * CONV_TV + v) * P->k;
        for (int64_t i = 0; i < P->k; ++i) _mm512_mask_storeu_ps(O + off[i], mask[i], acc[v]);
    }
#else
    float buf[CONV_TW];
    for (int v = 0; v < CONV_TV; ++v) VSTORE(buf + v * VW, acc[v]);
    for (int gi = 0; gi < CONV_TW / CONV_GROUP; ++gi) {
        const int64_t *off = P->off + (t * (CONV_TW / CONV_GROUP) + gi) * P->k;
        const uint16_t *mask = P->mask + (t * (CONV_TW / CONV_GROUP) + gi) * P->k;
        for (int64_t i = 0; i < P->k; ++i)
            for (int lane = 0; lane < CONV_GROUP; ++lane)
                if (mask[i] >> lane & 1u) O[off[i] + lane] = buf[gi * CONV_GROUP + lane];
    }
#endif
}

/*
 * Row vectors: when an output row is a whole number of vectors (Wo % VW == 0: the 32- and 16-wide planes of
 * a CIFAR ResNet with AVX-512, every plane with AVX2 or plain C), a chunk's outputs are vectors of VW
 * consecutive outputs of one row, vector u read at grid position in[u] of the stacked planes and stored at
 * out[u] (j * ostride + ho * Wo + column) of the chunk's output: no position between the rows is computed,
 * and every store is a plain vector store.
 */
typedef struct {
    int64_t n, *in, *out;
} conv_rows;

/* The row vectors of a chunk of nimg images (tiles past n repeat the last vector); -1 on failure. */
static int conv_rows_init(conv_rows *V, const conv_layout *L, int64_t nimg, int64_t ostride) {
    const int64_t per_row = L->Wo / VW;
    V->n = nimg * L->Ho * per_row;
    const int64_t padded = (V->n + CONV_TV - 1) / CONV_TV * CONV_TV;
    V->in = malloc((size_t)(padded > 0 ? padded : 1) * sizeof *V->in);
    V->out = malloc((size_t)(padded > 0 ? padded : 1) * sizeof *V->out);
    if (!V->in || !V->out) {
        free(V->in), free(V->out);
        V->in = V->out = NULL;
        return -1;
    }
    for (int64_t u = 0; u < padded; ++u) {
        const int64_t uu = u < V->n ? u : V->n - 1, cv = uu % per_row, ho = uu / per_row % L->Ho;
        const int64_t j = uu / per_row / L->Ho;
        V->in[u] = (j * L->sh + ho) * L->wp + cv * VW;
        V->out[u] = j * ostride + ho * L->Wo + cv * VW;
    }
    return 0;
}

static void conv_rows_free(conv_rows *V) { free(V->in), free(V->out); }

/* The next chunk of images for this thread: every thread of a call takes chunks from one shared counter. */
static inline int64_t conv_claim(int64_t *next) { return __atomic_fetch_add(next, 1, __ATOMIC_RELAXED); }

/* Every term's offset in the stacked planes: row[q] * ld + shift[q] (NULL on failure). */
static int64_t *conv_offsets(const int64_t *restrict row, const int64_t *restrict shift, int64_t nnz, int64_t ld) {
    int64_t *o = malloc((size_t)(nnz > 0 ? nnz : 1) * sizeof *o);
    if (o)
        for (int64_t q = 0; q < nnz; ++q) o[q] = row[q] * ld + shift[q];
    return o;
}

/*
 * Bags over stacked planes (the forward, and with dY's planes and the transposed terms the input gradient):
 *     out[b, r, ho, wo] = sum_{q in [ptr[r], ptr[r+1])} w[q] * S_b[row[q]][(ho * wp + wo) + shift[q]]
 * x: (B, C, H, W) contiguous; out: (B, R, Ho, Wo) contiguous, every element written.
 */
int64_t nm_conv_bags_f32(const float *restrict x, const int64_t *restrict geo, const int64_t *restrict row,
                         const int64_t *restrict shift, const int64_t *restrict ptr, const float *restrict w,
                         int64_t R, float *restrict out, int64_t *next) {
    conv_layout L;
    conv_layout_init(&L, geo);
    const int64_t ostride = R * L.Ho * L.Wo, plane = L.Ho * L.Wo, chunks = (L.B + L.nb - 1) / L.nb;
    const int rows_mode = L.Wo % VW == 0;
    conv_plan P = {0, NULL, NULL};
    conv_rows V = {0, NULL, NULL};
    int64_t made_for = 0; /* the chunk size P or V was made for */
    float *scr = conv_scratch(L.C * L.ld);
    int64_t *toff = conv_offsets(row, shift, ptr[R], L.ld);
    int64_t status = (scr && toff) ? 0 : -1;
    for (int64_t c; status == 0 && (c = conv_claim(next)) < chunks;) {
        const int64_t b0 = c * L.nb, nimg = (L.B - b0 < L.nb) ? L.B - b0 : L.nb;
        if (nimg != made_for) { /* the first chunk, or the last one with fewer images */
            conv_plan_free(&P), conv_rows_free(&V);
            P.off = V.in = V.out = NULL, P.mask = NULL;
            if (rows_mode ? conv_rows_init(&V, &L, nimg, ostride) : conv_plan_init(&P, &L, nimg, ostride)) {
                status = -1;
                break;
            }
            made_for = nimg;
        }
        conv_stack(x + b0 * L.C * L.H * L.W, L.C, nimg, &L, scr);
        float *restrict O = out + b0 * ostride;
        const int64_t tiles = rows_mode ? (V.n + CONV_TV - 1) / CONV_TV : L.tiles;
        for (int64_t t = 0; t < tiles; ++t) {
            if (rows_mode) {
                int64_t vin[CONV_TV];
                for (int v = 0; v < CONV_TV; ++v) vin[v] = V.in[t * CONV_TV + v];
                const int64_t nv = (V.n - t * CONV_TV < CONV_TV) ? V.n - t * CONV_TV : CONV_TV;
                for (int64_t r = 0; r < R; ++r) {
                    vec acc[CONV_TV];
                    for (int v = 0; v < CONV_TV; ++v) acc[v] = VZERO();
                    for (int64_t q = ptr[r]; q < ptr[r + 1]; ++q) {
                        const vec wq = VSET1(w[q]);
                        const float *restrict src = scr + toff[q];
                        for (int v = 0; v < CONV_TV; ++v) acc[v] = VFMA(wq, VLOAD(src + vin[v]), acc[v]);
                    }
                    float *restrict Or = O + r * plane;
                    for (int v = 0; v < nv; ++v) VSTORE(Or + V.out[t * CONV_TV + v], acc[v]);
                }
            } else {
                const float *restrict base = scr + t * CONV_TW;
                for (int64_t r = 0; r < R; ++r) {
                    vec acc[CONV_TV];
                    for (int v = 0; v < CONV_TV; ++v) acc[v] = VZERO();
                    for (int64_t q = ptr[r]; q < ptr[r + 1]; ++q) {
                        const vec wq = VSET1(w[q]);
                        const float *restrict src = base + toff[q];
                        for (int v = 0; v < CONV_TV; ++v) acc[v] = VFMA(wq, VLOAD(src + v * VW), acc[v]);
                    }
                    conv_store(acc, &P, t, O + r * plane);
                }
            }
        }
    }
    free(scr), free(toff), conv_plan_free(&P), conv_rows_free(&V);
    return status;
}

/*
 * Dots over stacked planes (the weight gradient at the kept slots), per part of per_part images:
 *     part[c, q] = sum_{b in part c} sum_{ho, wo} dY[b, r, ho, wo] * S_b[row[q]][(ho * wp + wo) + shift[q]]
 * for every term q of every row r (nnz = ptr[R] terms); dy: (B, R, Ho, Wo) contiguous (read as it is with
 * row vectors, else laid on the output grid, zeros between), x as for nm_conv_bags_f32. Each term keeps a
 * vector of partial sums over a part's chunks and tiles, reduced in a fixed order at the part's end;
 * nm_sum_rows_f32 then adds the parts in order. Per tile and row, the tile of dY stays in registers across
 * the row's terms (one load per multiply-add).
 */
int64_t nm_conv_dots_f32(const float *restrict dy, const float *restrict x, const int64_t *restrict geo,
                         const int64_t *restrict row, const int64_t *restrict shift, const int64_t *restrict ptr,
                         int64_t R, float *restrict part, int64_t *next) {
    conv_layout L;
    conv_layout_init(&L, geo);
    const int64_t nnz = ptr[R], plane = L.Ho * L.Wo, ostride = R * plane;
    const int64_t parts = (L.B + L.per_part - 1) / L.per_part;
    const int rows_mode = L.Wo % VW == 0;
    const int64_t lg = conv_ld(L.tiles * CONV_TW);
    conv_rows V = {0, NULL, NULL};
    int64_t made_for = 0;
    float *scr = conv_scratch(L.C * L.ld), *grid = rows_mode ? NULL : conv_scratch(R * lg);
    vec *sums = aligned_alloc(64, (size_t)((nnz > 0 ? nnz : 1) * (int64_t)sizeof(vec) + 63) / 64 * 64);
    int64_t *toff = conv_offsets(row, shift, nnz, L.ld);
    int64_t status = (scr && (grid || rows_mode) && sums && toff) ? 0 : -1;
    for (int64_t c; status == 0 && (c = conv_claim(next)) < parts;) {
        const int64_t b1 = ((c + 1) * L.per_part < L.B) ? (c + 1) * L.per_part : L.B;
        for (int64_t q = 0; q < nnz; ++q) sums[q] = VZERO();
        for (int64_t b0 = c * L.per_part; b0 < b1; b0 += L.nb) {
            const int64_t nimg = (b1 - b0 < L.nb) ? b1 - b0 : L.nb;
            if (rows_mode && nimg != made_for) {
                conv_rows_free(&V);
                V.in = V.out = NULL;
                if (conv_rows_init(&V, &L, nimg, ostride)) {
                    status = -1;
                    break;
                }
                made_for = nimg;
            }
            conv_stack(x + b0 * L.C * L.H * L.W, L.C, nimg, &L, scr);
            const float *restrict D = dy + b0 * ostride;
            if (!rows_mode) conv_grid(D, R, nimg, &L, lg, grid);
            const int64_t tiles = rows_mode ? (V.n + CONV_TV - 1) / CONV_TV : L.tiles;
            for (int64_t t = 0; t < tiles; ++t) {
                int64_t vin[CONV_TV];
                for (int v = 0; v < CONV_TV; ++v) vin[v] = rows_mode ? V.in[t * CONV_TV + v] : t * CONV_TW + v * VW;
                const int64_t nv = (rows_mode && V.n - t * CONV_TV < CONV_TV) ? V.n - t * CONV_TV : CONV_TV;
                for (int64_t r = 0; r < R; ++r) {
                    vec d[CONV_TV];
                    for (int v = 0; v < CONV_TV; ++v)
                        d[v] = !rows_mode ? VLOAD(grid + r * lg + vin[v])
                                          : v < nv ? VLOAD(D + r * plane + V.out[t * CONV_TV + v]) : VZERO();
                    for (int64_t q = ptr[r]; q < ptr[r + 1]; ++q) {
                        const float *restrict src = scr + toff[q];
                        vec a0 = VMUL(d[0], VLOAD(src + vin[0])), a1 = VMUL(d[1], VLOAD(src + vin[1]));
                        for (int v = 2; v < CONV_TV; v += 2) {
                            a0 = VFMA(d[v], VLOAD(src + vin[v]), a0);
                            a1 = VFMA(d[v + 1], VLOAD(src + vin[v + 1]), a1);
                        }
                        sums[q] = VADD(sums[q], VADD(a0, a1));
                    }
                }
            }
        }
        for (int64_t q = 0; q < nnz; ++q) part[c * nnz + q] = VHSUM(sums[q]);
    }
    free(scr), free(grid), free(sums), free(toff), conv_rows_free(&V);
    return status;
}

/* out[j] = sum_{i < rows} a[i * n + j] in the order of i, for j in [j0, j1) (the chunks' partial sums). */
void nm_sum_rows_f32(const float *restrict a, int64_t rows, int64_t n, float *restrict out, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) out[j] = 0.0f;
    for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = j0; j < j1; ++j) out[j] += a[i * n + j];
}

/* Running a convolution kernel on the threads of an OpenMP team: GOMP_parallel(fn, data, threads, flags). */
typedef void (*nm_gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);

typedef struct {
    const float *a, *b, *w;
    const int64_t *geo, *row, *shift, *ptr;
    int64_t R;
    float *out;
    int64_t next, status;
} conv_task;

static void conv_bags_task(void *p) {
    conv_task *t = p;
    if (nm_conv_bags_f32(t->a, t->geo, t->row, t->shift, t->ptr, t->w, t->R, t->out, &t->next))
        __atomic_store_n(&t->status, -1, __ATOMIC_RELAXED);
}

static void conv_dots_task(void *p) {
    conv_task *t = p;
    if (nm_conv_dots_f32(t->a, t->b, t->geo, t->row, t->shift, t->ptr, t->R, t->out, &t->next))
        __atomic_store_n(&t->status, -1, __ATOMIC_RELAXED);
}

int64_t nm_conv_bags_par_f32(void *gomp_parallel, int64_t threads, const float *x, const int64_t *geo,
                             const int64_t *row, const int64_t *shift, const int64_t *ptr, const float *w, int64_t R,
                             float *out) {
    conv_task t = {x, NULL, w, geo, row, shift, ptr, R, out, 0, 0};
    ((nm_gomp_parallel_fn)gomp_parallel)(conv_bags_task, &t, (unsigned)threads, 0);
    return t.status;
}

int64_t nm_conv_dots_par_f32(void *gomp_parallel, int64_t threads, const float *dy, const float *x,
                             const int64_t *geo, const int64_t *row, const int64_t *shift, const int64_t *ptr,
                             int64_t R, float *part) {
    conv_task t = {dy, x, NULL, geo, row, shift, ptr, R, part, 0, 0};
    ((nm_gomp_parallel_fn)gomp_parallel)(conv_dots_task, &t, (unsigned)threads, 0);
    return t.status;
}
