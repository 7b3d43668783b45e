/* The cost model and its profile file (JSON, cJSON). */
#include "tools/moe_plan/costs.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cjson/cJSON.h>

#include "common/file.h"

void mp_costs_init(mp_costs *c)
{
    memset(c, 0, sizeof *c);
    c->block_size = 16;
    c->max_batch_tokens = 512;
    c->max_seqs = 64;
    c->kv_blocks = 4096;
    c->xfer_gbps = 5;
    c->xfer_latency_ms = 0.05;
    c->dispatch_ms = 0.5;
    c->token_path_ms = 0.3;
    c->step_overhead_ms = 0.1;
}

static double interp(const double *x, const double *y, int n, double v)
{
    if (n == 0)
        return 0;
    if (n == 1)
        return y[0] * (v / x[0]);
    int i = 1;
    while (i < n - 1 && v > x[i])
        i++;
    double r = y[i - 1] + (y[i] - y[i - 1]) * (v - x[i - 1]) / (x[i] - x[i - 1]);
    /* Below the first point: no cheaper than it (a step has a fixed part). */
    if (v < x[0])
        r = y[0];
    return r > 0 ? r : 0;
}

/* The step curve in use: CPU times when an availability curve stretches them, else wall times. */
static bool use_cpu(const mp_costs *c) { return (c->n_av > 0 || c->cpu_steps) && c->has_cpu; }
static double step_T(const mp_costs *c, double n) { return interp(c->tok, use_cpu(c) ? c->ms_cpu : c->ms, c->n_pts, n); }
static double step_k(const mp_costs *c) { return use_cpu(c) ? c->attn_cpu_ms : c->attn_ms; }

double mp_step_ms(const mp_costs *c, int n_tokens, double attn_work)
{
    if (n_tokens <= 0)
        return 0;
    return step_T(c, n_tokens) + step_k(c) * attn_work + c->step_overhead_ms;
}

static int avail_bin(const mp_costs *c, double cpu_ms)
{
    int b = 0;
    double best = INFINITY, l = log(cpu_ms > 1e-3 ? cpu_ms : 1e-3);
    for (int i = 0; i < c->n_av; i++) {
        double d = fabs(log(c->av_cpu[i]) - l);
        if (d < best && c->av_n[i] > 0) {
            best = d;
            b = i;
        }
    }
    return b;
}

double mp_avail_ratio(const mp_costs *c, double cpu_ms, long draw)
{
    if (c->n_av == 0)
        return 1;
    int b = avail_bin(c, cpu_ms), n = c->av_n[b];
    if (draw >= 0)
        return c->av_ratio[b][draw % n];
    double sum = 0;
    for (int i = 0; i < n; i++)
        sum += c->av_ratio[b][i];
    return sum / n;
}

double mp_avail_ratio_at(const mp_costs *c, double cpu_ms, double t_s, long draw)
{
    if (c->n_av == 0 || !c->av_timed || !c->av_has_t)
        return mp_avail_ratio(c, cpu_ms, draw);
    int b = avail_bin(c, cpu_ms), lo = 0, hi = c->av_n[b] - 1;
    const float *t = c->av_t[b];
    while (lo < hi) { /* the first sample at or after t_s */
        int mid = (lo + hi) / 2;
        if (t[mid] < t_s)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo > 0 && t_s - t[lo - 1] < t[lo] - t_s)
        lo--;
    return c->av_ratio[b][lo];
}

static double share_at(const mp_costs *c, int l, int n)
{
    if (n <= c->n_share)
        return c->share[l][n - 1];
    return c->share[l][c->n_share - 1] * n / c->n_share;
}

double mp_share_ratio(const mp_costs *c, int n_busy, double cpu_ms, int cores)
{
    if (n_busy < 1)
        n_busy = 1;
    if (c->n_share < 1 || c->n_share_lens < 1)
        return cores > 0 && n_busy > cores ? (double)n_busy / cores : 1;
    int nl = c->n_share_lens;
    double x = log(cpu_ms > 1e-3 ? cpu_ms : 1e-3);
    if (nl == 1 || x <= log(c->share_cpu[0]))
        return share_at(c, 0, n_busy);
    if (x >= log(c->share_cpu[nl - 1]))
        return share_at(c, nl - 1, n_busy);
    int i = 1;
    while (x > log(c->share_cpu[i]))
        i++;
    double a = log(c->share_cpu[i - 1]), b = log(c->share_cpu[i]), u = (x - a) / (b - a);
    return (1 - u) * share_at(c, i - 1, n_busy) + u * share_at(c, i, n_busy);
}

double mp_xfer_ms(const mp_costs *c, const mp_net *net, double bytes)
{
    double gbps = net && net->set ? net->gbps : c->xfer_gbps;
    double lat = net && net->set ? net->latency_ms : c->xfer_latency_ms;
    return lat + bytes / (gbps * 1e9) * 1e3;
}

double mp_a2a_ms(const mp_costs *c, const mp_net *net, int ep, double tokens)
{
    if (ep <= 1)
        return 0;
    if (!(net && net->set)) {
        double x[MP_MAX_A2A], y[MP_MAX_A2A];
        int n = 0;
        for (int i = 0; i < c->n_a2a; i++)
            if (c->a2a[i].ep == ep) {
                x[n] = c->a2a[i].tokens;
                y[n++] = c->a2a[i].ms;
            }
        if (n >= 2)
            return interp(x, y, n, tokens);
    }
    /* The network model: every rank sends (ep-1)/ep of its top-k rows (f32 hidden) and receives as
     * many, over one link each way; one message latency per peer round. */
    double bytes = tokens * c->top_k * c->hidden * 4.0 * (ep - 1) / ep;
    double gbps = net && net->set ? net->gbps : c->xfer_gbps;
    double lat = net && net->set ? net->latency_ms : c->xfer_latency_ms;
    return lat + bytes / (gbps * 1e9) * 1e3;
}

double mp_ep_step_ms(const mp_costs *c, const mp_net *net, int ep, const int *n, const double *attn)
{
    if (ep <= 1)
        return mp_step_ms(c, n[0], attn[0]);
    int total = 0;
    double slowest = 0;
    for (int r = 0; r < ep; r++) {
        total += n[r];
        double t = n[r] ? (1 - c->expert_frac) * step_T(c, n[r]) + step_k(c) * attn[r] : 0;
        if (t > slowest)
            slowest = t;
    }
    if (total == 0)
        return 0;
    double experts = c->expert_frac * step_T(c, total) / ep;
    return slowest + experts + mp_ep_comm_ms(c, net, ep, n) + c->step_overhead_ms;
}

double mp_ep_comm_ms(const mp_costs *c, const mp_net *net, int ep, const int *n)
{
    if (ep <= 1)
        return 0;
    int max_n = 0;
    for (int r = 0; r < ep; r++)
        if (n[r] > max_n)
            max_n = n[r];
    return 2.0 * c->moe_layers * mp_a2a_ms(c, net, ep, (double)max_n);
}

/* ---- the files ---- */

static moe_status need_num(const cJSON *o, const char *k, const char *path, double *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (!cJSON_IsNumber(v))
        return moe_error(MOE_ERR_FORMAT, "%s: field '%s' missing or not a number", path, k);
    *out = v->valuedouble;
    return MOE_OK;
}

static void opt_num(const cJSON *o, const char *k, double *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (cJSON_IsNumber(v))
        *out = v->valuedouble;
}

static void opt_int(const cJSON *o, const char *k, int *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (cJSON_IsNumber(v))
        *out = (int)v->valuedouble;
}

static void opt_str(const cJSON *o, const char *k, char *out, size_t cap)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (cJSON_IsString(v))
        snprintf(out, cap, "%s", v->valuestring);
}

static moe_status read_json(const char *path, cJSON **out)
{
    char *text;
    moe_status st = moe_read_file(path, 16 << 20, &text, NULL);
    if (st != MOE_OK)
        return st;
    *out = cJSON_Parse(text);
    free(text);
    return *out ? MOE_OK : moe_error(MOE_ERR_FORMAT, "%s: not valid JSON", path);
}

/* "share": {"cpu_ms": [L lengths, increasing], "ratio": [L arrays of the stretch with 1, 2, ...
 * busy ranks], "cpus": the CPUs it was measured on}: optional (profiles written before it have
 * none; "cpus" came later). */
static moe_status load_share(const cJSON *j, const char *path, mp_costs *c)
{
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(j, "share");
    if (!sh)
        return MOE_OK;
    const cJSON *cpu = cJSON_GetObjectItemCaseSensitive(sh, "cpu_ms");
    const cJSON *rat = cJSON_GetObjectItemCaseSensitive(sh, "ratio");
    int nl = cJSON_GetArraySize(cpu);
    if (!cJSON_IsArray(cpu) || !cJSON_IsArray(rat) || nl < 1 || nl > MP_SHARE_LENS || cJSON_GetArraySize(rat) != nl)
        return moe_error(MOE_ERR_FORMAT, "%s: share.cpu_ms and share.ratio must be arrays of 1..%d, alike", path,
                         MP_SHARE_LENS);
    int nb = cJSON_GetArraySize(cJSON_GetArrayItem(rat, 0));
    if (nb < 1 || nb > MP_MAX_SHARE)
        return moe_error(MOE_ERR_FORMAT, "%s: share.ratio rows must hold 1..%d numbers", path, MP_MAX_SHARE);
    for (int l = 0; l < nl; l++) {
        const cJSON *cl = cJSON_GetArrayItem(cpu, l), *row = cJSON_GetArrayItem(rat, l);
        if (!cJSON_IsNumber(cl) || cl->valuedouble <= 0 || (l && cl->valuedouble <= c->share_cpu[l - 1]) ||
            cJSON_GetArraySize(row) != nb)
            return moe_error(MOE_ERR_FORMAT, "%s: share length %d: cpu_ms must increase and rows be of %d numbers",
                             path, l, nb);
        c->share_cpu[l] = cl->valuedouble;
        for (int n = 0; n < nb; n++) {
            const cJSON *v = cJSON_GetArrayItem(row, n);
            if (!cJSON_IsNumber(v) || v->valuedouble <= 0)
                return moe_error(MOE_ERR_FORMAT, "%s: share.ratio[%d][%d] is not a positive number", path, l, n);
            /* Below 1 is a clock's rounding: never faster than the CPU. */
            c->share[l][n] = v->valuedouble >= 1 ? v->valuedouble : 1;
        }
    }
    c->n_share_lens = nl;
    c->n_share = nb;
    const cJSON *cpus = cJSON_GetObjectItemCaseSensitive(sh, "cpus");
    c->share_cpus = cJSON_IsNumber(cpus) && cpus->valuedouble >= 1 ? (int)cpus->valuedouble : 0;
    return MOE_OK;
}

moe_status mp_costs_load(const char *path, mp_costs *c)
{
    cJSON *j;
    moe_status st = read_json(path, &j);
    if (st != MOE_OK)
        return st;
    mp_costs_init(c);
    opt_str(j, "model", c->model, sizeof c->model);
    opt_str(j, "cpu", c->cpu, sizeof c->cpu);
    opt_str(j, "note", c->note, sizeof c->note);
    opt_int(j, "threads", &c->threads);
    const cJSON *eng = cJSON_GetObjectItemCaseSensitive(j, "engine");
    opt_int(eng, "block_size", &c->block_size);
    opt_int(eng, "max_batch_tokens", &c->max_batch_tokens);
    opt_int(eng, "max_seqs", &c->max_seqs);
    opt_int(eng, "kv_blocks", &c->kv_blocks);
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(j, "model_shape");
    double v = 0;
    if ((st = need_num(m, "kv_bytes_per_token", path, &c->kv_bytes_per_token)) != MOE_OK ||
        (st = need_num(m, "n_layers", path, &v)) != MOE_OK)
        goto out;
    c->n_layers = (int)v;
    opt_int(m, "moe_layers", &c->moe_layers);
    opt_int(m, "hidden", &c->hidden);
    opt_int(m, "top_k", &c->top_k);
    opt_int(m, "n_experts", &c->n_experts);
    opt_num(m, "expert_frac", &c->expert_frac);
    const cJSON *step = cJSON_GetObjectItemCaseSensitive(j, "step");
    const cJSON *tok = cJSON_GetObjectItemCaseSensitive(step, "tokens");
    const cJSON *ms = cJSON_GetObjectItemCaseSensitive(step, "ms");
    if (!cJSON_IsArray(tok) || !cJSON_IsArray(ms) || cJSON_GetArraySize(tok) != cJSON_GetArraySize(ms) ||
        cJSON_GetArraySize(tok) < 1 || cJSON_GetArraySize(tok) > MP_MAX_PTS) {
        st = moe_error(MOE_ERR_FORMAT, "%s: step.tokens and step.ms must be arrays of 1..%d numbers, alike",
                       path, MP_MAX_PTS);
        goto out;
    }
    c->n_pts = cJSON_GetArraySize(tok);
    for (int i = 0; i < c->n_pts; i++) {
        const cJSON *a = cJSON_GetArrayItem(tok, i), *b = cJSON_GetArrayItem(ms, i);
        if (!cJSON_IsNumber(a) || !cJSON_IsNumber(b) || (i && a->valuedouble <= c->tok[i - 1])) {
            st = moe_error(MOE_ERR_FORMAT, "%s: step point %d is not an increasing number pair", path, i);
            goto out;
        }
        c->tok[i] = a->valuedouble;
        c->ms[i] = b->valuedouble;
    }
    if ((st = need_num(step, "attn_ms", path, &c->attn_ms)) != MOE_OK)
        goto out;
    const cJSON *msc = cJSON_GetObjectItemCaseSensitive(step, "ms_cpu");
    if (cJSON_IsArray(msc) && cJSON_GetArraySize(msc) == c->n_pts &&
        need_num(step, "attn_cpu_ms", path, &c->attn_cpu_ms) == MOE_OK) {
        c->has_cpu = true;
        for (int i = 0; i < c->n_pts; i++) {
            const cJSON *b = cJSON_GetArrayItem(msc, i);
            c->has_cpu &= cJSON_IsNumber(b);
            c->ms_cpu[i] = cJSON_IsNumber(b) ? b->valuedouble : 0;
        }
    }
    moe_error_clear();
    const cJSON *smp = cJSON_GetObjectItemCaseSensitive(step, "samples"), *row;
    cJSON_ArrayForEach(row, smp)
    {
        int cols = cJSON_GetArraySize(row);
        if (c->n_samples == MP_MAX_SAMPLES || cols < 3 || cols > 4)
            break;
        for (int k = 0; k < cols; k++) {
            const cJSON *v3 = cJSON_GetArrayItem(row, k);
            c->samples[c->n_samples][k] = cJSON_IsNumber(v3) ? v3->valuedouble : 0;
        }
        c->n_samples++;
    }
    if ((st = load_share(j, path, c)) != MOE_OK)
        goto out;
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(j, "kv_transfer");
    opt_num(x, "gbps", &c->xfer_gbps);
    opt_num(x, "latency_ms", &c->xfer_latency_ms);
    const cJSON *ov = cJSON_GetObjectItemCaseSensitive(j, "overheads");
    opt_num(ov, "dispatch_ms", &c->dispatch_ms);
    opt_num(ov, "token_path_ms", &c->token_path_ms);
    opt_num(ov, "step_overhead_ms", &c->step_overhead_ms);
    opt_num(ov, "handoff_ms", &c->handoff_ms);
    const cJSON *a2a = cJSON_GetObjectItemCaseSensitive(j, "a2a"), *e;
    cJSON_ArrayForEach(e, a2a)
    {
        if (c->n_a2a == MP_MAX_A2A)
            break;
        mp_a2a_pt p = {0};
        opt_int(e, "ep", &p.ep);
        opt_num(e, "tokens", &p.tokens);
        opt_num(e, "ms", &p.ms);
        if (p.ep > 1)
            c->a2a[c->n_a2a++] = p;
    }
out:
    cJSON_Delete(j);
    return st;
}

moe_status mp_costs_save(const char *path, const mp_costs *c)
{
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "model", c->model);
    cJSON_AddStringToObject(j, "cpu", c->cpu);
    cJSON_AddStringToObject(j, "note", c->note);
    cJSON_AddNumberToObject(j, "threads", c->threads);
    cJSON *eng = cJSON_AddObjectToObject(j, "engine");
    cJSON_AddNumberToObject(eng, "block_size", c->block_size);
    cJSON_AddNumberToObject(eng, "max_batch_tokens", c->max_batch_tokens);
    cJSON_AddNumberToObject(eng, "max_seqs", c->max_seqs);
    cJSON_AddNumberToObject(eng, "kv_blocks", c->kv_blocks);
    cJSON *m = cJSON_AddObjectToObject(j, "model_shape");
    cJSON_AddNumberToObject(m, "n_layers", c->n_layers);
    cJSON_AddNumberToObject(m, "moe_layers", c->moe_layers);
    cJSON_AddNumberToObject(m, "hidden", c->hidden);
    cJSON_AddNumberToObject(m, "top_k", c->top_k);
    cJSON_AddNumberToObject(m, "n_experts", c->n_experts);
    cJSON_AddNumberToObject(m, "kv_bytes_per_token", c->kv_bytes_per_token);
    cJSON_AddNumberToObject(m, "expert_frac", c->expert_frac);
    cJSON *step = cJSON_AddObjectToObject(j, "step");
    cJSON_AddItemToObject(step, "tokens", cJSON_CreateDoubleArray(c->tok, c->n_pts));
    cJSON_AddItemToObject(step, "ms", cJSON_CreateDoubleArray(c->ms, c->n_pts));
    cJSON_AddNumberToObject(step, "attn_ms", c->attn_ms);
    if (c->has_cpu) {
        cJSON_AddItemToObject(step, "ms_cpu", cJSON_CreateDoubleArray(c->ms_cpu, c->n_pts));
        cJSON_AddNumberToObject(step, "attn_cpu_ms", c->attn_cpu_ms);
    }
    cJSON *smp = cJSON_AddArrayToObject(step, "samples");
    for (int i = 0; i < c->n_samples; i++)
        cJSON_AddItemToArray(smp, cJSON_CreateDoubleArray(c->samples[i], c->has_cpu ? 4 : 3));
    if (c->n_share > 0) {
        cJSON *sh = cJSON_AddObjectToObject(j, "share");
        cJSON_AddItemToObject(sh, "cpu_ms", cJSON_CreateDoubleArray(c->share_cpu, c->n_share_lens));
        cJSON *rat = cJSON_AddArrayToObject(sh, "ratio");
        for (int l = 0; l < c->n_share_lens; l++)
            cJSON_AddItemToArray(rat, cJSON_CreateDoubleArray(c->share[l], c->n_share));
        if (c->share_cpus > 0)
            cJSON_AddNumberToObject(sh, "cpus", c->share_cpus);
    }
    cJSON *x = cJSON_AddObjectToObject(j, "kv_transfer");
    cJSON_AddNumberToObject(x, "gbps", c->xfer_gbps);
    cJSON_AddNumberToObject(x, "latency_ms", c->xfer_latency_ms);
    cJSON *ov = cJSON_AddObjectToObject(j, "overheads");
    cJSON_AddNumberToObject(ov, "dispatch_ms", c->dispatch_ms);
    cJSON_AddNumberToObject(ov, "token_path_ms", c->token_path_ms);
    cJSON_AddNumberToObject(ov, "step_overhead_ms", c->step_overhead_ms);
    cJSON_AddNumberToObject(ov, "handoff_ms", c->handoff_ms);
    cJSON *a2a = cJSON_AddArrayToObject(j, "a2a");
    for (int i = 0; i < c->n_a2a; i++) {
        cJSON *p = cJSON_CreateObject();
        cJSON_AddNumberToObject(p, "ep", c->a2a[i].ep);
        cJSON_AddNumberToObject(p, "tokens", c->a2a[i].tokens);
        cJSON_AddNumberToObject(p, "ms", c->a2a[i].ms);
        cJSON_AddItemToArray(a2a, p);
    }
    char *s = cJSON_Print(j);
    cJSON_Delete(j);
    if (!s)
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory writing the profile", path);
    FILE *f = fopen(path, "w");
    moe_status st = MOE_OK;
    if (!f || fputs(s, f) < 0 || fputc('\n', f) < 0)
        st = moe_error(MOE_ERR_IO, "%s: cannot write the profile", path);
    if (f && fclose(f) != 0 && st == MOE_OK)
        st = moe_error(MOE_ERR_IO, "%s: cannot write the profile", path);
    free(s);
    return st;
}

moe_status mp_avail_load(const char *path, mp_costs *c)
{
    if (!c->has_cpu)
        return moe_error(MOE_ERR_FORMAT, "--availability %s: the profile has no CPU times (step.ms_cpu): "
                                         "profile again with this moe-plan", path);
    cJSON *j;
    moe_status st = read_json(path, &j);
    if (st != MOE_OK)
        return st;
    const cJSON *bins = cJSON_GetObjectItemCaseSensitive(j, "bins"), *b;
    c->n_av = 0;
    bool all_timed = true;
    st = MOE_OK;
    cJSON_ArrayForEach(b, bins)
    {
        const cJSON *cpu = cJSON_GetObjectItemCaseSensitive(b, "cpu_ms");
        const cJSON *ratios = cJSON_GetObjectItemCaseSensitive(b, "ratios"), *r;
        if (c->n_av == MP_MAX_AV || !cJSON_IsNumber(cpu) || cpu->valuedouble <= 0 || !cJSON_IsArray(ratios)) {
            st = moe_error(MOE_ERR_FORMAT, "%s: bin %d needs cpu_ms > 0 and a ratios array (at most %d bins)", path,
                           c->n_av, MP_MAX_AV);
            break;
        }
        const cJSON *ts = cJSON_GetObjectItemCaseSensitive(b, "t_s");
        int i = c->n_av, n = 0;
        c->av_cpu[i] = cpu->valuedouble;
        cJSON_ArrayForEach(r, ratios)
        {
            if (n == MP_AV_SAMPLES || !cJSON_IsNumber(r))
                break;
            /* Below 1 is a clock's rounding: never faster than the CPU. */
            c->av_ratio[i][n++] = r->valuedouble >= 1 ? r->valuedouble : 1;
        }
        c->av_n[i] = n;
        bool timed = cJSON_IsArray(ts) && cJSON_GetArraySize(ts) >= n;
        for (int k = 0; timed && k < n; k++) {
            const cJSON *tk = cJSON_GetArrayItem(ts, k);
            timed = cJSON_IsNumber(tk) && (k == 0 || tk->valuedouble >= c->av_t[i][k - 1]);
            c->av_t[i][k] = timed ? (float)tk->valuedouble : 0;
        }
        if (n > 0)
            all_timed &= timed;
        c->n_av += n > 0;
    }
    if (st == MOE_OK && c->n_av == 0)
        st = moe_error(MOE_ERR_FORMAT, "%s: no bins with samples", path);
    c->av_has_t = all_timed;
    if (st != MOE_OK)
        c->n_av = 0;
    cJSON_Delete(j);
    return st;
}
