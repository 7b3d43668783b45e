/* Growable arrays: the capacity-doubling realloc every request/offer/message table uses. */
#ifndef MOE_COMMON_GROW_H
#define MOE_COMMON_GROW_H

#include <stdbool.h>
#include <stddef.h>

/* Makes *p (an array of elem-byte items with *cap slots) hold at least need items, doubling the
 * capacity (from 16). False when out of memory: *p and *cap are then unchanged. */
bool moe_grow(void **p, int *cap, int need, size_t elem);

#endif
