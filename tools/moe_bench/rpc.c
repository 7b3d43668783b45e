/* moe-bench's gRPC client: moe-client's tools/moe_client/client.c ("any tool may compile it in"),
 * compiled into this binary through this file because the build adds only tools/moe_bench/ files
 * to moe-bench. */
#include "tools/moe_client/client.c"
