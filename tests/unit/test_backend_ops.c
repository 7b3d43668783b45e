/* Backend conformance, in the style of ggml's test-backend-ops: every op of the compute interface
 * (worker/compute/backend.h) on every backend this machine has (the CPU backend under each ISA the
 * CPU runs: scalar, AVX2, AVX-512; CUDA when a GPU is visible, skipped with a note otherwise),
 * against a plain double-precision reference written here from the op's documented contract, on
 * random shapes including odd sizes. Inputs go in and results come out through the backend's own
 * alloc/upload/download, so a device backend is tested exactly as the forward pass drives it.
 *
 * Tolerances (|got - want| per element; docs/backends.md):
 *  - matmul f32/bf16/f16 weights: 1e-5 * sum_c |x_c w_c| + 1e-30 (f32 accumulation of exact
 *    products; on a device backend plus 2^-16 of it and 2^-24 per input: cuBLAS multiplies like
 *    types, so x goes as hi + lo halves of the weight's type); Q8/Q4 weights, n_tok < 48 or the CPU backend (x quantized to int8 blocks): plus
 *    sum_blocks amax_block(x) / 254 * sum_block |w| (half a step of x's scale per input);
 *  - rmsnorm, rope, silu_mul, gated_add, router weights: 2e-6 relative (a few f32 ulp, vector exp);
 *  - attention: 2e-5 * max |v| (online softmax against the two-pass reference);
 *  - axpy, add_rows, ep_combine: 1e-6 relative to |y| + |a x| (FMA contraction allowed);
 *  - embed, kv_write, clamp, gather, scatter, ep_pack, router indices: exact. */
#include "backend_test_util.h"

/* ---- matmul ---- */

Test(backend_ops, matmul, .init = setup, .fini = teardown)
{
    const moe_dtype dts[] = {MOE_DT_F32, MOE_DT_BF16, MOE_DT_F16, MOE_DT_Q8, MOE_DT_Q4};
    const int toks[] = {1, 2, 3, 5, 17, 47, 48, 53};
    for (int v = 0; v < n_vars; v++) {
        moe_backend *be = use(v);
        for (size_t di = 0; di < sizeof dts / sizeof dts[0]; di++) {
            moe_dtype dt = dts[di];
            if (skip(be, vars[v].label, MOE_OP_MATMUL, dt))
                continue;
            bool quant = dt == MOE_DT_Q8 || dt == MOE_DT_Q4;
            /* a device GEMM multiplies like types: x carried as hi + lo halves of the weight's type */
            double act_round = be->device != MOE_DEVICE_CPU && (dt == MOE_DT_BF16 || dt == MOE_DT_F16) ? 0x1p-16 : 0.0;
            for (int cs = 0; cs < 8; cs++) {
                bufs b = {.be = be};
                int n_tok = toks[cs], nd = rint_in(1, 3);
                int n_in = quant ? MOE_QK * rint_in(1, 9) : rint_in(1, 300);
                float *x = xcalloc((size_t)n_tok * n_in, sizeof(float));
                rfill(x, (size_t)n_tok * n_in, -2.0f, 2.0f);
                const float *dx = bput(&b, x, sizeof(float) * n_tok * n_in);
                moe_matmul_desc d[3];
                float *wf[3];
                int n_out[3];
                for (int k = 0; k < nd; k++) {
                    n_out[k] = rint_in(1, 77);
                    wf[k] = xcalloc((size_t)n_out[k] * n_in, sizeof(float));
                    void *w = make_weight(dt, n_out[k], n_in, wf[k]);
                    const void *dw = bput(&b, w, moe_dtype_row_bytes(dt, (size_t)n_in) * n_out[k]);
                    free(w);
                    float *dy = bput(&b, NULL, sizeof(float) * n_tok * n_out[k]);
                    d[k] = (moe_matmul_desc){dy, dx, dw, dt, n_tok, n_in, n_out[k]};
                }
                be->ops->matmul_batch(be, d, nd);
                for (int k = 0; k < nd; k++) {
                    size_t ny = (size_t)n_tok * n_out[k];
                    float *y = xcalloc(ny, sizeof(float));
                    double *want = xcalloc(ny, sizeof(double)), *tol = xcalloc(ny, sizeof(double));
                    bget(&b, y, d[k].y, sizeof(float) * ny);
                    for (int t = 0; t < n_tok; t++)
                        for (int r = 0; r < n_out[k]; r++) {
                            const float *xr = x + (size_t)t * n_in, *wr = wf[k] + (size_t)r * n_in;
                            /* The CPU backend quantizes x at every n_tok (batch invariance,
                             * docs/kernels.md); a device backend below 48 tokens. */
                            bool xq = quant && (n_tok < 48 || strncmp(vars[v].label, "cpu/", 4) == 0);
                            size_t o = (size_t)t * n_out[k] + r;
                            matmul_ref(xr, wr, n_in, xq, act_round, &want[o], &tol[o]);
                        }
                    char what[64];
                    snprintf(what, sizeof what, "matmul/%s (tok %d in %d out %d, desc %d of %d)",
                             moe_dtype_name(dt), n_tok, n_in, n_out[k], k, nd);
                    expect_close(vars[v].label, what, cs, y, want, tol, ny);
                    free(y);
                    free(want);
                    free(tol);
                    free(wf[k]);
                }
                free(x);
                bfree_all(&b);
            }
        }
    }
}

/* ---- embed ---- */

Test(backend_ops, embed, .init = setup, .fini = teardown)
{
    const moe_dtype dts[] = {MOE_DT_F32, MOE_DT_BF16, MOE_DT_F16};
    for (int v = 0; v < n_vars; v++) {
        moe_backend *be = use(v);
        for (int di = 0; di < 3; di++) {
            if (skip(be, vars[v].label, MOE_OP_EMBED, dts[di]))
                continue;
            bufs b = {.be = be};
            int vocab = rint_in(3, 50), d = rint_in(1, 99), n = rint_in(1, 13);
            float *tf = xcalloc((size_t)vocab * d, sizeof(float));
            void *tab = make_weight(dts[di], vocab, d, tf);
            const void *dtab = bput(&b, tab, moe_dtype_row_bytes(dts[di], (size_t)d) * vocab);
            int32_t tok[13];
            double *want = xcalloc((size_t)n * d, sizeof(double));
            for (int t = 0; t < n; t++) {
                tok[t] = rint_in(0, vocab - 1);
                for (int c = 0; c < d; c++)
                    want[(size_t)t * d + c] = tf[(size_t)tok[t] * d + c];
            }
            float *dx = bput(&b, NULL, sizeof(float) * n * d), *x = xcalloc((size_t)n * d, sizeof(float));
            be->ops->embed(be, dx, dtab, dts[di], tok, n, d);
            bget(&b, x, dx, sizeof(float) * n * d);
            expect_close(vars[v].label, moe_dtype_name(dts[di]), 0, x, want, NULL, (size_t)n * d);
            free(tf);
            free(tab);
            free(want);
            free(x);
            bfree_all(&b);
        }
    }
}

/* ---- element-wise ---- */

Test(backend_ops, rmsnorm, .init = setup, .fini = teardown)
{
    for (int v = 0; v < n_vars; v++) {
        moe_backend *be = use(v);
        for (int cs = 0; cs < 6; cs++) {
            bufs b = {.be = be};
            int rows = rint_in(1, 9), n = cs == 0 ? 1 : rint_in(2, 777);
            size_t N = (size_t)rows * n;
            float *x = xcalloc(N, sizeof(float)), *w = xcalloc((size_t)n, sizeof(float)),
                  *y = xcalloc(N, sizeof(float));
            rfill(x, N, -3.0f, 3.0f);
            rfill(w, (size_t)n, 0.5f, 1.5f);
            double *want = xcalloc(N, sizeof(double)), *tol = xcalloc(N, sizeof(double));
            for (int r = 0; r < rows; r++) {
                double ss = 0;
                for (int i = 0; i < n; i++)
                    ss += (double)x[(size_t)r * n + i] * x[(size_t)r * n + i];
                double inv = 1.0 / sqrt(ss / n + 1e-6);
                for (int i = 0; i < n; i++) {
                    size_t k = (size_t)r * n + i;
                    want[k] = x[k] * inv * w[i];
                    tol[k] = 2e-6 * fabs(want[k]) + 1e-30;
                }
            }
            float *dx = bput(&b, x, sizeof(float) * N);
            const float *dw = bput(&b, w, sizeof(float) * n);
            be->ops->rmsnorm(be, dx, dx, dw, rows, n, 1e-6f); /* in place, as the forward pass */
            bget(&b, y, dx, sizeof(float) * N);
            expect_close(vars[v].label, "rmsnorm", cs, y, want, tol, N);
            free(x);
            free(w);
            free(y);
            free(want);
            free(tol);
            bfree_all(&b);
        }
    }
}

Test(backend_ops, rope, .init = setup, .fini = teardown)
{
    for (int v = 0; v < n_vars; v++) {
        moe_backend *be = use(v);
        for (int cs = 0; cs < 5; cs++) {
            bufs b = {.be = be};
            int hd = 2 * rint_in(1, 40), nh = rint_in(1, 5), T = rint_in(1, 9), max_pos = 300;
            size_t stride = (size_t)nh * hd + (size_t)rint_in(0, 3), N = (size_t)T * stride;
            float *tab = xcalloc((size_t)max_pos * hd, sizeof(float));
            moe_rope_table(tab, max_pos, hd, 10000.0);
            float *x = xcalloc(N, sizeof(float)), *y = xcalloc(N, sizeof(float));
            rfill(x, N, -2.0f, 2.0f);
            int pos[9];
            double *want = xcalloc(N, sizeof(double)), *tol = xcalloc(N, sizeof(double));
            for (size_t i = 0; i < N; i++)
                want[i] = x[i];
            for (int t = 0; t < T; t++) {
                pos[t] = rint_in(0, max_pos - 1);
                const float *cs_ = tab + (size_t)pos[t] * hd;
                for (int h = 0; h < nh; h++) {
                    size_t o = (size_t)t * stride + (size_t)h * hd;
                    for (int i = 0; i < hd / 2; i++) {
                        double a = x[o + i], c = x[o + i + hd / 2], co = cs_[i], si = cs_[hd / 2 + i];
                        want[o + i] = a * co - c * si;
                        want[o + i + hd / 2] = c * co + a * si;
                    }
                }
            }
            for (size_t i = 0; i < N; i++) { /* two f32 products and a sum: a few ulp of the terms */
                size_t t = i / stride, o = i % stride;
                if (o >= (size_t)nh * hd) {
                    tol[i] = 0.0; /* padding between tokens stays untouched */
                    continue;
                }
                size_t h0 = t * stride + o / hd * hd, c = o % hd, m = c < (size_t)hd / 2 ? c + hd / 2 : c - hd / 2;
                tol[i] = 1e-6 * (fabs(x[h0 + c]) + fabs(x[h0 + m])) + 1e-30;
            }
            float *dx = bput(&b, x, sizeof(float) * N);
            const float *dt = bput(&b, tab, sizeof(float) * max_pos * hd);
            be->ops->rope(be, dx, T, stride, nh, hd, pos, dt);
            bget(&b, y, dx, sizeof(float) * N);
            expect_close(vars[v].label, "rope", cs, y, want, tol, N);
            free(tab);
            free(x);
            free(y);
            free(want);
            free(tol);
            bfree_all(&b);
        }
    }
}

/* silu_mul, axpy, add_rows, clamp, gated_add: one case each of odd length. */
Test(backend_ops, elementwise, .init = setup, .fini = teardown)
{
    for (int v = 0; v < n_vars; v++) {
        moe_backend *be = use(v);
        for (int cs = 0; cs < 4; cs++) {
            bufs b = {.be = be};
            int rows = rint_in(1, 7), n = rint_in(1, 333);
            size_t N = (size_t)rows * n;
            float *a = xcalloc(N, sizeof(float)), *c = xcalloc(N, sizeof(float)),
                  *g = xcalloc((size_t)rows, sizeof(float)), *bias = xcalloc((size_t)n, sizeof(float)),
                  *y = xcalloc(N, sizeof(float));
            rfill(a, N, -20.0f, 20.0f);
            rfill(c, N, -3.0f, 3.0f);
            rfill(g, (size_t)rows, -6.0f, 6.0f);
            rfill(bias, (size_t)n, -1.0f, 1.0f);
            double *want = xcalloc(N, sizeof(double)), *tol = xcalloc(N, sizeof(double));
            float sc = runif(-2.0f, 2.0f), lim = runif(0.5f, 10.0f);
            const float *dc = bput(&b, c, sizeof(float) * N), *dg = bput(&b, g, sizeof(float) * rows),
                        *db = bput(&b, bias, sizeof(float) * n);

            float *da = bput(&b, a, sizeof(float) * N);
            be->ops->silu_mul(be, da, dc, N);
            for (size_t i = 0; i < N; i++) {
                want[i] = a[i] / (1.0 + exp(-(double)a[i])) * c[i];
                tol[i] = 2e-6 * fabs(want[i]) + 1e-30;
            }
            bget(&b, y, da, sizeof(float) * N);
            expect_close(vars[v].label, "silu_mul", cs, y, want, tol, N);

            be->ops->upload(be, da, a, sizeof(float) * N);
            be->ops->axpy(be, da, sc, dc, N);
            for (size_t i = 0; i < N; i++) {
                want[i] = (double)a[i] + (double)sc * c[i];
                tol[i] = 1e-6 * (fabs(a[i]) + fabs(sc * c[i])) + 1e-30;
            }
            bget(&b, y, da, sizeof(float) * N);
            expect_close(vars[v].label, "axpy", cs, y, want, tol, N);

            be->ops->upload(be, da, a, sizeof(float) * N);
            be->ops->add_rows(be, da, db, rows, n);
            for (size_t i = 0; i < N; i++) {
                want[i] = (double)a[i] + bias[i % n];
                tol[i] = 1e-6 * (fabs(a[i]) + fabs(bias[i % n])) + 1e-30;
            }
            bget(&b, y, da, sizeof(float) * N);
            expect_close(vars[v].label, "add_rows", cs, y, want, tol, N);

            be->ops->upload(be, da, a, sizeof(float) * N);
            be->ops->clamp(be, da, N, lim);
            for (size_t i = 0; i < N; i++)
                want[i] = a[i] > lim ? lim : a[i] < -lim ? -lim : a[i];
            bget(&b, y, da, sizeof(float) * N);
            expect_close(vars[v].label, "clamp", cs, y, want, NULL, N);

            be->ops->upload(be, da, a, sizeof(float) * N);
            be->ops->gated_add(be, da, dg, dc, rows, n);
            for (size_t i = 0; i < N; i++) {
                double s = 1.0 / (1.0 + exp(-(double)g[i / n]));
                want[i] = (double)a[i] + s * c[i];
                tol[i] = 2e-6 * (fabs(a[i]) + fabs(s * c[i])) + 1e-30;
            }
            bget(&b, y, da, sizeof(float) * N);
            expect_close(vars[v].label, "gated_add", cs, y, want, tol, N);
            free(a);
            free(c);
            free(g);
            free(bias);
            free(y);
            free(want);
            free(tol);
            bfree_all(&b);
        }
    }
}

/* ---- routing ---- */

Test(backend_ops, router, .init = setup, .fini = teardown)
{
    for (int v = 0; v < n_vars; v++) {
        moe_backend *be = use(v);
        for (int cs = 0; cs < 6; cs++) {
            bufs b = {.be = be};
            int n = rint_in(1, 19), E = rint_in(2, 130), k = rint_in(1, E < 8 ? E : 8);
            bool renorm = cs & 1;
            size_t N = (size_t)n * E;
            float *lg = xcalloc(N, sizeof(float)), *w = xcalloc((size_t)n * k, sizeof(float));
            int32_t *idx = xcalloc((size_t)n * k, sizeof(int32_t));
            rfill(lg, N, -8.0f, 8.0f);
            float *dl = bput(&b, lg, sizeof(float) * N);
            int32_t *di = bput(&b, NULL, sizeof(int32_t) * n * k);
            float *dw = bput(&b, NULL, sizeof(float) * n * k);
            be->ops->router(be, dl, n, E, k, renorm, di, dw);
            bget(&b, idx, di, sizeof(int32_t) * n * k);
            bget(&b, w, dw, sizeof(float) * n * k);
            for (int t = 0; t < n; t++) {
                const float *p = lg + (size_t)t * E;
                double mx = -INFINITY, s = 0;
                for (int e = 0; e < E; e++)
                    mx = fmax(mx, p[e]);
                for (int e = 0; e < E; e++)
                    s += exp(p[e] - mx);
                bool used[130] = {0};
                double ws = 0, wk[8];
                for (int j = 0; j < k; j++) { /* largest first, ties to the lower index */
                    int best = -1;
                    for (int e = 0; e < E; e++)
                        if (!used[e] && (best < 0 || p[e] > p[best]))
                            best = e;
                    used[best] = true;
                    cr_assert_eq(idx[(size_t)t * k + j], best, "%s router case %d: row %d choice %d: expert %d, want %d",
                                 vars[v].label, cs, t, j, idx[(size_t)t * k + j], best);
                    wk[j] = exp(p[best] - mx) / s;
                    ws += wk[j];
                }
                for (int j = 0; j < k; j++) {
                    double want = renorm ? wk[j] / ws : wk[j], got = w[(size_t)t * k + j];
                    cr_assert_leq(fabs(got - want), 2e-6 * want + 1e-30, "%s router case %d: row %d weight %d: %.9g want %.9g",
                                  vars[v].label, cs, t, j, got, want);
                }
            }
            free(lg);
            free(w);
            free(idx);
            bfree_all(&b);
        }
    }
}

/* ---- row movement: gather, scatter, EP pack, EP combine ---- */

Test(backend_ops, rows, .init = setup, .fini = teardown)
{
    for (int v = 0; v < n_vars; v++) {
        moe_backend *be = use(v);
        for (int cs = 0; cs < 4; cs++) {
            bufs b = {.be = be};
            int n_src = rint_in(1, 20), n = rint_in(1, 40), d = rint_in(1, 130);
            size_t sst = (size_t)d + (size_t)rint_in(0, 2), dst_st = (size_t)d + (size_t)rint_in(0, 2);
            float *src = xcalloc((size_t)n_src * sst, sizeof(float));
            rfill(src, (size_t)n_src * sst, -5.0f, 5.0f);
            int idx[40], perm[40], at[40];
            int32_t tag[40];
            float w[40];
            for (int i = 0; i < n; i++) {
                idx[i] = rint_in(0, n_src - 1);
                tag[i] = (int32_t)rint_in(-3, 1000);
                w[i] = runif(-1.0f, 1.0f);
                perm[i] = i;
            }
            for (int i = n - 1; i > 0; i--) { /* scatter targets: a permutation (no two rows collide) */
                int j = rint_in(0, i), t = perm[i];
                perm[i] = perm[j];
                perm[j] = t;
            }
            memcpy(at, perm, sizeof at);
            const float *ds = bput(&b, src, sizeof(float) * n_src * sst);

            /* gather */
            size_t ng = (size_t)n * dst_st;
            float *dg = bput(&b, NULL, sizeof(float) * ng), *g = xcalloc(ng, sizeof(float));
            double *want = xcalloc((size_t)n * (d + 1) + ng + (size_t)n_src * sst, sizeof(double));
            be->ops->gather(be, dg, dst_st, ds, sst, idx, n, d);
            bget(&b, g, dg, sizeof(float) * ng);
            for (size_t i = 0; i < ng; i++)
                want[i] = (i % dst_st) < (size_t)d ? src[(size_t)idx[i / dst_st] * sst + i % dst_st] : 0.0;
            expect_close(vars[v].label, "gather", cs, g, want, NULL, ng);

            /* scatter src rows 0..n-1 (n <= n_src taken modulo) to rows perm[i] */
            int ns = n < n_src ? n : n_src;
            float *dsc = bput(&b, NULL, sizeof(float) * n * dst_st), *sc = xcalloc((size_t)n * dst_st, sizeof(float));
            int *tgt = perm, m = ns; /* distinct rows of dst */
            be->ops->scatter(be, dsc, dst_st, ds, sst, tgt, m, d);
            bget(&b, sc, dsc, sizeof(float) * n * dst_st);
            for (size_t i = 0; i < (size_t)n * dst_st; i++)
                want[i] = 0.0;
            for (int i = 0; i < m; i++)
                for (int c = 0; c < d; c++)
                    want[(size_t)tgt[i] * dst_st + c] = src[(size_t)i * sst + c];
            expect_close(vars[v].label, "scatter", cs, sc, want, NULL, (size_t)n * dst_st);

            /* EP pack: rows of d from a dense (n_src, d) source, then the tag's bits */
            float *dense = xcalloc((size_t)n_src * d, sizeof(float));
            for (int r = 0; r < n_src; r++)
                memcpy(dense + (size_t)r * d, src + (size_t)r * sst, sizeof(float) * d);
            const float *dd = bput(&b, dense, sizeof(float) * n_src * d);
            size_t np = (size_t)n * (d + 1);
            float *dp = bput(&b, NULL, sizeof(float) * np), *pk = xcalloc(np, sizeof(float));
            be->ops->ep_pack(be, dp, dd, idx, tag, n, d);
            bget(&b, pk, dp, sizeof(float) * np);
            for (int i = 0; i < n; i++) {
                cr_assert_eq(memcmp(pk + (size_t)i * (d + 1), dense + (size_t)idx[i] * d, sizeof(float) * d), 0,
                             "%s ep_pack case %d row %d", vars[v].label, cs, i);
                int32_t t;
                memcpy(&t, pk + (size_t)i * (d + 1) + d, sizeof t);
                cr_assert_eq(t, tag[i], "%s ep_pack case %d row %d: tag %d want %d", vars[v].label, cs, i, t, tag[i]);
            }

            /* EP combine: out row idx[s] += w[s] * back row at[s] (back: n rows), in order */
            float *back = xcalloc((size_t)n * d, sizeof(float)), *out0 = xcalloc((size_t)n_src * d, sizeof(float));
            rfill(back, (size_t)n * d, -2.0f, 2.0f);
            rfill(out0, (size_t)n_src * d, -2.0f, 2.0f);
            const float *dbk = bput(&b, back, sizeof(float) * n * d);
            float *dout = bput(&b, out0, sizeof(float) * n_src * d), *out = xcalloc((size_t)n_src * d, sizeof(float));
            bool with_at = cs & 1;
            be->ops->ep_combine(be, dout, dbk, idx, w, with_at ? at : NULL, n, d);
            bget(&b, out, dout, sizeof(float) * n_src * d);
            double *tol = xcalloc((size_t)n_src * d, sizeof(double));
            for (size_t i = 0; i < (size_t)n_src * d; i++) {
                want[i] = out0[i];
                tol[i] = 1e-6 * fabs(out0[i]) + 1e-30;
            }
            for (int s = 0; s < n; s++)
                for (int c = 0; c < d; c++) {
                    double add = (double)w[s] * back[(size_t)(with_at ? at[s] : s) * d + c];
                    want[(size_t)idx[s] * d + c] += add;
                    tol[(size_t)idx[s] * d + c] += 1e-6 * (fabs(want[(size_t)idx[s] * d + c]) + fabs(add));
                }
            expect_close(vars[v].label, "ep_combine", cs, out, want, tol, (size_t)n_src * d);
            free(src);
            free(g);
            free(want);
            free(sc);
            free(dense);
            free(pk);
            free(back);
            free(out0);
            free(out);
            free(tol);
            bfree_all(&b);
        }
    }
}

/* ---- the KV pool: kv_write then paged attention ---- */

Test(backend_ops, kv_attention, .init = setup, .fini = teardown)
{
    for (int v = 0; v < n_vars; v++) {
        moe_backend *be = use(v);
        for (int cs = 0; cs < 6; cs++) {
            bufs b = {.be = be};
            moe_kv_geom g = {.n_layers = rint_in(1, 3), .n_kv_head = rint_in(1, 3),
                             .head_dim = cs == 0 ? 1 : rint_in(2, 70), .block_size = rint_in(1, 17)};
            int group = rint_in(1, 4), nh = g.n_kv_head * group, hd = g.head_dim, layer = rint_in(0, g.n_layers - 1);
            int n_segs = rint_in(1, 3), kvdim = g.n_kv_head * hd, qdim = nh * hd;
            /* segments: a prefill chunk after some context, or a decode token */
            moe_attn_seg segs[3];
            int *tables[3], T = 0, nblk_total = 0;
            int ctx[3];
            for (int s = 0; s < n_segs; s++) {
                ctx[s] = rint_in(0, 90);
                int ntok = rint_in(1, 20);
                segs[s] = (moe_attn_seg){.pos0 = ctx[s], .tok_begin = T, .n = ntok};
                T += ntok;
                nblk_total += (ctx[s] + ntok + g.block_size - 1) / g.block_size;
            }
            int n_blocks = nblk_total + 3;
            /* shuffled block ids across sequences */
            int *ids = xcalloc((size_t)n_blocks, sizeof(int));
            for (int i = 0; i < n_blocks; i++)
                ids[i] = i;
            for (int i = n_blocks - 1; i > 0; i--) {
                int j = rint_in(0, i), t = ids[i];
                ids[i] = ids[j];
                ids[j] = t;
            }
            for (int s = 0, o = 0; s < n_segs; s++) {
                int nb = (segs[s].pos0 + segs[s].n + g.block_size - 1) / g.block_size;
                tables[s] = ids + o;
                segs[s].blocks = tables[s];
                o += nb;
            }
            size_t block_floats = (size_t)g.n_layers * 2 * kvdim * g.block_size;
            size_t pool_n = block_floats * n_blocks;
            /* host model of the pool: earlier context written directly, this step's K/V through kv_write */
            float *pool = xcalloc(pool_n, sizeof(float));
            size_t ls = 2 * (size_t)kvdim * g.block_size;
            int max_ctx = 0;
            for (int s = 0; s < n_segs; s++)
                if (segs[s].pos0 + segs[s].n > max_ctx)
                    max_ctx = segs[s].pos0 + segs[s].n;
            /* K/V of every position of every sequence (host reference) */
            float *K = xcalloc((size_t)n_segs * max_ctx * kvdim, sizeof(float)),
                  *V = xcalloc((size_t)n_segs * max_ctx * kvdim, sizeof(float));
            rfill(K, (size_t)n_segs * max_ctx * kvdim, -2.0f, 2.0f);
            rfill(V, (size_t)n_segs * max_ctx * kvdim, -2.0f, 2.0f);
            for (int s = 0; s < n_segs; s++)
                for (int p = 0; p < segs[s].pos0; p++) {
                    int blk = tables[s][p / g.block_size], slot = p % g.block_size;
                    for (int h = 0; h < g.n_kv_head; h++) {
                        size_t off = (size_t)blk * block_floats + (size_t)layer * ls + ((size_t)h * g.block_size + slot) * hd;
                        memcpy(pool + off, K + ((size_t)s * max_ctx + p) * kvdim + (size_t)h * hd, sizeof(float) * hd);
                        memcpy(pool + off + ls / 2, V + ((size_t)s * max_ctx + p) * kvdim + (size_t)h * hd, sizeof(float) * hd);
                    }
                }
            float *kstep = xcalloc((size_t)T * kvdim, sizeof(float)), *vstep = xcalloc((size_t)T * kvdim, sizeof(float));
            int *dst = xcalloc((size_t)T, sizeof(int));
            for (int s = 0; s < n_segs; s++)
                for (int i = 0; i < segs[s].n; i++) {
                    int t = segs[s].tok_begin + i, p = segs[s].pos0 + i;
                    memcpy(kstep + (size_t)t * kvdim, K + ((size_t)s * max_ctx + p) * kvdim, sizeof(float) * kvdim);
                    memcpy(vstep + (size_t)t * kvdim, V + ((size_t)s * max_ctx + p) * kvdim, sizeof(float) * kvdim);
                    dst[t] = tables[s][p / g.block_size] * g.block_size + p % g.block_size;
                }
            float *q = xcalloc((size_t)T * qdim, sizeof(float)), *out = xcalloc((size_t)T * qdim, sizeof(float));
            rfill(q, (size_t)T * qdim, -3.0f, 3.0f);
            float *dpool = bput(&b, pool, sizeof(float) * pool_n);
            const float *dk = bput(&b, kstep, sizeof(float) * T * kvdim), *dv = bput(&b, vstep, sizeof(float) * T * kvdim),
                        *dq = bput(&b, q, sizeof(float) * T * qdim);
            float *dout = bput(&b, NULL, sizeof(float) * T * qdim);
            cr_assert_eq(be->ops->reserve(be, n_segs, (max_ctx + g.block_size - 1) / g.block_size, g.n_kv_head, T), MOE_OK);
            be->ops->kv_write(be, dpool, &g, layer, dk, dv, dst, T);
            /* kv_write: the pool must now equal the host model with this step's rows added */
            for (int t = 0; t < T; t++) {
                int blk = dst[t] / g.block_size, slot = dst[t] % g.block_size;
                for (int h = 0; h < g.n_kv_head; h++) {
                    size_t off = (size_t)blk * block_floats + (size_t)layer * ls + ((size_t)h * g.block_size + slot) * hd;
                    memcpy(pool + off, kstep + (size_t)t * kvdim + (size_t)h * hd, sizeof(float) * hd);
                    memcpy(pool + off + ls / 2, vstep + (size_t)t * kvdim + (size_t)h * hd, sizeof(float) * hd);
                }
            }
            float *pool_got = xcalloc(pool_n, sizeof(float));
            bget(&b, pool_got, dpool, sizeof(float) * pool_n);
            cr_assert_eq(memcmp(pool_got, pool, sizeof(float) * pool_n), 0, "%s kv_write case %d", vars[v].label, cs);

            float scale = 1.0f / sqrtf((float)hd);
            be->ops->attention(be, dout, dq, dpool, &g, layer, segs, n_segs, nh, scale);
            bget(&b, out, dout, sizeof(float) * T * qdim);
            double *want = xcalloc((size_t)T * qdim, sizeof(double)), *tol = xcalloc((size_t)T * qdim, sizeof(double));
            double *sc = xcalloc((size_t)max_ctx, sizeof(double));
            for (int s = 0; s < n_segs; s++)
                for (int i = 0; i < segs[s].n; i++) {
                    int t = segs[s].tok_begin + i, n_ctx = segs[s].pos0 + i + 1;
                    for (int h = 0; h < nh; h++) {
                        int kh = h / group;
                        const float *qh = q + (size_t)t * qdim + (size_t)h * hd;
                        double mx = -INFINITY, den = 0, vmax = 0;
                        for (int j = 0; j < n_ctx; j++) {
                            const float *kj = K + ((size_t)s * max_ctx + j) * kvdim + (size_t)kh * hd;
                            double dot = 0;
                            for (int c = 0; c < hd; c++)
                                dot += (double)qh[c] * kj[c];
                            sc[j] = dot * scale;
                            mx = fmax(mx, sc[j]);
                        }
                        for (int j = 0; j < n_ctx; j++)
                            den += (sc[j] = exp(sc[j] - mx));
                        for (int c = 0; c < hd; c++) {
                            double o = 0;
                            for (int j = 0; j < n_ctx; j++) {
                                double vv = V[((size_t)s * max_ctx + j) * kvdim + (size_t)kh * hd + c];
                                o += sc[j] * vv;
                                vmax = fmax(vmax, fabs(vv));
                            }
                            want[(size_t)t * qdim + (size_t)h * hd + c] = o / den;
                        }
                        for (int c = 0; c < hd; c++)
                            tol[(size_t)t * qdim + (size_t)h * hd + c] = 2e-5 * (vmax > 0 ? vmax : 1.0);
                    }
                }
            char what[96];
            snprintf(what, sizeof what, "attention (heads %d/%d, head_dim %d, block %d, segs %d)", nh,
                     g.n_kv_head, hd, g.block_size, n_segs);
            expect_close(vars[v].label, what, cs, out, want, tol, (size_t)T * qdim);
            free(ids);
            free(pool);
            free(pool_got);
            free(K);
            free(V);
            free(kstep);
            free(vstep);
            free(dst);
            free(q);
            free(out);
            free(want);
            free(tol);
            free(sc);
            bfree_all(&b);
        }
    }
}

/* The device the caller named must exist, or the error says why (no GPU here: this path). */
Test(backend_ops, device_names_and_cuda_absence)
{
    moe_device d;
    cr_assert_eq(moe_device_parse("cpu", &d), MOE_OK);
    cr_assert_eq(d, MOE_DEVICE_CPU);
    cr_assert_eq(moe_device_parse("cuda", &d), MOE_OK);
    cr_assert_eq(d, MOE_DEVICE_CUDA);
    cr_assert_eq(moe_device_parse("tpu", &d), MOE_ERR_INVALID_ARG);
    cr_assert(strstr(moe_error_message(), "tpu"));
    moe_backend *be = NULL;
    moe_status st = moe_backend_create(MOE_DEVICE_CUDA, 0, NULL, &be);
    if (st == MOE_OK) {
        cr_log_info("cuda backend present: %s", be->ops->describe(be));
        moe_backend_free(be);
    } else {
        cr_assert_eq(st, MOE_ERR_UNAVAILABLE);
        cr_assert(strstr(moe_error_message(), "cuda") || strstr(moe_error_message(), "CUDA"),
                  "message: %s", moe_error_message());
    }
}
