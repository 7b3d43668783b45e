/* `moe-plan calibrate`: the fixed costs outside the engine (dispatch, token path, per-step report),
 * measured on a live cluster with a probe of short sequential requests, written into a profile. */
#ifndef MOE_TOOLS_PLAN_CALIBRATE_H
#define MOE_TOOLS_PLAN_CALIBRATE_H

#include "tools/moe_plan/costs.h"

/* Sends `requests` requests one at a time (8 prompt tokens, 8 output tokens) to addr and sets
 * c->dispatch_ms (arrival at the server -> first token at the coordinator, minus the engine's
 * predicted prefill step), c->token_path_ms (coordinator -> client: client TTFT minus the server's)
 * c->step_overhead_ms (median decode time per token minus the predicted decode step) and
 * c->handoff_ms (first-to-second token gap minus a decode token and the KV bytes' transfer: the
 * hand-off's fixed part; ~0 on a colocated cluster), each clamped at 0.
 * Fails with UNAVAILABLE when the probe requests fail. */
moe_status mp_calibrate(const char *addr, int requests, mp_costs *c);

#endif
