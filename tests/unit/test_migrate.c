/* Tests of worker/migrate: live migration between two engines of one process, over an in-process
 * mailbox for both the control messages and the KV blocks (a send is read when it is matched, as
 * with MPI's rendezvous, so a block that changed under a send would be caught by its checksum).
 * A migrated sequence must produce exactly the tokens it produces unmigrated (greedy and seeded
 * sampling, once, several times, and back), no index twice or missing, nothing re-sent; aborts at
 * every stage leave it running on the source and the destination's KV usage where it was. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "cluster.pb-c.h"
#include "common/clock.h"
#include "common/log.h"
#include "worker/migrate.h"

#define MODEL_DIR MOE_SOURCE_DIR "/tests/reference/fixtures/models/qwen3_moe_f32"
#define TAG(x) MOESERVE__CLUSTER__V1__TAG__TAG_##x
#define REASON(x) MOESERVE__CLUSTER__V1__MIG_REASON__MIG_##x
#define NR 3 /* rank 0 plays the coordinator; 1 and 2 are the engines */
#define MAX_TOK 256

/* ---- data: a mailbox comm matching (src, dst, tag) in posting order ---- */
typedef struct dreq {
    bool send, done, dead;
    int src, dst, tag, bytes;
    void *buf;
    struct dreq *next;
} dreq;

typedef struct {
    dreq *head, **tail;
    int matched_sends;
} dnet;

typedef struct {
    dnet *net;
    int rank;
} dctx;

static void dmatch(dnet *n)
{
    for (dreq *r = n->head; r; r = r->next) {
        if (r->send || r->done || r->dead)
            continue;
        for (dreq *s = n->head; s; s = s->next) {
            if (!s->send || s->done || s->dead || s->src != r->src || s->dst != r->dst ||
                s->tag != r->tag)
                continue;
            memcpy(r->buf, s->buf, (size_t)(s->bytes < r->bytes ? s->bytes : r->bytes));
            s->done = r->done = true;
            n->matched_sends++;
            break;
        }
    }
}

static moe_status dpost(dctx *c, bool send, void *buf, int bytes, int peer, int tag,
                        moe_comm_req **out)
{
    dreq *r = calloc(1, sizeof *r);
    *r = (dreq){.send = send,
                .src = send ? c->rank : peer,
                .dst = send ? peer : c->rank,
                .tag = tag,
                .bytes = bytes,
                .buf = buf};
    *c->net->tail = r;
    c->net->tail = &r->next;
    *out = (moe_comm_req *)r;
    return MOE_OK;
}

static moe_status d_isend(void *ctx, const void *buf, int bytes, int peer, int tag,
                          moe_comm_req **req)
{
    return dpost(ctx, true, (void *)(uintptr_t)buf, bytes, peer, tag, req);
}

static moe_status d_irecv(void *ctx, void *buf, int bytes, int peer, int tag, moe_comm_req **req)
{
    return dpost(ctx, false, buf, bytes, peer, tag, req);
}

static moe_status d_test(void *ctx, moe_comm_req *req, bool *done)
{
    dmatch(((dctx *)ctx)->net);
    dreq *r = (dreq *)req;
    *done = r->done;
    if (r->done)
        r->dead = true; /* released */
    return MOE_OK;
}

/* Like MPI (ob1): a receive is cancelled, a send is only detached and still delivers. */
static void d_cancel(void *ctx, moe_comm_req *req)
{
    (void)ctx;
    dreq *r = (dreq *)req;
    if (!r->send)
        r->dead = true;
}

static int d_rank(void *ctx)
{
    return ((dctx *)ctx)->rank;
}

static int d_size(void *ctx)
{
    (void)ctx;
    return NR;
}

static const moe_comm_ops dops = {.name = "mailbox",
                                  .rank = d_rank,
                                  .size = d_size,
                                  .isend = d_isend,
                                  .irecv = d_irecv,
                                  .test = d_test,
                                  .cancel = d_cancel};

/* ---- control: one FIFO of packed messages for everyone ---- */
typedef struct cmsg {
    int src, dst, tag;
    uint8_t *buf;
    size_t len;
    struct cmsg *next;
} cmsg;

typedef struct {
    Moeserve__Cluster__V1__MigReason reason;
    uint32_t stages, blocks, mig_id;
    int64_t pause_ns;
    uint64_t bytes;
} end_t;

typedef struct harness harness;

typedef struct {
    harness *h;
    int rank;
} ioctx;

struct harness {
    moe_model *model;
    moe_engine *eng[NR];
    moe_mig *mig[NR];
    dnet net;
    dctx dc[NR];
    moe_comm comm[NR];
    ioctx io[NR];
    uint32_t xfer[NR];
    cmsg *q, **qtail;
    end_t ends[64];
    int n_ends;
    /* the token stream of the sequence under test, by index, and who produced each */
    int32_t tok[MAX_TOK];
    int who[MAX_TOK];
    int n_tok;
    bool finished;
    int dup;   /* indices produced twice */
    int base2; /* blocks rank 2 holds for other sequences */
};

static void io_send(void *ctx, int peer, int tag, const ProtobufCMessage *m)
{
    ioctx *c = ctx;
    cmsg *x = calloc(1, sizeof *x);
    x->src = c->rank;
    x->dst = peer;
    x->tag = tag;
    x->len = protobuf_c_message_get_packed_size(m);
    x->buf = malloc(x->len ? x->len : 1);
    protobuf_c_message_pack(m, x->buf);
    *c->h->qtail = x;
    c->h->qtail = &x->next;
}

static moe_engine *new_engine(moe_model *model, int n_blocks)
{
    moe_engine_opts o = {.n_threads = 1,
                         .block_size = 4,
                         .n_kv_blocks = n_blocks,
                         .max_batch_tokens = 64,
                         .max_seqs = 8};
    moe_engine *e = NULL;
    cr_assert_eq(moe_engine_create(model, &o, &e), MOE_OK, "%s", moe_error_message());
    return e;
}

static void harness_init(harness *h, const moe_mig_test_hooks *hooks, int dest_blocks)
{
    memset(h, 0, sizeof *h);
    moe_log_threshold = MOE_LOG_WARN;
    h->qtail = &h->q;
    h->net.tail = &h->net.head;
    cr_assert_eq(moe_model_load(MODEL_DIR, NULL, &h->model), MOE_OK, "%s", moe_error_message());
    for (int r = 1; r < NR; r++) {
        h->eng[r] = new_engine(h->model, r == 2 && dest_blocks ? dest_blocks : 128);
        h->dc[r] = (dctx){.net = &h->net, .rank = r};
        h->comm[r] = (moe_comm){.ops = &dops, .ctx = &h->dc[r]};
        h->io[r] = (ioctx){.h = h, .rank = r};
        moe_mig_io io = {.ctx = &h->io[r], .send = io_send};
        moe_mig_opts o = {
            .self_rank = r, .coordinator_rank = 0, .kv_timeout_ms = 2000, .next_xfer = &h->xfer[r]};
        if (hooks)
            o.hooks = *hooks;
        cr_assert_eq(moe_mig_create(h->eng[r], &h->comm[r], &io, &o, &h->mig[r]), MOE_OK);
    }
}

static void harness_free(harness *h)
{
    for (int r = 1; r < NR; r++) {
        moe_mig_free(h->mig[r]);
        moe_engine_free(h->eng[r]);
    }
    while (h->q) {
        cmsg *x = h->q;
        h->q = x->next;
        free(x->buf);
        free(x);
    }
    while (h->net.head) {
        dreq *r = h->net.head;
        h->net.head = r->next;
        free(r);
    }
    moe_model_free(h->model);
}

/* Delivers every queued control message (and those they cause). */
static bool deliver(harness *h)
{
    bool any = false;
    while (h->q) {
        cmsg *x = h->q;
        h->q = x->next;
        if (!h->q)
            h->qtail = &h->q;
        any = true;
        if (x->dst == 0) {
            cr_assert_eq(x->tag, TAG(MIGRATE_END));
            Moeserve__Cluster__V1__MigrateEnd *e =
                moeserve__cluster__v1__migrate_end__unpack(NULL, x->len, x->buf);
            cr_assert_not_null(e);
            cr_assert_lt(h->n_ends, 64);
            h->ends[h->n_ends++] = (end_t){.reason = e->reason,
                                           .stages = e->stages,
                                           .blocks = e->blocks,
                                           .mig_id = e->mig_id,
                                           .pause_ns = e->pause_ns,
                                           .bytes = e->bytes};
            moeserve__cluster__v1__migrate_end__free_unpacked(e, NULL);
        } else {
            cr_assert(moe_mig_deliver(h->mig[x->dst], x->src, x->tag, x->buf, x->len) == MOE_INBOX_HANDLED,
                      "tag %d not taken", x->tag);
        }
        free(x->buf);
        free(x);
    }
    return any;
}

/* One turn of both workers' loops: messages, engine steps, migration progress. */
static void turn(harness *h)
{
    deliver(h);
    for (int r = 1; r < NR; r++) {
        moe_token_event ev[8];
        int n = moe_engine_step(h->eng[r], ev, 8);
        cr_assert_geq(n, 0, "%s", moe_error_message());
        for (int i = 0; i < n; i++) {
            if (ev[i].seq_id != 7)
                continue;
            cr_assert_lt(ev[i].index, MAX_TOK);
            if (h->who[ev[i].index])
                h->dup++;
            h->tok[ev[i].index] = ev[i].token;
            h->who[ev[i].index] = r;
            if (ev[i].index + 1 > h->n_tok)
                h->n_tok = ev[i].index + 1;
            if (ev[i].finish != MOE_FINISH_NONE)
                h->finished = true;
        }
        moe_mig_after_step(h->mig[r], ev, n);
        moe_mig_progress(h->mig[r], moe_now_ns());
    }
    deliver(h);
}

static void start_migration(harness *h, int from, int to, uint32_t mig_id, uint32_t final_blocks)
{
    Moeserve__Cluster__V1__MigrateSeq q;
    moeserve__cluster__v1__migrate_seq__init(&q);
    q.seq_id = 7;
    q.mig_id = mig_id;
    q.dest_rank = (uint32_t)to;
    q.final_blocks = final_blocks;
    q.max_stages = 32;
    q.stage_blocks = 3; /* several stages even for short sequences */
    ioctx coord = {.h = h, .rank = 0};
    io_send(&coord, from, TAG(MIGRATE), &q.base);
}

static int used_blocks(moe_engine *e)
{
    moe_engine_stats st;
    moe_engine_get_stats(e, &st);
    return st.kv_blocks_used;
}

static const int32_t PROMPT[] = {11, 250, 37, 901, 5, 77, 123, 640, 9, 31, 402, 88, 17, 3};
#define N_PROMPT ((int)(sizeof PROMPT / sizeof PROMPT[0]))

/* The sequence's tokens when it never moves. */
static int reference(const moe_sampling_params *sp, int max_new, int32_t *out)
{
    moe_model *model;
    cr_assert_eq(moe_model_load(MODEL_DIR, NULL, &model), MOE_OK);
    moe_engine *e = new_engine(model, 128);
    cr_assert_eq(moe_engine_add(e, 7, PROMPT, N_PROMPT, sp, max_new, true), MOE_OK);
    int n = 0;
    for (bool done = false; !done;) {
        moe_token_event ev[4];
        int k = moe_engine_step(e, ev, 4);
        cr_assert_geq(k, 0);
        for (int i = 0; i < k; i++) {
            out[ev[i].index] = ev[i].token;
            n = ev[i].index + 1;
            done |= ev[i].finish != MOE_FINISH_NONE;
        }
    }
    moe_engine_free(e);
    moe_model_free(model);
    return n;
}

/* Runs the sequence on rank 1 and migrates it at each of `at` generated-token counts, alternating
 * the direction; checks the stream against the unmigrated reference. Returns the MigrateEnds. */
static void run_migrations(harness *h, const moe_sampling_params *sp, const int *at, int n_at,
                           int max_new, uint32_t final_blocks, bool expect_ok)
{
    int32_t ref[MAX_TOK];
    int n_ref = reference(sp, max_new, ref);
    cr_assert_eq(n_ref, max_new);
    cr_assert_eq(moe_engine_add(h->eng[1], 7, PROMPT, N_PROMPT, sp, max_new, true), MOE_OK);
    int owner = 1, next = 0, turns = 0;
    bool waiting = false;
    while (!h->finished) {
        cr_assert_lt(++turns, 5000, "the sequence never finished");
        if (!waiting && next < n_at && h->n_tok >= at[next]) {
            start_migration(h, owner, 3 - owner, (uint32_t)(100 + next), final_blocks);
            waiting = true;
        }
        int ends = h->n_ends;
        turn(h);
        if (waiting && h->n_ends > ends) {
            waiting = false;
            if (h->ends[h->n_ends - 1].reason == REASON(OK))
                owner = 3 - owner;
            next++;
        }
    }
    for (int k = 0; k < 20; k++)
        turn(h); /* let the last messages settle */
    cr_assert_eq(h->dup, 0, "%d token indices were produced twice", h->dup);
    cr_assert_eq(h->n_tok, n_ref);
    for (int i = 0; i < n_ref; i++) {
        cr_assert(h->who[i] != 0, "token %d missing", i);
        cr_assert_eq(h->tok[i], ref[i], "token %d: migrated %d, unmigrated %d", i, h->tok[i],
                     ref[i]);
    }
    for (int i = 0; i < h->n_ends; i++) {
        if (expect_ok)
            cr_assert_eq(h->ends[i].reason, REASON(OK), "migration %d ended with %d", i,
                         h->ends[i].reason);
    }
    cr_assert_eq(moe_mig_active(h->mig[1]) + moe_mig_active(h->mig[2]), 0);
    cr_assert_eq(used_blocks(h->eng[1]), 0, "KV left behind on rank 1");
    cr_assert_eq(used_blocks(h->eng[2]), h->base2, "KV left behind on rank 2");
}

Test(migrate, greedy_once_several_times_and_back)
{
    harness h;
    harness_init(&h, NULL, 0);
    moe_sampling_params sp = {.temperature = 0.0f, .top_p = 1.0f};
    int at[] = {3, 9, 17, 30, 41};
    run_migrations(&h, &sp, at, 5, 60, 1, true);
    cr_assert_eq(h.n_ends, 5);
    /* Tokens came from both engines, and from rank 1 again after the way back. */
    cr_assert_eq(h.who[0], 1);
    cr_assert_eq(h.who[59], 2, "after 5 moves the sequence ends on rank 2");
    for (int i = 0; i < h.n_ends; i++)
        cr_assert_geq(h.ends[i].stages, 2, "stage_blocks 3 forces several stages");
    harness_free(&h);
}

Test(migrate, seeded_sampling_continues_exactly)
{
    harness h;
    harness_init(&h, NULL, 0);
    moe_sampling_params sp = {.temperature = 0.9f, .top_p = 0.95f, .top_k = 40, .seed = 1234};
    int at[] = {2, 10, 11, 25};
    run_migrations(&h, &sp, at, 4, 48, 2, true);
    cr_assert_eq(h.n_ends, 4);
    harness_free(&h);
}

/* Penalties count the tokens so far, which SeqState.tokens carries: a migrated sequence is
 * penalised as it would have been on its source. */
Test(migrate, penalised_sampling_continues_exactly)
{
    harness h;
    harness_init(&h, NULL, 0);
    moe_sampling_params sp = {.temperature = 0.8f, .top_p = 1.0f, .seed = 4321,
                              .presence_penalty = 1.0f, .frequency_penalty = 0.5f,
                              .repetition_penalty = 1.5f};
    int at[] = {3, 17};
    run_migrations(&h, &sp, at, 2, 40, 2, true);
    cr_assert_eq(h.n_ends, 2);
    harness_free(&h);
}

Test(migrate, every_block_is_sent_once)
{
    moe_mig_test_hooks hooks = {.min_stages = 4};
    harness h;
    harness_init(&h, &hooks, 0);
    moe_sampling_params sp = {.temperature = 0.0f, .top_p = 1.0f};
    int at[] = {20};
    run_migrations(&h, &sp, at, 1, 50, 1, true);
    cr_assert_eq(h.n_ends, 1);
    const end_t *e = &h.ends[0];
    cr_assert_geq(e->stages, 5, "min_stages 4: %u stages", e->stages);
    /* The blocks sent are exactly the sequence's blocks at the pause: none twice. */
    size_t bb = moe_engine_kv_block_bytes(h.eng[1]);
    cr_assert_eq(e->bytes, (uint64_t)e->blocks * bb);
    int n_tokens_at_pause = 0;
    for (int i = 0; i < MAX_TOK; i++)
        if (h.who[i] == 1)
            n_tokens_at_pause = i + 1;
    /* positions with K/V at the pause: the prompt and every generated token but the last */
    int computed = N_PROMPT + n_tokens_at_pause - 1;
    cr_assert_eq((int)e->blocks, (computed + 3) / 4, "%u blocks for %d positions", e->blocks,
                 computed);
    cr_assert_gt(e->pause_ns, 0);
    harness_free(&h);
}

/* One abort hook: the migration ends with `want`, the sequence finishes on rank 1 exactly as
 * unmigrated, and rank 2 holds nothing. */
static void abort_case(moe_mig_hook_kind kind, int stage, Moeserve__Cluster__V1__MigReason want)
{
    moe_mig_test_hooks hooks = {.abort_kind = kind, .abort_stage = stage, .abort_count = -1};
    harness h;
    harness_init(&h, &hooks, 0);
    moe_sampling_params sp = {.temperature = 0.7f, .top_p = 1.0f, .seed = 99};
    int at[] = {12};
    run_migrations(&h, &sp, at, 1, 40, 1, false);
    cr_assert_eq(h.n_ends, 1);
    cr_assert_eq(h.ends[0].reason, want, "kind %d stage %d: reason %d", kind, stage,
                 h.ends[0].reason);
    for (int i = 0; i < 40; i++)
        cr_assert_eq(h.who[i], 1, "token %d came from rank %d", i, h.who[i]);
    cr_assert_eq(used_blocks(h.eng[2]), 0);
    harness_free(&h);
}

Test(migrate, abort_dest_refuses_first_stage)
{
    abort_case(MOE_MIG_HOOK_DEST, 0, REASON(TEST_HOOK));
}

Test(migrate, abort_dest_refuses_later_stage)
{
    abort_case(MOE_MIG_HOOK_DEST, 1, REASON(TEST_HOOK));
}

Test(migrate, abort_dest_refuses_final_stage)
{
    abort_case(MOE_MIG_HOOK_DEST, MOE_MIG_FINAL_STAGE, REASON(TEST_HOOK));
}

Test(migrate, abort_source_before_sending)
{
    abort_case(MOE_MIG_HOOK_SRC, 1, REASON(TEST_HOOK));
}

Test(migrate, abort_source_after_pausing)
{
    abort_case(MOE_MIG_HOOK_SRC, MOE_MIG_FINAL_STAGE, REASON(TEST_HOOK));
}

Test(migrate, abort_source_with_data_in_flight)
{
    abort_case(MOE_MIG_HOOK_SENT, 0, REASON(TEST_HOOK));
}

Test(migrate, corrupt_block_aborts_stage)
{
    abort_case(MOE_MIG_HOOK_CORRUPT, 0, REASON(TRANSFER));
}

Test(migrate, corrupt_block_aborts_final_stage)
{
    abort_case(MOE_MIG_HOOK_CORRUPT, MOE_MIG_FINAL_STAGE, REASON(TRANSFER));
}

Test(migrate, destination_full)
{
    harness h;
    harness_init(&h, NULL, 16);
    /* Another sequence parks 11 of rank 2's 16 blocks: stage 0 (3 blocks) fits, stage 1 not. */
    moe_sampling_params sp = {.temperature = 0.0f, .top_p = 1.0f};
    int32_t filler[44];
    for (int i = 0; i < 44; i++)
        filler[i] = (i * 13 + 1) % 900;
    cr_assert_eq(moe_engine_add_prefill_only(h.eng[2], 8, filler, 44, &sp, 10, true), MOE_OK);
    turn(&h);
    h.base2 = used_blocks(h.eng[2]);
    cr_assert_eq(h.base2, 11);
    int at[] = {14};
    run_migrations(&h, &sp, at, 1, 40, 1, false);
    cr_assert_eq(h.n_ends, 1);
    cr_assert_eq(h.ends[0].reason, REASON(DEST_FULL));
    for (int i = 0; i < 40; i++)
        cr_assert_eq(h.who[i], 1);
    harness_free(&h);
}

Test(migrate, source_finishes_mid_migration)
{
    moe_mig_test_hooks hooks = {.stall_ms = 300};
    harness h;
    harness_init(&h, &hooks, 0);
    moe_sampling_params sp = {.temperature = 0.0f, .top_p = 1.0f};
    int at[] = {26};
    run_migrations(&h, &sp, at, 1, 30, 1, false);
    cr_assert_eq(h.n_ends, 1);
    cr_assert_eq(h.ends[0].reason, REASON(SEQ_GONE));
    cr_assert_eq(used_blocks(h.eng[2]), 0);
    harness_free(&h);
}

Test(migrate, freed_on_both_sides_mid_migration)
{
    harness h;
    harness_init(&h, NULL, 0);
    moe_sampling_params sp = {.temperature = 0.0f, .top_p = 1.0f};
    cr_assert_eq(moe_engine_add(h.eng[1], 7, PROMPT, N_PROMPT, &sp, 100, true), MOE_OK);
    while (h.n_tok < 20)
        turn(&h);
    start_migration(&h, 1, 2, 5, 1);
    deliver(&h); /* MigrateSeq -> Prepare(0) -> Ready(0) -> Data(0): receives posted, data sent */
    cr_assert_gt(used_blocks(h.eng[2]), 0, "stage 0 reserved blocks on the destination");
    /* The coordinator frees the request everywhere (a cancel): the destination lets its
     * receives end before it frees; the source aborts and frees through its usual path. */
    cr_assert(moe_mig_on_free(h.mig[2], 7));
    cr_assert_not(moe_mig_on_free(h.mig[1], 7));
    cr_assert_eq(moe_engine_finish(h.eng[1], 7), MOE_OK);
    for (int k = 0; k < 20; k++)
        turn(&h);
    cr_assert_eq(h.n_ends, 1);
    cr_assert_eq(h.ends[0].reason, REASON(SEQ_GONE));
    cr_assert_eq(used_blocks(h.eng[1]) + used_blocks(h.eng[2]), 0);
    cr_assert_eq(moe_mig_active(h.mig[1]) + moe_mig_active(h.mig[2]), 0);
    harness_free(&h);
}

Test(migrate, refuses_what_cannot_move)
{
    harness h;
    harness_init(&h, NULL, 0);
    moe_sampling_params sp = {.temperature = 0.0f, .top_p = 1.0f};
    start_migration(&h, 1, 2, 1, 1); /* unknown sequence */
    deliver(&h);
    cr_assert_eq(moe_engine_add(h.eng[1], 7, PROMPT, N_PROMPT, &sp, 20, true), MOE_OK);
    start_migration(&h, 1, 2, 2, 1); /* still waiting for its prefill */
    deliver(&h);
    start_migration(&h, 1, 1, 3, 1); /* to itself */
    deliver(&h);
    cr_assert_eq(h.n_ends, 3);
    cr_assert_eq(h.ends[0].reason, REASON(SEQ_GONE));
    cr_assert_eq(h.ends[1].reason, REASON(NOT_MIGRATABLE));
    cr_assert_eq(h.ends[2].reason, REASON(NOT_MIGRATABLE));
    cr_assert_eq(used_blocks(h.eng[2]), 0);
    harness_free(&h);
}

Test(migrate, test_hooks_from_env)
{
    moe_mig_test_hooks hk;
    setenv("MOE_TEST_HOOKS", "1", 1);
    setenv("MOE_TEST_MIGRATE_ABORT", "dest:final:all", 1);
    setenv("MOE_TEST_MIGRATE_STALL_MS", "25", 1);
    moe_mig_test_hooks_from_env(&hk);
    cr_assert_eq(hk.abort_kind, MOE_MIG_HOOK_DEST);
    cr_assert_eq(hk.abort_stage, MOE_MIG_FINAL_STAGE);
    cr_assert_eq(hk.abort_count, -1);
    cr_assert_eq(hk.stall_ms, 25);
    setenv("MOE_TEST_MIGRATE_ABORT", "corrupt:2", 1);
    moe_mig_test_hooks_from_env(&hk);
    cr_assert_eq(hk.abort_kind, MOE_MIG_HOOK_CORRUPT);
    cr_assert_eq(hk.abort_stage, 2);
    cr_assert_eq(hk.abort_count, 1);
    moe_log_threshold = MOE_LOG_ERROR;
    setenv("MOE_TEST_MIGRATE_ABORT", "sent:final", 1); /* the destination decides there */
    moe_mig_test_hooks_from_env(&hk);
    cr_assert_eq(hk.abort_kind, MOE_MIG_HOOK_NONE);
    setenv("MOE_TEST_MIGRATE_ABORT", "bogus", 1);
    moe_mig_test_hooks_from_env(&hk);
    cr_assert_eq(hk.abort_kind, MOE_MIG_HOOK_NONE);
}
