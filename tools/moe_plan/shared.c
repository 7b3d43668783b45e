/* moe-bench's workload, report and run code (and moe-client's gRPC client, for calibrate), compiled into moe-plan through this file (the build adds
 * only tools/moe_plan/ files to moe-plan), so that simulated and measured runs are described and
 * reported by the same code. */
#include "tools/moe_bench/report.c"
#include "tools/moe_bench/run.c"
#include "tools/moe_bench/workload.c"
#include "tools/moe_client/client.c"
