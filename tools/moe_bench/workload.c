/* Benchmark workloads: synthetic arrivals and lengths, and trace files (Mooncake JSONL, plain CSV). */
#include "tools/moe_bench/workload.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cjson/cJSON.h>

#include "common/file.h"
#include "common/grow.h"

uint64_t wl_rng_next(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ULL;
}

double wl_rng_unit(uint64_t *s) { return (double)(wl_rng_next(s) >> 11) * (1.0 / 9007199254740992.0); }

static double rng_normal(uint64_t *s)
{
    double u = wl_rng_unit(s), v = wl_rng_unit(s);
    return sqrt(-2.0 * log(1.0 - u)) * cos(6.283185307179586 * v);
}

double wl_rng_gamma(uint64_t *s, double k)
{
    if (k < 1.0) /* Gamma(k) = Gamma(k+1) * U^(1/k) */
        return wl_rng_gamma(s, k + 1.0) * pow(1.0 - wl_rng_unit(s), 1.0 / k);
    double d = k - 1.0 / 3.0, c = 1.0 / sqrt(9.0 * d);
    for (;;) {
        double x = rng_normal(s), v = 1.0 + c * x;
        if (v <= 0)
            continue;
        v = v * v * v;
        double u = 1.0 - wl_rng_unit(s);
        if (log(u) < 0.5 * x * x + d - d * v + d * log(v))
            return d * v;
    }
}

void wl_opts_default(wl_opts *o)
{
    *o = (wl_opts){.requests = 200,
                   .cv = 1.0,
                   .time_scale = 1.0,
                   .len_scale = 1.0,
                   .in_len = {WL_DIST_FIXED, 128, 0},
                   .out_len = {WL_DIST_FIXED, 128, 0},
                   .seed = 1,
                   .hash_block = 512};
}

bool wl_parse_dist(const char *s, wl_dist *d)
{
    char *end;
    wl_dist r = {0};
    if (!strncmp(s, "exp:", 4)) {
        r.kind = WL_DIST_EXP;
        r.a = strtod(s + 4, &end);
        if (*end || !(r.a >= 1))
            return false;
    } else if (!strncmp(s, "lognorm:", 8)) {
        r.kind = WL_DIST_LOGNORM;
        r.a = strtod(s + 8, &end);
        if (*end != ':' || !(r.a >= 1))
            return false;
        r.b = strtod(end + 1, &end);
        if (*end || !(r.b > 0))
            return false;
    } else {
        r.a = strtod(s, &end);
        if (end == s || !(r.a >= 1))
            return false;
        r.kind = WL_DIST_FIXED;
        if (*end == '-') {
            r.kind = WL_DIST_UNIFORM;
            r.b = strtod(end + 1, &end);
            if (!(r.b >= r.a))
                return false;
        }
        if (*end)
            return false;
    }
    *d = r;
    return true;
}

int wl_parse_arg(const char *a, const char *v, wl_opts *o)
{
    char *end = NULL;
    bool ok;
    errno = 0;
    if (!strcmp(a, "--requests"))
        ok = (o->requests = (int)strtol(v, &end, 10)) > 0 && !*end;
    else if (!strcmp(a, "--rate"))
        ok = (o->rate = strtod(v, &end)) >= 0 && !*end;
    else if (!strcmp(a, "--cv"))
        ok = (o->cv = strtod(v, &end)) > 0 && !*end;
    else if (!strcmp(a, "--prompt-len"))
        ok = wl_parse_dist(v, &o->in_len);
    else if (!strcmp(a, "--output-len"))
        ok = wl_parse_dist(v, &o->out_len);
    else if (!strcmp(a, "--trace"))
        ok = (o->trace_path = v) != NULL;
    else if (!strcmp(a, "--time-scale"))
        ok = (o->time_scale = strtod(v, &end)) > 0 && !*end;
    else if (!strcmp(a, "--len-scale"))
        ok = (o->len_scale = strtod(v, &end)) > 0 && !*end;
    else if (!strcmp(a, "--max-input"))
        ok = (o->max_in = (int)strtol(v, &end, 10)) > 0 && !*end;
    else if (!strcmp(a, "--max-output"))
        ok = (o->max_out = (int)strtol(v, &end, 10)) > 0 && !*end;
    else if (!strcmp(a, "--hash-block"))
        ok = (o->hash_block = (int)strtol(v, &end, 10)) > 0 && !*end;
    else if (!strcmp(a, "--seed"))
        o->seed = strtoull(v, &end, 10), ok = !*end;
    else
        return 0;
    return ok && !errno ? 1 : -1;
}

void wl_usage(FILE *f)
{
    fputs("workload:\n"
          "  --requests N         requests (default 200; with --trace: its first N rows)\n"
          "  --rate R             mean arrivals per second (default 0: all at once; with --trace:\n"
          "                       its timestamps rescaled to this mean rate)\n"
          "  --cv C               coefficient of variation of the inter-arrival times: 1 Poisson\n"
          "                       (default), > 1 bursty (gamma), < 1 smoother\n"
          "  --prompt-len D       prompt tokens: N | A-B (uniform) | exp:MEAN | lognorm:MEAN:CV\n"
          "                       (default 128)\n"
          "  --output-len D       output tokens (max_new_tokens, EOS ignored), same forms (default 128)\n"
          "  --trace FILE         replay FILE: Mooncake JSONL ({\"timestamp\": ms, \"input_length\",\n"
          "                       \"output_length\", \"hash_ids\"}) or CSV timestamp_ms,input,output\n"
          "  --time-scale X       multiply the trace's timestamps (default 1; ignored with --rate)\n"
          "  --len-scale X        multiply the trace's lengths (and its hash block size) by X\n"
          "  --max-input N, --max-output N   clip lengths (after --len-scale)\n"
          "  --hash-block N       trace tokens per hash id (default 512, Mooncake's)\n"
          "  --seed S             arrivals, lengths and prompt ids (default 1)\n",
          f);
}

static int draw(const wl_dist *d, uint64_t *s)
{
    double v = d->a;
    if (d->kind == WL_DIST_UNIFORM)
        v = d->a + floor(wl_rng_unit(s) * (d->b - d->a + 1));
    else if (d->kind == WL_DIST_EXP)
        v = ceil(-d->a * log(1.0 - wl_rng_unit(s)));
    else if (d->kind == WL_DIST_LOGNORM) { /* mean a, CV b: sigma^2 = ln(1 + b^2) */
        double s2 = log(1.0 + d->b * d->b);
        v = round(exp(log(d->a) - 0.5 * s2 + sqrt(s2) * rng_normal(s)));
    }
    return v < 1 ? 1 : v > 1e8 ? 100000000 : (int)v;
}

static int scale_len(int n, const wl_opts *o, int max)
{
    double v = round(n * o->len_scale);
    int r = v < 1 ? 1 : (int)v;
    return max > 0 && r > max ? max : r;
}

/* One trace row into *r; false with *why set when the line is neither format. */
static bool parse_row(const char *line, wl_request *r, const char **why)
{
    while (isspace((unsigned char)*line))
        line++;
    if (*line == '{') {
        cJSON *j = cJSON_Parse(line);
        if (!j) {
            *why = "not valid JSON";
            return false;
        }
        const cJSON *ts = cJSON_GetObjectItemCaseSensitive(j, "timestamp");
        const cJSON *in = cJSON_GetObjectItemCaseSensitive(j, "input_length");
        const cJSON *out = cJSON_GetObjectItemCaseSensitive(j, "output_length");
        const cJSON *h = cJSON_GetObjectItemCaseSensitive(j, "hash_ids");
        bool ok = cJSON_IsNumber(ts) && cJSON_IsNumber(in) && cJSON_IsNumber(out) && in->valuedouble >= 1 &&
                  out->valuedouble >= 1 && ts->valuedouble >= 0;
        if (!ok) {
            *why = "needs numbers timestamp >= 0, input_length >= 1, output_length >= 1";
            cJSON_Delete(j);
            return false;
        }
        r->t_s = ts->valuedouble * 1e-3;
        r->n_in = (int)in->valuedouble;
        r->n_out = (int)out->valuedouble;
        if (cJSON_IsArray(h) && cJSON_GetArraySize(h) > 0) {
            r->n_hash = cJSON_GetArraySize(h);
            r->hash_ids = calloc((size_t)r->n_hash, sizeof *r->hash_ids);
            int k = 0;
            const cJSON *e;
            cJSON_ArrayForEach(e, h) r->hash_ids[k++] = cJSON_IsNumber(e) ? (uint64_t)e->valuedouble : 0;
        }
        cJSON_Delete(j);
        return true;
    }
    char *end;
    double v[3];
    const char *p = line;
    for (int k = 0; k < 3; k++) {
        v[k] = strtod(p, &end);
        if (end == p) {
            *why = "expected timestamp_ms,input_tokens,output_tokens";
            return false;
        }
        while (isspace((unsigned char)*end))
            end++;
        if (k < 2 && *end++ != ',') {
            *why = "expected three comma-separated numbers";
            return false;
        }
        p = end;
    }
    if (!(v[0] >= 0 && v[1] >= 1 && v[2] >= 1)) {
        *why = "needs timestamp >= 0, input_tokens >= 1, output_tokens >= 1";
        return false;
    }
    *r = (wl_request){.t_s = v[0] * 1e-3, .n_in = (int)v[1], .n_out = (int)v[2]};
    return true;
}

static int cmp_arrival(const void *a, const void *b)
{
    double x = ((const wl_request *)a)->t_s, y = ((const wl_request *)b)->t_s;
    return x < y ? -1 : x > y;
}

static moe_status load_trace(const wl_opts *o, wl_workload *w)
{
    char *text;
    moe_status st = moe_read_file(o->trace_path, (size_t)1 << 30, &text, NULL);
    if (st != MOE_OK)
        return st;
    int cap = 0, lineno = 0;
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        lineno++;
        const char *p = line;
        while (isspace((unsigned char)*p))
            p++;
        if (!*p || *p == '#')
            continue;
        if (lineno == 1 && isalpha((unsigned char)*p)) /* a CSV header */
            continue;
        if (o->requests > 0 && w->n >= o->requests)
            break;
        if (!moe_grow((void **)&w->req, &cap, w->n + 1, sizeof *w->req)) {
            free(text);
            return moe_error(MOE_ERR_NOMEM, "%s: out of memory at line %d", o->trace_path, lineno);
        }
        wl_request *r = &w->req[w->n];
        memset(r, 0, sizeof *r);
        const char *why = NULL;
        if (!parse_row(line, r, &why)) {
            free(text);
            return moe_error(MOE_ERR_FORMAT, "%s:%d: %s", o->trace_path, lineno, why);
        }
        r->n_in = scale_len(r->n_in, o, o->max_in);
        r->n_out = scale_len(r->n_out, o, o->max_out);
        w->n++;
    }
    free(text);
    if (w->n == 0)
        return moe_error(MOE_ERR_INVALID_ARG, "%s: no requests in the trace", o->trace_path);
    qsort(w->req, (size_t)w->n, sizeof *w->req, cmp_arrival);
    double t0 = w->req[0].t_s;
    for (int i = 0; i < w->n; i++)
        w->req[i].t_s = (w->req[i].t_s - t0) * o->time_scale;
    snprintf(w->source, sizeof w->source, "trace %s", o->trace_path);
    return MOE_OK;
}

moe_status wl_build(const wl_opts *o, wl_workload *out)
{
    wl_workload w = {0};
    moe_status st = MOE_OK;
    if (o->trace_path) {
        if ((st = load_trace(o, &w)) != MOE_OK) {
            wl_free(&w);
            return st;
        }
        if (o->rate > 0)
            wl_set_rate(&w, o->rate);
    } else {
        if (o->requests < 1)
            return moe_error(MOE_ERR_INVALID_ARG, "requests: %d, must be at least 1", o->requests);
        w.n = o->requests;
        w.req = calloc((size_t)w.n, sizeof *w.req);
        if (!w.req)
            return moe_error(MOE_ERR_NOMEM, "workload: out of memory for %d requests", w.n);
        uint64_t rs = o->seed * 0x9E3779B97F4A7C15ULL + 1;
        double t = 0, k = 1.0 / (o->cv * o->cv);
        for (int i = 0; i < w.n; i++) {
            wl_request *r = &w.req[i];
            r->n_in = draw(&o->in_len, &rs);
            r->n_out = draw(&o->out_len, &rs);
            if (o->max_in > 0 && r->n_in > o->max_in)
                r->n_in = o->max_in;
            if (o->max_out > 0 && r->n_out > o->max_out)
                r->n_out = o->max_out;
            /* Gamma inter-arrival times of mean 1/rate and CV cv (cv 1: exponential, Poisson). */
            if (o->rate > 0 && i > 0)
                t += (o->cv == 1.0 ? -log(1.0 - wl_rng_unit(&rs)) : wl_rng_gamma(&rs, k) / k) / o->rate;
            r->t_s = t;
        }
        if (o->rate <= 0)
            snprintf(w.source, sizeof w.source, "all at once");
        else if (o->cv == 1.0)
            snprintf(w.source, sizeof w.source, "poisson rate %.3g/s", o->rate);
        else
            snprintf(w.source, sizeof w.source, "gamma rate %.3g/s cv %.3g", o->rate, o->cv);
    }
    *out = w;
    return MOE_OK;
}

void wl_free(wl_workload *w)
{
    for (int i = 0; w->req && i < w->n; i++)
        free(w->req[i].hash_ids);
    free(w->req);
    *w = (wl_workload){0};
}

double wl_mean_rate(const wl_workload *w)
{
    if (w->n < 2)
        return 0;
    double span = w->req[w->n - 1].t_s - w->req[0].t_s;
    return span > 0 ? (w->n - 1) / span : 0;
}

void wl_set_rate(wl_workload *w, double rate)
{
    double now = wl_mean_rate(w);
    if (rate <= 0) {
        for (int i = 0; i < w->n; i++)
            w->req[i].t_s = 0;
        return;
    }
    if (now <= 0) /* all at once: spread them evenly */
        for (int i = 0; i < w->n; i++)
            w->req[i].t_s = i / rate;
    else
        for (int i = 0; i < w->n; i++)
            w->req[i].t_s *= now / rate;
}

void wl_prompt(const wl_workload *w, const wl_opts *o, int i, int vocab, uint32_t *ids)
{
    const wl_request *r = &w->req[i];
    int blk = (int)round(o->hash_block * o->len_scale);
    if (blk < 1)
        blk = 1;
    int pos = 0;
    for (int h = 0; h < r->n_hash && pos < r->n_in; h++) {
        uint64_t s = (r->hash_ids[h] + 1) * 0xD1B54A32D192ED03ULL ^ o->seed;
        for (int k = 0; k < blk && pos < r->n_in; k++)
            ids[pos++] = (uint32_t)(wl_rng_next(&s) % (uint64_t)vocab);
    }
    uint64_t s = ((uint64_t)i + 1) * 0x9E3779B97F4A7C15ULL ^ (o->seed << 1);
    while (pos < r->n_in)
        ids[pos++] = (uint32_t)(wl_rng_next(&s) % (uint64_t)vocab);
}
