/* AMX kernels: the bf16 matmul rows on the AMX tiles (tdpbf16ps). Compiled with the AVX-512 flags
 * plus -mamx-tile/-mamx-bf16; only called after dispatch.c saw AMX-TILE and AMX-BF16 in CPUID and
 * Linux granted this process the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM). */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "kernels/cpu/kernels_internal.h"

const moe_amx_tile_config moe_amx_tiles_16x64 = {
    .palette = 1,
    .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
    .rows = {16, 16, 16, 16, 16, 16, 16, 16},
};

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__) &&                      \
    defined(__AVX512BF16__)

#define AI static inline __attribute__((always_inline))

#include "kernels/cpu/bf16_x_avx512.h"

/* ---- numerics ----
 * tdpbf16ps C[m][n] += sum over the 16 pairs p of A[m][2p..2p+1] . B[p][n][0..1] (f32 products of
 * bf16, added in the instruction's fixed order). A is 16 rows of W, 32 bf16 of k each, loaded
 * straight from the row-major weights (the pairs are already adjacent); B holds x, one column per
 * token and part: with hi + lo (NX = 2, the default) token j of the tile is columns 2j (hi) and
 * 2j + 1 (lo), 8 tokens per tile; with MOE_BF16_X=round (NX = 1) one column, 16 tokens. Every
 * output y[t][r] is C[r][hi] (+ C[r][lo]) after one tdpbf16ps per 32 k in k order, the last 32 k
 * zero-padded on both sides: its bits depend only on its row of W, its row of x and n_in, never on
 * the tokens, rows, tiles or threads around it (batch invariance, docs/kernels.md). The bf16 of x
 * are exactly those of the vdpbf16ps rows (bf16_x_avx512.h); the sums are in another order, so the
 * bits differ from those rows' (as they do from AVX2's), within the same error bound. Like
 * vdpbf16ps, the tiles flush subnormal inputs and results to zero. */

enum {
    TK = 32,       /* bf16 of k per tile row, one tdpbf16ps step */
    TR = 16,       /* rows of W per A tile, of the output per C tile */
    TCOL = 16,     /* f32 / bf16-pair columns per B and C tile */
    TBYTES = 1024, /* one tile: 16 rows x 64 bytes */
};

/* Tile registers: C[a][b] = 2a + b (a: row tile, b: token tile), A = 4 + a, B = 6 + b; every
 * tile 16 rows x 64 bytes (moe_amx_tiles_16x64): one configuration for every shape (tails are
 * zero-padded), so a call loads it once. */
static void tiles_begin(void)
{
    _tile_loadconfig(&moe_amx_tiles_16x64);
}

/* Tiles back to their init state when a call ends: a thread that holds none saves no 8 KB of
 * tile data at every context switch. */
static void tiles_end(void)
{
    _tile_release();
}

/* ---- x as B tiles ----
 * xa: for token tile tb and k step s, one B tile at xa + (tb * nks + s) * TBYTES: row p, column c
 * is the bf16 pair (2p, 2p + 1) of that step for column c's token and part. */

AI int n_ksteps(int n_in)
{
    return (n_in + TK - 1) / TK;
}

/* The 16 x 16 dwords of r transposed in place (r[i] lane j <- r[j] lane i): 64 shuffles, where
 * scattering the same 256 dwords costs 256 single-element stores. Builds the B tiles from x's rows
 * and takes the C tiles back to y's rows. */
AI void transpose16_epi32(__m512i r[16])
{
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) { /* per 128-bit lane: pairs of rows i, i + 1 */
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* u[i + e] lane L: element 4L + e of rows i..i + 3 */
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int e = 0; e < 4; e++) { /* the four 128-bit lanes of each column from the row groups */
        __m512i v0 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x88); /* elements e, 8 + e */
        __m512i v1 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xdd); /* 4 + e, 12 + e */
        __m512i v2 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x88);
        __m512i v3 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xdd);
        r[e] = _mm512_shuffle_i32x4(v0, v2, 0x88);
        r[8 + e] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
        r[4 + e] = _mm512_shuffle_i32x4(v1, v3, 0x88);
        r[12 + e] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
    }
}

/* Tokens [0, nt) of x (rows of n_in) into B tiles; columns of missing tokens are zero. Per tile and
 * k step: each column's 16 bf16 pairs (one token's hi or lo) in a register, then transposed into
 * the tile's 16 rows. The tile's 8 or 16 rows of x are read side by side, 128 bytes per step each:
 * too many streams for the hardware prefetcher once x is out of L2 (prefill), so each row is
 * prefetched X_PREFETCH_STEPS steps ahead. */
#define X_PREFETCH_STEPS 8
static void x_to_tiles(uint32_t *xa, const float *x, int nt, int n_in, int NX)
{
    const int tpt = TCOL / NX, nks = n_ksteps(n_in), ntt = (nt + tpt - 1) / tpt;
    for (int tt = 0; tt < ntt; tt++) {
        const int t0 = tt * tpt, n = nt - t0 < tpt ? nt - t0 : tpt;
        uint32_t *tile = xa + (size_t)tt * nks * (TBYTES / 4);
        for (int s = 0; s < nks; s++, tile += TBYTES / 4) {
            __m512i col[TCOL];
            for (int j = 0; j < tpt; j++) {
                if (j < n) {
                    const float *xt = x + (size_t)(t0 + j) * n_in;
                    if ((s + X_PREFETCH_STEPS) * TK < n_in) {
                        _mm_prefetch((const char *)(xt + (s + X_PREFETCH_STEPS) * TK), _MM_HINT_T0);
                        _mm_prefetch((const char *)(xt + (s + X_PREFETCH_STEPS) * TK + 16),
                                     _MM_HINT_T0);
                    }
                    bf16_x32(xt, s * TK, n_in, &col[NX * j], NX == 2 ? &col[NX * j + 1] : NULL);
                } else
                    for (int h = 0; h < NX; h++)
                        col[NX * j + h] = _mm512_setzero_si512();
            }
            transpose16_epi32(col);
            for (int p = 0; p < TR; p++)
                _mm512_store_si512(tile + p * TCOL, col[p]);
        }
    }
}

/* ---- A tiles ---- */

/* Rows [r, r + nr) of W (nr <= TR), k step s, into the 16 x 32 bf16 stage, zero elsewhere: for the
 * last step of a row whose n_in is not a multiple of TK (a direct load would read the next row,
 * or past the matrix) and for blocks of fewer than TR rows. */
AI void stage_a(uint16_t *stage, const uint16_t *w, int n_in, int r, int nr, int s)
{
    const int k = s * TK, nk = n_in - k < TK ? n_in - k : TK;
    memset(stage, 0, TBYTES);
    for (int i = 0; i < nr; i++)
        memcpy(stage + i * TK, w + (size_t)(r + i) * n_in + k, (size_t)nk * 2);
}

/* W rows prefetched this many k steps ahead on a block's first token pair, and the next block's
 * first steps during the last pair's last steps: decode at batch 1 on the small preset (W from
 * L3, rows 768-1536 bytes apart) took 25-35% more CPU time per token than the AVX2 rows without
 * it, 5-10% with it (2 measured best; 4 and more evict the tiles' lines from L1, T1/T2 hints were
 * slower); on the OLMoE shape (rows 4 KB apart) neutral. A prefetch past the matrix never faults.
 */
#define W_PREFETCH_STEPS 2

/* ---- one block: NA row tiles (16 rows each, from row r) x NB token tiles (from tb) ----
 * nr: rows of W present (TR * NA, or fewer for a lone staged tile). */
AI void block(float *y, const uint32_t *xa, const uint16_t *w, int nt, int n_in, int n_out, int r,
              int nr, int tb, int NA, int NB, int NX, int last)
{
    _Alignas(64) uint16_t stage[2][TBYTES / 2];
    _Alignas(64) float c[TR * TCOL];
    const int nks = n_ksteps(n_in), full = n_in / TK, tpt = TCOL / NX;
    const size_t ws = (size_t)n_in * 2;
    const uint32_t *b0 = xa + (size_t)tb * nks * (TBYTES / 4);
    const uint32_t *b1 = b0 + (size_t)nks * (TBYTES / 4);
    const int staged = nr < TR * NA; /* only when NA == 1 */
    _tile_zero(0);
    if (NB == 2)
        _tile_zero(1);
    if (NA == 2) {
        _tile_zero(2);
        if (NB == 2)
            _tile_zero(3);
    }
    /* The first token pair of a block meets its W rows in memory (the other pairs find them in
     * L2): 32 row streams 64 bytes a step, which the hardware prefetcher does not follow. */
    const int prefetch_w = tb == 0;
    for (int s = 0; s < nks; s++) {
        const uint16_t *wa = w + (size_t)r * n_in + (size_t)s * TK;
        if (prefetch_w && s + W_PREFETCH_STEPS < nks)
            for (int i = 0; i < nr; i++)
                _mm_prefetch((const char *)(wa + (size_t)i * n_in + W_PREFETCH_STEPS * TK),
                             _MM_HINT_T0);
        else if (last && s + W_PREFETCH_STEPS >= nks)
            for (int i = 0; i < 2 * TR; i++)
                _mm_prefetch((const char *)(w + (size_t)(r + nr + i) * n_in +
                                            (size_t)(s + W_PREFETCH_STEPS - nks) * TK),
                             _MM_HINT_T0);
        if (!staged && s < full) {
            _tile_loadd(4, wa, ws);
            if (NA == 2)
                _tile_loadd(5, wa + (size_t)TR * n_in, ws);
        } else {
            stage_a(stage[0], w, n_in, r, nr < TR ? nr : TR, s);
            _tile_loadd(4, stage[0], 64);
            if (NA == 2) {
                stage_a(stage[1], w, n_in, r + TR, TR, s);
                _tile_loadd(5, stage[1], 64);
            }
        }
        _tile_loadd(6, b0 + (size_t)s * (TBYTES / 4), 64);
        if (NB == 2)
            _tile_loadd(7, b1 + (size_t)s * (TBYTES / 4), 64);
        _tile_dpbf16ps(0, 4, 6);
        if (NB == 2)
            _tile_dpbf16ps(1, 4, 7);
        if (NA == 2) {
            _tile_dpbf16ps(2, 5, 6);
            if (NB == 2)
                _tile_dpbf16ps(3, 5, 7);
        }
    }
    /* C[a][b] row i, column (token j, part) -> y[(tb + b) * tpt + j][r + 16a + i]: the tile
     * transposed, so that each token's 16 rows (hi + lo added) are one store */
    for (int a = 0; a < NA; a++)
        for (int b = 0; b < NB; b++) {
            int cid = 2 * a + b;
            if (cid == 0)
                _tile_stored(0, c, 64);
            else if (cid == 1)
                _tile_stored(1, c, 64);
            else if (cid == 2)
                _tile_stored(2, c, 64);
            else
                _tile_stored(3, c, 64);
            int t0 = (tb + b) * tpt, ni = nr - TR * a < TR ? nr - TR * a : TR;
            int nj = nt - t0 < tpt ? nt - t0 : tpt;
            __m512i col[TCOL];
            for (int i = 0; i < TR; i++)
                col[i] = _mm512_load_si512(c + i * TCOL);
            transpose16_epi32(col);
            for (int j = 0; j < nj; j++) {
                __m512 v = NX == 2 ? _mm512_add_ps(_mm512_castsi512_ps(col[2 * j]),
                                                   _mm512_castsi512_ps(col[2 * j + 1]))
                                   : _mm512_castsi512_ps(col[j]);
                _mm512_mask_storeu_ps(y + (size_t)(t0 + j) * n_out + r + TR * a, mask16(ni), v);
            }
        }
}

/* Token tiles in pairs (the last one alone) for one row block. */
AI void row_block(float *y, const uint32_t *xa, const uint16_t *w, int nt, int n_in, int n_out,
                  int r, int nr, int NA, int NX)
{
    const int tpt = TCOL / NX, ntt = (nt + tpt - 1) / tpt;
    int tb = 0;
    for (; tb + 2 <= ntt; tb += 2)
        block(y, xa, w, nt, n_in, n_out, r, nr, tb, NA, 2, NX, tb + 2 == ntt);
    if (tb < ntt)
        block(y, xa, w, nt, n_in, n_out, r, nr, tb, NA, 1, NX, 1);
}

/* Rows [r0, r1) in blocks of 32 rows, then 16; the last partial block recomputes the rows before
 * it up to a full tile (same bits: rows are independent), so only a range of fewer than 16 rows
 * is staged. */
AI void rows_tiles(float *y, const uint32_t *xa, const uint16_t *w, int nt, int n_in, int n_out,
                   int r0, int r1, int NX)
{
    if (r1 - r0 < TR) {
        row_block(y, xa, w, nt, n_in, n_out, r0, r1 - r0, 1, NX);
        return;
    }
    int r = r0;
    for (; r + 2 * TR <= r1; r += 2 * TR)
        row_block(y, xa, w, nt, n_in, n_out, r, 2 * TR, 2, NX);
    if (r + TR <= r1) {
        row_block(y, xa, w, nt, n_in, n_out, r, TR, 1, NX);
        r += TR;
    }
    if (r < r1)
        row_block(y, xa, w, nt, n_in, n_out, r1 - TR, TR, 1, NX);
}

/* Tokens per call of rows_tiles from AMX_CHUNK_MIN_TOK tokens on (prefill): the chunk's B tiles
 * (n_in * 4 bytes per token) stay in L2 while every row block of the task meets them. Chunks leave
 * every output's arithmetic unchanged. */
#define AMX_TOKC 64
#define AMX_CHUNK_MIN_TOK 96
/* The no-scratch path's stack buffer: one token tile of x (n_in up to 32 * this many steps). */
#define XA_STACK_STEPS 128

static __attribute__((noinline)) void rows_by_token(float *y, const float *x, const uint16_t *w,
                                                    int n_tok, int n_in, int n_out, int r0, int r1,
                                                    int NX)
{
    _Alignas(64) uint32_t xa[XA_STACK_STEPS * TBYTES / 4];
    MOE_KASSERT(n_ksteps(n_in) <= XA_STACK_STEPS &&
                "moe_matmul (amx, bf16): out of memory for the x scratch");
    for (int t = 0; t < n_tok; t++) {
        x_to_tiles(xa, x + (size_t)t * n_in, 1, n_in, NX);
        rows_tiles(y + (size_t)t * n_out, xa, w, 1, n_in, n_out, r0, r1, NX);
    }
}

static void rows_bf16(float *y, const float *x, const uint16_t *w, int n_tok, int n_in, int n_out,
                      int r0, int r1, int NX)
{
    const int tpt = TCOL / NX;
    int chunk = n_tok >= AMX_CHUNK_MIN_TOK ? AMX_TOKC : n_tok;
    size_t bytes = (size_t)((chunk + tpt - 1) / tpt) * n_ksteps(n_in) * TBYTES;
    uint32_t *xa = moe_rows_scratch(bytes);
    tiles_begin();
    if (!xa) {
        rows_by_token(y, x, w, n_tok, n_in, n_out, r0, r1, NX);
    } else {
        for (int tc = 0; tc < n_tok; tc += chunk) {
            int nt = n_tok - tc < chunk ? n_tok - tc : chunk;
            x_to_tiles(xa, x + (size_t)tc * n_in, nt, n_in, NX);
            rows_tiles(y + (size_t)tc * n_out, xa, w, nt, n_in, n_out, r0, r1, NX);
        }
    }
    tiles_end();
}

/* ---- x prepared once per matmul ----
 * matmul.c converts x into B tiles once for all the row tasks that read it (a projection split
 * across threads, gate and up of one expert, q, k and v), where each task would otherwise convert
 * all of x again: the tiles of n_tok tokens are the 64-token chunks' tiles one after another (a
 * chunk is a whole number of token tiles), so the rows read the same bytes either way. */
static size_t x_tiles_bytes(int n_tok, int n_in, int NX)
{
    const int tpt = TCOL / NX;
    return (size_t)((n_tok + tpt - 1) / tpt) * n_ksteps(n_in) * TBYTES;
}

static void x_tiles_prep(void *xp, const float *x, int t0, int nt, int n_in, int NX)
{
    const int tpt = TCOL / NX;
    MOE_KASSERT(t0 % tpt == 0 && MOE_ROWS_X_TOK_ALIGN % tpt == 0);
    x_to_tiles((uint32_t *)xp + (size_t)(t0 / tpt) * n_ksteps(n_in) * (TBYTES / 4),
               x + (size_t)t0 * n_in, nt, n_in, NX);
}

static void rows_prepared(float *y, const void *xp, const uint16_t *w, int n_tok, int n_in,
                          int n_out, int r0, int r1, int NX)
{
    const int tpt = TCOL / NX, chunk = n_tok >= AMX_CHUNK_MIN_TOK ? AMX_TOKC : n_tok;
    const uint32_t *xa = xp;
    tiles_begin();
    for (int tc = 0; tc < n_tok; tc += chunk) {
        int nt = n_tok - tc < chunk ? n_tok - tc : chunk;
        rows_tiles(y + (size_t)tc * n_out, xa + (size_t)(tc / tpt) * n_ksteps(n_in) * (TBYTES / 4),
                   w, nt, n_in, n_out, r0, r1, NX);
    }
    tiles_end();
}

size_t moe_amx_x_bytes(int n_tok, int n_in) { return x_tiles_bytes(n_tok, n_in, 2); }
size_t moe_amx_x_bytes_xbf16(int n_tok, int n_in) { return x_tiles_bytes(n_tok, n_in, 1); }
void moe_amx_x_prep(void *xp, const float *x, int t0, int nt, int n_in)
{
    x_tiles_prep(xp, x, t0, nt, n_in, 2);
}
void moe_amx_x_prep_xbf16(void *xp, const float *x, int t0, int nt, int n_in)
{
    x_tiles_prep(xp, x, t0, nt, n_in, 1);
}
void moe_matmul_rows_amx_px(float *y, const void *xp, const void *w, int n_tok, int n_in,
                            int n_out, int r0, int r1)
{
    rows_prepared(y, xp, w, n_tok, n_in, n_out, r0, r1, 2);
}
void moe_matmul_rows_amx_px_xbf16(float *y, const void *xp, const void *w, int n_tok, int n_in,
                                  int n_out, int r0, int r1)
{
    rows_prepared(y, xp, w, n_tok, n_in, n_out, r0, r1, 1);
}

/* bf16: the tiles, x as NX bf16 parts, for every n_tok (batch invariance); f32/f16 as on AVX-512
 * CPUs without AMX (the AVX2 rows). */
static void rows_any(float *y, const float *x, const void *w, moe_dtype wt, int n_tok, int n_in,
                     int n_out, int r0, int r1, int NX)
{
    if (wt == MOE_DT_BF16)
        rows_bf16(y, x, w, n_tok, n_in, n_out, r0, r1, NX);
    else
        moe_matmul_rows_avx2(y, x, w, wt, n_tok, n_in, n_out, r0, r1);
}

void moe_matmul_rows_amx(float *y, const float *x, const void *w, moe_dtype wt, int n_tok, int n_in,
                         int n_out, int r0, int r1)
{
    rows_any(y, x, w, wt, n_tok, n_in, n_out, r0, r1, 2);
}

void moe_matmul_rows_amx_xbf16(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                               int n_in, int n_out, int r0, int r1)
{
    rows_any(y, x, w, wt, n_tok, n_in, n_out, r0, r1, 1);
}

#else /* built without the flags (a compiler without AMX): never dispatched */

size_t moe_amx_x_bytes(int n_tok, int n_in) { return moe_amx_x_bytes_xbf16(n_tok, n_in); }
size_t moe_amx_x_bytes_xbf16(int n_tok, int n_in)
{
    (void)n_tok, (void)n_in;
    MOE_KASSERT(!"moe_amx_x_bytes: built without AMX");
    return 0;
}
void moe_amx_x_prep(void *xp, const float *x, int t0, int nt, int n_in)
{
    moe_amx_x_prep_xbf16(xp, x, t0, nt, n_in);
}
void moe_amx_x_prep_xbf16(void *xp, const float *x, int t0, int nt, int n_in)
{
    (void)xp, (void)x, (void)t0, (void)nt, (void)n_in;
    MOE_KASSERT(!"moe_amx_x_prep: built without AMX");
}
void moe_matmul_rows_amx_px(float *y, const void *xp, const void *w, int n_tok, int n_in,
                            int n_out, int r0, int r1)
{
    moe_matmul_rows_amx_px_xbf16(y, xp, w, n_tok, n_in, n_out, r0, r1);
}
void moe_matmul_rows_amx_px_xbf16(float *y, const void *xp, const void *w, int n_tok, int n_in,
                                  int n_out, int r0, int r1)
{
    (void)y, (void)xp, (void)w, (void)n_tok, (void)n_in, (void)n_out, (void)r0, (void)r1;
    MOE_KASSERT(!"moe_matmul_rows_amx_px: built without AMX");
}

void moe_matmul_rows_amx(float *y, const float *x, const void *w, moe_dtype wt, int n_tok, int n_in,
                         int n_out, int r0, int r1)
{
    moe_matmul_rows_scalar(y, x, w, wt, n_tok, n_in, n_out, r0, r1);
}

void moe_matmul_rows_amx_xbf16(float *y, const float *x, const void *w, moe_dtype wt, int n_tok,
                               int n_in, int n_out, int r0, int r1)
{
    moe_matmul_rows_scalar(y, x, w, wt, n_tok, n_in, n_out, r0, r1);
}

#endif
