/* Backend conformance, continued (test_backend_ops.c has the other ops and the tolerances): the
 * ops of the MoE layer's expert GEMMs on every backend present (CPU under each ISA, CUDA when a
 * GPU is visible), against double-precision references written here from the contracts in
 * worker/compute/backend.h, on random odd shapes:
 *  - matmul_batch as an expert group drives it: gate and up of up to 12 experts (a distinct x per
 *    expert, shared by its two matrices) in one batch, then every down (on CUDA: one grouped
 *    cuBLAS call per 16-bit dtype; tolerances as the matmul test's);
 *  - expert_sort: offsets, grouped rows and slots exact (a stable sort), the tally added to;
 *  - matmul_grouped: per-expert row counts in backend memory (some experts empty, counts across
 *    the 32-row tile, outputs across the 64-column tile), with and without the x row index, every
 *    weight dtype: 1e-5 * sum |x w| (f32 x on a device; on the CPU x quantized for Q8/Q4 as in
 *    matmul);
 *  - expert_combine: 1e-6 of the magnitudes (choice order; FMA contraction allowed);
 *  - the whole routed-expert block composed as the forward pass composes it (sort, gate, up, SwiGLU,
 *    down, combine) against a double reference: the three GEMMs' bounds above carried through
 *    SwiGLU (|silu'| < 1.1) and the weighted sum (a wrong index is an error of order 1). */
#include "backend_test_util.h"

static double act_round_of(const moe_backend *be, moe_dtype dt)
{
    return be->device != MOE_DEVICE_CPU && (dt == MOE_DT_BF16 || dt == MOE_DT_F16) ? 0x1p-16 : 0.0;
}

static bool is_quant(moe_dtype dt) { return dt == MOE_DT_Q8 || dt == MOE_DT_Q4; }

static const moe_dtype all_dts[] = {MOE_DT_F32, MOE_DT_BF16, MOE_DT_F16, MOE_DT_Q8, MOE_DT_Q4};
#define N_DTS (sizeof all_dts / sizeof all_dts[0])

/* Uploads a random (rows, cols) weight of dtype dt; wf gets its exact values. */
static const void *put_weight(bufs *b, moe_dtype dt, int rows, int cols, float *wf)
{
    void *w = make_weight(dt, rows, cols, wf);
    const void *dw = bput(b, w, moe_dtype_row_bytes(dt, (size_t)cols) * rows);
    free(w);
    return dw;
}

/* ---- matmul_batch over an expert group ---- */

Test(backend_ops_moe, matmul_batch_expert_group, .init = setup, .fini = teardown)
{
    for (int v = 0; v < n_vars; v++) {
        moe_backend *be = use(v);
        for (size_t di = 0; di < N_DTS; di++) {
            moe_dtype dt = all_dts[di];
            if (skip(be, vars[v].label, MOE_OP_MATMUL, dt))
                continue;
            for (int cs = 0; cs < 4; cs++) {
                bufs b = {.be = be};
                int ng = rint_in(1, 12), n_in = is_quant(dt) ? MOE_QK * rint_in(1, 5) : rint_in(1, 200);
                int ffn = rint_in(1, 90), rows[12], off[13] = {0};
                for (int g = 0; g < ng; g++) {
                    rows[g] = rint_in(1, cs == 3 ? 60 : 9);
                    off[g + 1] = off[g] + rows[g];
                }
                int n = off[ng];
                float *x = xcalloc((size_t)n * n_in, sizeof(float));
                rfill(x, (size_t)n * n_in, -2.0f, 2.0f);
                float *dx = bput(&b, x, sizeof(float) * n * n_in);
                float *dy = bput(&b, NULL, sizeof(float) * 2 * n * ffn);
                float *wf = xcalloc((size_t)2 * ng * ffn * n_in, sizeof(float));
                moe_matmul_desc d[24];
                for (int g = 0; g < ng; g++)
                    for (int h = 0; h < 2; h++) { /* gate, up: one x */
                        float *w = wf + (size_t)(2 * g + h) * ffn * n_in;
                        d[2 * g + h] = (moe_matmul_desc){dy + ((size_t)h * n + off[g]) * ffn, dx + (size_t)off[g] * n_in,
                                                         put_weight(&b, dt, ffn, n_in, w), dt, rows[g], n_in, ffn};
                    }
                be->ops->matmul_batch(be, d, 2 * ng);
                float *y = xcalloc((size_t)2 * n * ffn, sizeof(float));
                double *want = xcalloc((size_t)2 * n * ffn, sizeof(double)), *tol = xcalloc((size_t)2 * n * ffn, sizeof(double));
                bget(&b, y, dy, sizeof(float) * 2 * n * ffn);
                for (int g = 0; g < ng; g++)
                    for (int h = 0; h < 2; h++)
                        for (int t = 0; t < rows[g]; t++)
                            for (int r = 0; r < ffn; r++) {
                                bool xq = is_quant(dt) && (rows[g] < 48 || be->device == MOE_DEVICE_CPU);
                                size_t o = ((size_t)h * n + off[g] + t) * ffn + r;
                                matmul_ref(x + (size_t)(off[g] + t) * n_in, wf + ((size_t)(2 * g + h) * ffn + r) * n_in,
                                           n_in, xq, act_round_of(be, dt), &want[o], &tol[o]);
                            }
                char what[96];
                snprintf(what, sizeof what, "matmul_batch/%s expert group (%d experts, %d rows, in %d, ffn %d)",
                         moe_dtype_name(dt), ng, n, n_in, ffn);
                expect_close(vars[v].label, what, cs, y, want, tol, (size_t)2 * n * ffn);
                free(x);
                free(wf);
                free(y);
                free(want);
                free(tol);
                bfree_all(&b);
            }
        }
    }
}

/* ---- expert_sort ---- */

/* n_tok rows of k distinct experts each (as top-k gives), skewed so some experts get nothing. */
static void random_choices(int32_t *idx, int n_tok, int k, int E)
{
    for (int t = 0; t < n_tok; t++)
        for (int j = 0; j < k; j++) {
            int e, dup;
            do {
                e = rnext() % 3 == 0 ? rint_in(0, E - 1) : rint_in(0, (E - 1) / 2);
                dup = 0;
                for (int i = 0; i < j; i++)
                    dup |= idx[t * k + i] == e;
            } while (dup);
            idx[t * k + j] = e;
        }
}

Test(backend_ops_moe, expert_sort, .init = setup, .fini = teardown)
{
    for (int v = 0; v < n_vars; v++) {
        moe_backend *be = use(v);
        if (skip(be, vars[v].label, MOE_OP_EXPERT_SORT, MOE_DT_F32))
            continue;
        for (int cs = 0; cs < 8; cs++) {
            bufs b = {.be = be};
            int E = rint_in(1, 130), k = rint_in(1, E < 8 ? E : 8), n_tok = rint_in(1, cs < 6 ? 20 : 300), n = n_tok * k;
            int32_t *idx = xcalloc((size_t)n, sizeof *idx), *off = xcalloc((size_t)E + 1, sizeof *off);
            int32_t *src = xcalloc((size_t)n, sizeof *src), *slot = xcalloc((size_t)n, sizeof *slot);
            int64_t *tally = xcalloc((size_t)E, sizeof *tally), *tally0 = xcalloc((size_t)E, sizeof *tally0);
            random_choices(idx, n_tok, k, E);
            for (int e = 0; e < E; e++)
                tally0[e] = (int64_t)rint_in(0, 1000) << 33; /* above 32 bits: the tally is 64-bit */
            int32_t *di = bput(&b, idx, sizeof *idx * n), *doff = bput(&b, NULL, sizeof *off * (E + 1));
            int32_t *dsrc = bput(&b, NULL, sizeof *src * n), *dslot = bput(&b, NULL, sizeof *slot * n);
            int64_t *dtally = bput(&b, tally0, sizeof *tally0 * E);
            be->ops->expert_sort(be, di, n_tok, k, E, doff, dsrc, dslot, dtally);
            bget(&b, off, doff, sizeof *off * (E + 1));
            bget(&b, src, dsrc, sizeof *src * n);
            bget(&b, slot, dslot, sizeof *slot * n);
            bget(&b, tally, dtally, sizeof *tally * E);
            /* the reference: experts in order, choices in order within each */
            int s = 0;
            for (int e = 0; e < E; e++) {
                cr_assert_eq(off[e], s, "%s expert_sort case %d (E %d k %d n_tok %d): off[%d] = %d, want %d",
                             vars[v].label, cs, E, k, n_tok, e, off[e], s);
                int cnt = 0;
                for (int i = 0; i < n; i++)
                    if (idx[i] == e) {
                        cr_assert_eq(src[s], i / k, "%s expert_sort case %d: row %d: token %d, want %d", vars[v].label,
                                     cs, s, src[s], i / k);
                        cr_assert_eq(slot[i], s, "%s expert_sort case %d: choice %d: slot %d, want %d", vars[v].label,
                                     cs, i, slot[i], s);
                        s++;
                        cnt++;
                    }
                cr_assert_eq(tally[e], tally0[e] + cnt, "%s expert_sort case %d: tally[%d]", vars[v].label, cs, e);
            }
            cr_assert_eq(off[E], n, "%s expert_sort case %d: off[E] = %d, want %d", vars[v].label, cs, off[E], n);
            free(idx);
            free(off);
            free(src);
            free(slot);
            free(tally);
            free(tally0);
            bfree_all(&b);
        }
    }
}

/* ---- matmul_grouped ---- */

Test(backend_ops_moe, matmul_grouped, .init = setup, .fini = teardown)
{
    for (int v = 0; v < n_vars; v++) {
        moe_backend *be = use(v);
        for (size_t di = 0; di < N_DTS; di++) {
            moe_dtype dt = all_dts[di];
            if (skip(be, vars[v].label, MOE_OP_MATMUL_GROUPED, dt))
                continue;
            for (int cs = 0; cs < 6; cs++) {
                bufs b = {.be = be};
                int E = rint_in(1, 9), max_rows = rint_in(1, cs < 3 ? 12 : 70);
                int n_in = is_quant(dt) ? MOE_QK * rint_in(1, 5) : rint_in(1, 150), n_out = rint_in(1, 150);
                bool indexed = cs & 1;
                int32_t off[10] = {0};
                for (int e = 0; e < E; e++) /* about a third of the experts get no rows */
                    off[e + 1] = off[e] + (rnext() % 3 == 0 ? 0 : rint_in(1, max_rows));
                int n = off[E], n_x = indexed ? rint_in(1, 40) : n;
                float *x = xcalloc((size_t)(n_x ? n_x : 1) * n_in, sizeof(float));
                rfill(x, (size_t)n_x * n_in, -2.0f, 2.0f);
                int32_t *xrow = xcalloc((size_t)(n ? n : 1), sizeof *xrow);
                for (int s = 0; s < n; s++)
                    xrow[s] = rint_in(0, n_x - 1);
                float *wf = xcalloc((size_t)E * n_out * n_in, sizeof(float));
                const void *w[9];
                for (int e = 0; e < E; e++)
                    w[e] = off[e + 1] > off[e] ? put_weight(&b, dt, n_out, n_in, wf + (size_t)e * n_out * n_in) : NULL;
                float *dx = bput(&b, x, sizeof(float) * n_x * n_in), *dy = bput(&b, NULL, sizeof(float) * n * n_out);
                int32_t *doff = bput(&b, off, sizeof off[0] * (E + 1)), *dxrow = bput(&b, xrow, sizeof *xrow * n);
                be->ops->matmul_grouped(be, dy, dx, indexed ? dxrow : NULL, w, dt, doff, E, n_in, n_out, max_rows);
                float *y = xcalloc((size_t)(n ? n : 1) * n_out, sizeof(float));
                double *want = xcalloc((size_t)(n ? n : 1) * n_out, sizeof(double));
                double *tol = xcalloc((size_t)(n ? n : 1) * n_out, sizeof(double));
                bget(&b, y, dy, sizeof(float) * n * n_out);
                for (int e = 0; e < E; e++)
                    for (int s = off[e]; s < off[e + 1]; s++)
                        for (int r = 0; r < n_out; r++) {
                            const float *xr = x + (size_t)(indexed ? xrow[s] : s) * n_in;
                            size_t o = (size_t)s * n_out + r;
                            /* f32 x on a device (our kernel); the CPU quantizes x for Q8/Q4 */
                            matmul_ref(xr, wf + ((size_t)e * n_out + r) * n_in, n_in,
                                       is_quant(dt) && be->device == MOE_DEVICE_CPU, 0.0, &want[o], &tol[o]);
                        }
                char what[112];
                snprintf(what, sizeof what, "matmul_grouped/%s (%d experts, %d rows, max %d, in %d out %d, %s)",
                         moe_dtype_name(dt), E, n, max_rows, n_in, n_out, indexed ? "x_row" : "direct");
                expect_close(vars[v].label, what, cs, y, want, tol, (size_t)n * n_out);
                free(x);
                free(xrow);
                free(wf);
                free(y);
                free(want);
                free(tol);
                bfree_all(&b);
            }
        }
    }
}

/* ---- expert_combine ---- */

Test(backend_ops_moe, expert_combine, .init = setup, .fini = teardown)
{
    for (int v = 0; v < n_vars; v++) {
        moe_backend *be = use(v);
        if (skip(be, vars[v].label, MOE_OP_EXPERT_COMBINE, MOE_DT_F32))
            continue;
        for (int cs = 0; cs < 6; cs++) {
            bufs b = {.be = be};
            int n_tok = rint_in(1, 40), k = rint_in(1, 8), d = rint_in(1, 300), n = n_tok * k;
            float *out = xcalloc((size_t)n_tok * d, sizeof(float)), *y = xcalloc((size_t)n * d, sizeof(float));
            float *w = xcalloc((size_t)n, sizeof(float));
            int32_t *slot = xcalloc((size_t)n, sizeof *slot);
            rfill(out, (size_t)n_tok * d, -1.0f, 1.0f);
            rfill(y, (size_t)n * d, -3.0f, 3.0f);
            rfill(w, (size_t)n, 0.0f, 1.0f);
            for (int i = 0; i < n; i++) /* a permutation: every grouped row read once */
                slot[i] = i;
            for (int i = n - 1; i > 0; i--) {
                int j = rint_in(0, i), t = slot[i];
                slot[i] = slot[j];
                slot[j] = t;
            }
            float *dout = bput(&b, out, sizeof(float) * n_tok * d), *dy = bput(&b, y, sizeof(float) * n * d);
            float *dw = bput(&b, w, sizeof(float) * n);
            int32_t *dslot = bput(&b, slot, sizeof *slot * n);
            be->ops->expert_combine(be, dout, dy, dslot, dw, n_tok, k, d);
            float *got = xcalloc((size_t)n_tok * d, sizeof(float));
            double *want = xcalloc((size_t)n_tok * d, sizeof(double)), *tol = xcalloc((size_t)n_tok * d, sizeof(double));
            bget(&b, got, dout, sizeof(float) * n_tok * d);
            for (int t = 0; t < n_tok; t++)
                for (int c = 0; c < d; c++) {
                    double s = out[(size_t)t * d + c], mag = fabs(s);
                    for (int j = 0; j < k; j++) {
                        double term = (double)w[t * k + j] * y[(size_t)slot[t * k + j] * d + c];
                        s += term;
                        mag += fabs(term);
                    }
                    want[(size_t)t * d + c] = s;
                    tol[(size_t)t * d + c] = 1e-6 * mag + 1e-30;
                }
            expect_close(vars[v].label, "expert_combine", cs, got, want, tol, (size_t)n_tok * d);
            free(out);
            free(y);
            free(w);
            free(slot);
            free(got);
            free(want);
            free(tol);
            bfree_all(&b);
        }
    }
}

/* ---- the routed-expert block, composed as worker/moe_layer.c device_experts composes it ---- */

static double silu(double g) { return g / (1.0 + exp(-g)); }

Test(backend_ops_moe, expert_block, .init = setup, .fini = teardown)
{
    for (int v = 0; v < n_vars; v++) {
        moe_backend *be = use(v);
        for (size_t di = 0; di < N_DTS; di++) {
            moe_dtype dt = all_dts[di];
            if (skip(be, vars[v].label, MOE_OP_MATMUL_GROUPED, dt))
                continue;
            for (int cs = 0; cs < 3; cs++) {
                bufs b = {.be = be};
                int E = rint_in(2, 12), k = rint_in(1, E < 4 ? E : 4), T = rint_in(1, cs == 2 ? 50 : 7), n = T * k;
                int d = is_quant(dt) ? MOE_QK * rint_in(1, 3) : rint_in(1, 70);
                int ffn = is_quant(dt) ? MOE_QK * rint_in(1, 3) : rint_in(1, 70);
                float *x = xcalloc((size_t)T * d, sizeof(float)), *w = xcalloc((size_t)n, sizeof(float));
                int32_t *idx = xcalloc((size_t)n, sizeof *idx);
                rfill(x, (size_t)T * d, -1.0f, 1.0f);
                rfill(w, (size_t)n, 0.0f, 1.0f);
                random_choices(idx, T, k, E);
                float *wg = xcalloc((size_t)E * ffn * d, sizeof(float)), *wu = xcalloc((size_t)E * ffn * d, sizeof(float));
                float *wd = xcalloc((size_t)E * d * ffn, sizeof(float));
                const void *pg[12], *pu[12], *pd[12];
                for (int e = 0; e < E; e++) {
                    pg[e] = put_weight(&b, dt, ffn, d, wg + (size_t)e * ffn * d);
                    pu[e] = put_weight(&b, dt, ffn, d, wu + (size_t)e * ffn * d);
                    pd[e] = put_weight(&b, dt, d, ffn, wd + (size_t)e * d * ffn);
                }
                float *dx = bput(&b, x, sizeof(float) * T * d), *dw = bput(&b, w, sizeof(float) * n);
                int32_t *didx = bput(&b, idx, sizeof *idx * n), *doff = bput(&b, NULL, sizeof(int32_t) * (E + 1));
                int32_t *dsrc = bput(&b, NULL, sizeof(int32_t) * n), *dslot = bput(&b, NULL, sizeof(int32_t) * n);
                float *dg = bput(&b, NULL, sizeof(float) * n * ffn), *du = bput(&b, NULL, sizeof(float) * n * ffn);
                float *dd = bput(&b, NULL, sizeof(float) * n * d), *dout = bput(&b, NULL, sizeof(float) * T * d);
                const moe_backend_ops *o = be->ops;
                o->expert_sort(be, didx, T, k, E, doff, dsrc, dslot, NULL);
                o->matmul_grouped(be, dg, dx, dsrc, pg, dt, doff, E, d, ffn, T);
                o->matmul_grouped(be, du, dx, dsrc, pu, dt, doff, E, d, ffn, T);
                o->silu_mul(be, dg, du, (size_t)n * ffn);
                o->matmul_grouped(be, dd, dg, NULL, pd, dt, doff, E, ffn, d, T);
                o->expert_combine(be, dout, dd, dslot, dw, T, k, d);
                float *got = xcalloc((size_t)T * d, sizeof(float));
                double *want = xcalloc((size_t)T * d, sizeof(double)), *tol = xcalloc((size_t)T * d, sizeof(double));
                float *h = xcalloc((size_t)ffn, sizeof(float));
                double *eh = xcalloc((size_t)ffn, sizeof(double));
                bget(&b, got, dout, sizeof(float) * T * d);
                bool xq = is_quant(dt) && be->device == MOE_DEVICE_CPU; /* as in matmul_grouped */
                for (int t = 0; t < T; t++) {
                    const float *xt = x + (size_t)t * d;
                    for (int j = 0; j < k; j++) {
                        int e = idx[t * k + j];
                        /* gate and up with their bounds, carried through SwiGLU (|silu'| < 1.1) */
                        for (int r = 0; r < ffn; r++) {
                            double g, u, tg, tu;
                            matmul_ref(xt, wg + ((size_t)e * ffn + r) * d, d, xq, 0.0, &g, &tg);
                            matmul_ref(xt, wu + ((size_t)e * ffn + r) * d, d, xq, 0.0, &u, &tu);
                            double hv = silu(g) * u;
                            h[r] = (float)hv;
                            eh[r] = 1.1 * tg * (fabs(u) + tu) + fabs(silu(g)) * tu + 2e-6 * fabs(hv);
                        }
                        for (int c = 0; c < d; c++) {
                            const float *wr = wd + ((size_t)e * d + c) * ffn;
                            double s, ts, prop = 0;
                            matmul_ref(h, wr, ffn, xq, 0.0, &s, &ts);
                            for (int r = 0; r < ffn; r++)
                                prop += fabs(wr[r]) * eh[r];
                            want[(size_t)t * d + c] += w[t * k + j] * s;
                            tol[(size_t)t * d + c] += w[t * k + j] * (ts + prop) + 1e-6 * fabs(w[t * k + j] * s);
                        }
                    }
                }
                char what[96];
                snprintf(what, sizeof what, "expert block/%s (E %d k %d T %d d %d ffn %d)", moe_dtype_name(dt), E, k,
                         T, d, ffn);
                expect_close(vars[v].label, what, cs, got, want, tol, (size_t)T * d);
                free(x);
                free(w);
                free(idx);
                free(wg);
                free(wu);
                free(wd);
                free(got);
                free(want);
                free(tol);
                free(h);
                free(eh);
                bfree_all(&b);
            }
        }
    }
}
