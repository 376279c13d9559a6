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
int64_t nm_abi_version(void) { return 8; }

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

/* One bag over one tile of compile-time width W (a multiple of VW): two sets of W / VW vector accumulators
 * (even and odd slots: twice the independent FMA chains, to hide the FMA latency), summed at the end. */
#define BAG_TILE(W)                                                                      \
    do {                                                                                 \
        vec acc[(W) / VW], acc2[(W) / VW];                                               \
        float buf[W];                                                                    \
        for (int v = 0; v < (W) / VW; ++v) acc[v] = acc2[v] = VZERO();                   \
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

/* Positions per tile of the plane kernels: 64 floats, four independent accumulators. */
#define PLANE_TW 64

/*
 * Bags over shifted planes (the products of an N:M convolution on NCHW data):
 *     out[b, r, p] = sum_{q in [ptr[r], ptr[r+1])} w[q] * X_b[row[q] * ld + off[q] + p]      for p < P
 * for every image b (X_b = x + b * xstride). A convolution is a sum over kernel positions of shifted
 * products: ``row`` is the input channel of a slot and ``off`` its kernel position's shift in the padded
 * plane (kh * Wp + kw), so stride-1 convolutions of any kernel, padding and dilation are one call. Output
 * position p is row h = p / wp, column p % wp of a plane wp wide; only columns < wo are stored, at
 * out[b * ostride + r * ldr + h * ldh + column]. Every plane of X must hold PLANE_TW floats past its last
 * read position (zeros). Work is split over the flat (image, row) range [i0, i1).
 */
void nm_plane_bags_f32(const float *restrict x, int64_t xstride, int64_t ld, int64_t P, int64_t wp, int64_t wo,
                       const int64_t *restrict row, const int64_t *restrict off, const int64_t *restrict ptr,
                       const float *restrict w, int64_t R, float *restrict out, int64_t ostride, int64_t ldr,
                       int64_t ldh, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / R, r = i % R;
        const float *restrict X = x + b * xstride;
        float *restrict O = out + b * ostride + r * ldr;
        for (int64_t p0 = 0; p0 < P; p0 += PLANE_TW) {
            vec acc[PLANE_TW / VW];
            float buf[PLANE_TW];
            for (int v = 0; v < PLANE_TW / VW; ++v) acc[v] = VZERO();
            for (int64_t q = ptr[r]; q < ptr[r + 1]; ++q) {
                const vec wq = VSET1(w[q]);
                const float *restrict src = X + row[q] * ld + off[q] + p0;
                for (int v = 0; v < PLANE_TW / VW; ++v) acc[v] = VFMA(wq, VLOAD(src + v * VW), acc[v]);
            }
            for (int v = 0; v < PLANE_TW / VW; ++v) VSTORE(buf + v * VW, acc[v]);
            const int64_t width = (P - p0 < PLANE_TW) ? P - p0 : PLANE_TW;
            int64_t h = p0 / wp, col = p0 - h * wp;
            for (int64_t j = 0; j < width; ++j) {
                if (col < wo) O[h * ldh + col] = buf[j];
                if (++col == wp) {
                    col = 0;
                    ++h;
                }
            }
        }
    }
}

/*
 * Dots over shifted planes (the weight gradient of an N:M convolution at the kept slots only):
 *     out[q] = sum_b sum_{p < P} D_b[r * ldd + p] * X_b[row[q] * ld + off[q] + p]      for q in [ptr[r], ptr[r+1])
 * for rows r in [r0, r1), summed over the B images (D_b = d + b * dstride: the output gradient, zero at the
 * junk columns). Every row of D holds zeros up to a multiple of PLANE_TW past P, and every plane of X that
 * many readable floats (so the last tile needs no tail loop). Fixed summation order.
 */
void nm_plane_dots_f32(const float *restrict d, int64_t dstride, int64_t ldd, const float *restrict x,
                       int64_t xstride, int64_t ld, int64_t P, int64_t B, const int64_t *restrict row,
                       const int64_t *restrict off, const int64_t *restrict ptr, float *restrict out, int64_t r0,
                       int64_t r1) {
    const int64_t Pr = (P + PLANE_TW - 1) / PLANE_TW * PLANE_TW;
    for (int64_t r = r0; r < r1; ++r)
        for (int64_t q = ptr[r]; q < ptr[r + 1]; ++q) out[q] = 0.0f;
    for (int64_t b = 0; b < B; ++b) {
        const float *restrict X = x + b * xstride;
        for (int64_t r = r0; r < r1; ++r) {
            const float *restrict D = d + b * dstride + r * ldd;
            for (int64_t q = ptr[r]; q < ptr[r + 1]; ++q) {
                const float *restrict src = X + row[q] * ld + off[q];
                vec acc[PLANE_TW / VW];
                for (int v = 0; v < PLANE_TW / VW; ++v) acc[v] = VZERO();
                for (int64_t p0 = 0; p0 < Pr; p0 += PLANE_TW)
                    for (int v = 0; v < PLANE_TW / VW; ++v)
                        acc[v] = VFMA(VLOAD(D + p0 + v * VW), VLOAD(src + p0 + v * VW), acc[v]);
                for (int half = PLANE_TW / VW / 2; half > 0; half /= 2)
                    for (int v = 0; v < half; ++v) acc[v] = VADD(acc[v], acc[v + half]);
                out[q] += VHSUM(acc[0]);
            }
        }
    }
}

/*
 * Planes into a padded, flattened layout in one pass (no separate zero fill): plane q of src (H x W,
 * contiguous) becomes dst[q * ld ...]: `front` zeros, `top` zero rows of wp, then H rows of `left` zeros,
 * the W values and zeros up to wp, then zeros up to ld. For planes [q0, q1).
 */
void nm_pad_planes_f32(const float *restrict src, int64_t H, int64_t W, float *restrict dst, int64_t ld,
                       int64_t front, int64_t top, int64_t left, int64_t wp, int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
        const float *restrict s = src + q * H * W;
        float *restrict d = dst + q * ld;
        int64_t pos = front + top * wp;
        memset(d, 0, (size_t)(pos + left) * sizeof(float));
        for (int64_t h = 0; h < H; ++h) {
            float *restrict line = d + pos + h * wp + left;
            memcpy(line, s + h * W, (size_t)W * sizeof(float));
            /* the rest of this row, and the next row's left margin (or the tail after the last row) */
            const int64_t gap = (h + 1 < H) ? wp - W : 0;
            memset(line + W, 0, (size_t)gap * sizeof(float));
        }
        const int64_t used = pos + (H - 1) * wp + left + W;
        if (H == 0) {
            memset(d, 0, (size_t)ld * sizeof(float));
        } else if (used < ld) {
            memset(d + used, 0, (size_t)(ld - used) * sizeof(float));
        }
    }
}
