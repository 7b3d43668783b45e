/* moe-client drain: the Drain RPC and the wait for the instance to empty. */
#ifndef MOE_TOOLS_CLIENT_DRAIN_H
#define MOE_TOOLS_CLIENT_DRAIN_H

#include <stdbool.h>
#include <stdint.h>

#include "tools/moe_client/client.h"

/* Asks the server at addr to drain instance (or undo the drain). Unless no_wait, then polls
 * ClusterStatus until the instance holds no KV and runs nothing, printing its progress, for at
 * most timeout_ms. Returns the process exit status: 0 done, 1 the server refused or the wait timed
 * out (the reason is printed). */
int moe_client_drain(moe_rpc_client *c, const char *addr, uint32_t instance, bool undo,
                     bool no_wait, int64_t timeout_ms);

#endif
