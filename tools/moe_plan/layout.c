/* Cluster layouts for moe-plan: "P=1x1,D=2x1" (pools of COUNTxEP), "M=2x1" (colocated). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/moe_plan/sim.h"

moe_status mp_layout_parse(const char *s, mp_layout *l)
{
    memset(l, 0, sizeof *l);
    const char *p = s;
    while (*p) {
        int pool = *p == 'P' ? MP_POOL_PREFILL : *p == 'D' ? MP_POOL_DECODE : *p == 'M' ? MP_POOL_MIXED : -1;
        char *end;
        if (pool < 0 || p[1] != '=')
            return moe_error(MOE_ERR_INVALID_ARG, "layout '%s': expected P=, D= or M= at '%s'", s, p);
        long n = strtol(p + 2, &end, 10), e = 1;
        if (end == p + 2 || n < 1 || n > 4096)
            return moe_error(MOE_ERR_INVALID_ARG, "layout '%s': bad instance count at '%s'", s, p);
        if (*end == 'x') {
            const char *q = end + 1;
            e = strtol(q, &end, 10);
            if (end == q || e < 1 || e > 64)
                return moe_error(MOE_ERR_INVALID_ARG, "layout '%s': bad EP size (1..64) at '%s'", s, p);
        }
        if (l->count[pool])
            return moe_error(MOE_ERR_INVALID_ARG, "layout '%s': pool %c given twice", s, *p);
        l->count[pool] = (int)n;
        l->ep[pool] = (int)e;
        if (*end && *end != ',')
            return moe_error(MOE_ERR_INVALID_ARG, "layout '%s': unexpected '%s'", s, end);
        p = *end ? end + 1 : end;
    }
    bool pd = l->count[MP_POOL_PREFILL] || l->count[MP_POOL_DECODE];
    if (pd && l->count[MP_POOL_MIXED])
        return moe_error(MOE_ERR_INVALID_ARG, "layout '%s': a mixed pool (M) cannot join P/D pools", s);
    if (pd && !(l->count[MP_POOL_PREFILL] && l->count[MP_POOL_DECODE]))
        return moe_error(MOE_ERR_INVALID_ARG, "layout '%s': a disaggregated layout needs both P and D", s);
    if (!pd && !l->count[MP_POOL_MIXED])
        return moe_error(MOE_ERR_INVALID_ARG, "layout '%s': no pools", s);
    return MOE_OK;
}

void mp_layout_format(const mp_layout *l, char *buf, size_t cap)
{
    static const char names[] = "PDM";
    size_t n = 0;
    buf[0] = 0;
    for (int p = 0; p < 3; p++)
        if (l->count[p] && n < cap)
            n += (size_t)snprintf(buf + n, cap - n, "%s%c=%dx%d", n ? "," : "", names[p], l->count[p], l->ep[p]);
}

int mp_layout_ranks(const mp_layout *l)
{
    int r = 0;
    for (int p = 0; p < 3; p++)
        r += l->count[p] * l->ep[p];
    return r;
}
