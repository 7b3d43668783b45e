/* moe-serve internals shared by its files: command-line options, the cluster layout every rank
 * computes identically from them, and the two roles' entry points. */
#ifndef MOE_TOOLS_MOE_SERVE_SERVE_H
#define MOE_TOOLS_MOE_SERVE_SERVE_H

#include <mpi.h>

#include "common/pool.h"
#include "ctrl/link.h"
#include "worker/worker_loop.h"
#include <stdbool.h>
#include <stddef.h>

#define SERVE_MAX_EP 64

/* How this process was started: one mpirun job holding the whole cluster, or one failure domain
 * of an elastic cluster (docs/cluster.md). */
typedef enum {
    SERVE_MODE_MPIRUN = 0, /* mpirun -np N moe-serve ...: rank 0 coordinates */
    SERVE_MODE_COORDINATOR, /* moe-serve coordinator ...: the coordinator alone */
    SERVE_MODE_INSTANCE,    /* [mpirun -np E] moe-serve instance --join ...: one instance */
} serve_mode;

typedef struct {
    serve_mode mode;
    const char *cluster_listen; /* coordinator: where instances join */
    const char *join;           /* instance: the coordinator's --cluster-listen */
    const char *token_file;     /* --cluster-token-file (else $MOESERVE_CLUSTER_TOKEN) */
    const char *host_label;     /* instance: host name for status tables */
    int pool;                   /* instance: moe_pool_kind */
    const char *model_dir;
    int prefill, decode; /* instances asked for; -1 = not given */
    bool colocated;
    int ep_size;    /* --ep-size: ranks per instance, every pool */
    int prefill_ep; /* --prefill-ep, default ep_size */
    int decode_ep;  /* --decode-ep, default ep_size */
    int redundant_experts; /* --redundant-experts: EPLB replica slots per expert-parallel instance */
    int eplb_interval;     /* --eplb-interval: steps between EPLB re-plans */
    const char *listen;
    const char *http_listen;   /* --http-listen ADDR:PORT: the OpenAI HTTP API; NULL = off */
    const char *chat_template; /* --chat-template FILE: instead of tokenizer_config.json's */
    const char *tls_cert, *tls_key, *tls_client_ca; /* --tls-*: PEM files (both front ends) */
    const char *api_key_file;  /* --api-key-file: keys required on both front ends */
    int threads;   /* kernel threads per worker; 0 = cores / ranks on the node */
    int device;    /* moe_device of worker/compute/backend.h: cpu (default) or cuda */
    int kv_blocks; /* per instance; 0 = from kv_mb */
    int kv_mb;     /* per instance; 0 = engine default */
    int block_size, batch_tokens, max_seqs;
    int max_requests, max_queue;
    int heartbeat_ms, heartbeat_timeout_ms, kv_timeout_ms, lease_ms;
    bool kv_block_transfer; /* --kv-transfer block: whole blocks after the prefill (no layer push) */
    double drain_timeout_s;
    int startup_timeout_s;
    int grpc_threads;
    int max_new_tokens; /* server limit; 0 = the context */
    /* live migration policy (docs/migration.md); 0 / false = the default */
    bool migration_off;
    double mig_high, mig_low, mig_headroom;
    int mig_interval_ms, mig_max_inflight, mig_final_blocks, mig_max_stages, mig_stage_blocks;
    int mig_min_remaining, mig_retry_ms, mig_waiting_ticks, mig_every;
} serve_args;


typedef struct {
    moe_pool_kind pool;
    int ep_size;
    int ranks[SERVE_MAX_EP];
} serve_instance;

typedef struct {
    int world;
    int n_instances;
    serve_instance *instances; /* prefill instances first, then decode (or all mixed) */
    int n_prefill, n_decode, n_mixed;
    int *rank_instance; /* [world]: -1 for the coordinator and spare ranks */
    int n_spare;
    int *spare;          /* [n_spare] */
    bool auto_colocated; /* -np 2 without pool flags: one mixed instance */
} serve_layout;

/* Parses argv; 0 ok, 1 --help printed, -1 error printed (print = false: stay silent). */
int serve_parse_args(int argc, char **argv, serve_args *a, bool print);
/* Plans the layout for `world` ranks; on an impossible layout writes the reason into err and
 * returns -1. */
int serve_plan_layout(const serve_args *a, int world, serve_layout *l, char *err, size_t err_cap);
void serve_layout_free(serve_layout *l);

/* Rank 0 and worker ranks; each returns the process exit status. MPI is initialised and is
 * finalised by the caller. */
/* The coordinator: l is the mpirun layout, or NULL for an elastic cluster (link is UCX). */
int serve_coordinator_main(const serve_args *a, const serve_layout *l, moe_link *link);
/* moe-serve coordinator / moe-serve instance (elastic_main.c). */
int serve_elastic_coordinator(const serve_args *a);
int serve_instance_main(const serve_args *a);
/* The worker options every launch shares (engine sizes, timeouts), from the command line. */
void serve_fill_worker_opts(const serve_args *a, moe_worker_role role, int local_ranks,
                            moe_worker_opts *o);
int serve_worker_main(const serve_args *a, const serve_layout *l, MPI_Comm ctrl, MPI_Comm data,
                      MPI_Comm instance_comm, int local_ranks);

#endif
