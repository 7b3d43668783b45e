/* The pool kind of an instance, spelled once for the whole tree (issue 10's shared vocabulary):
 * the coordinator's placement, moe-serve's flags and layout, and the workers' roles all use it.
 * Values match moeserve.v1.PoolKind and moeserve.cluster.v1.Role (the wire), so a cast between
 * them is exact; 0 (unspecified on the wire) is never a pool. */
#ifndef MOE_COMMON_POOL_H
#define MOE_COMMON_POOL_H

#include <string.h>

typedef enum {
    MOE_POOL_PREFILL = 1, /* prompt phase only (disaggregated) */
    MOE_POOL_DECODE = 2,  /* token-by-token phase only (disaggregated) */
    MOE_POOL_MIXED = 3,   /* both phases (colocated) */
} moe_pool_kind;

/* "prefill", "decode" or "mixed" (what --pool takes and status tables show); "?" for a value that
 * names no pool (a newer peer's, or unspecified on the wire). */
static inline const char *moe_pool_name(moe_pool_kind k)
{
    return k == MOE_POOL_PREFILL ? "prefill"
           : k == MOE_POOL_DECODE ? "decode"
           : k == MOE_POOL_MIXED  ? "mixed"
                                  : "?";
}

/* The pool named s; 0 when s names none. */
static inline moe_pool_kind moe_pool_parse(const char *s)
{
    for (int k = MOE_POOL_PREFILL; k <= MOE_POOL_MIXED; k++)
        if (s && !strcmp(s, moe_pool_name((moe_pool_kind)k)))
            return (moe_pool_kind)k;
    return (moe_pool_kind)0;
}

#endif
