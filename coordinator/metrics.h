/* The Prometheus text exposition (format 0.0.4) of the front ends' request accounting
 * (coordinator/fe_stats.h) and a cluster snapshot (coordinator/frontend.h): what GET /metrics
 * serves. Names follow vLLM's where the meaning is the same (docs/serving.md has the table).
 *
 * Written by hand: Debian has no C Prometheus client (only prometheus-cpp, which is C++), and
 * the text format is a few lines per family. */
#ifndef MOE_COORDINATOR_METRICS_H
#define MOE_COORDINATOR_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include "common/status.h"
#include "coordinator/fe_stats.h"
#include "coordinator/frontend.h"

/* Renders every metric family into a malloc'd NUL-terminated string (*out, *len; the caller
 * frees). `cs` may be NULL (no backend status: only the front end's families). `model_name`
 * labels every sample. MOE_ERR_NOMEM when out of memory (nothing allocated then). */
moe_status moe_metrics_render(const moe_fe_stats_snapshot *fs, const moe_cluster_status *cs,
                              const char *model_name, bool serving, char **out, size_t *len);

/* The Content-Type of that text. */
#define MOE_METRICS_CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"

#endif
