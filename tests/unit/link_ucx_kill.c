/* A real killed process on the UCX cluster link: the coordinator (this process) and two joined
 * ranks (forked children, A and B, B connected to A). A is SIGKILLed; the coordinator and B must
 * each see MOE_LINK_LOST of A within a second. A plain program, not Criterion (it forks), run by
 * ctest as link_ucx_kill. Exit 0 on success; prints the two delays. */
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/log.h"
#include "ctrl/link_ucx.h"

#define TOKEN "kill-test-token-0123456789"
enum { T_PEER = 1, T_HELLO = 2, T_SAW_LOST = 3, T_GOT = 4 };

static pid_t kids[2];

static void fail(const char *what)
{
    fprintf(stderr, "link_ucx_kill: FAIL: %s (%s)\n", what, moe_error_message());
    for (int i = 0; i < 2; i++) {
        int st = 0;
        if (kids[i] > 0 && waitpid(kids[i], &st, WNOHANG) == kids[i])
            fprintf(stderr, "link_ucx_kill: rank %c had ended: %s %d\n", 'A' + i,
                    WIFSIGNALED(st) ? "signal" : "exit", WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
        else if (kids[i] > 0)
            kill(kids[i], SIGKILL);
    }
    exit(1);
}

/* A rank: joins, then answers the test's messages until killed (A) or A is lost (B). */
static int child(const char *name, int port)
{
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
    moe_link_ucx_opts o = {.addr = addr, .token = TOKEN, .hello = name, .hello_len = strlen(name),
                           .timeout_ms = 10000, .host = name};
    moe_link *l = NULL;
    if (moe_link_ucx_join(&o, &l) != MOE_OK) {
        fprintf(stderr, "%s: join: %s\n", name, moe_error_message());
        return 3;
    }
    int peer = -1;
    int64_t end = moe_now_ns() + 30000000000LL;
    while (moe_now_ns() < end) {
        moe_link_event e;
        if (!moe_link_poll(l, &e)) {
            moe_sleep_ns(200000);
            continue;
        }
        if (e.kind == MOE_LINK_MSG && e.tag == T_PEER && e.len == sizeof peer) {
            memcpy(&peer, e.buf, sizeof peer);
            /* Directory announcements may trail the coordinator's message: retry briefly. */
            while (l->ops->send(l->ctx, peer, T_HELLO, "hi", 2) != MOE_OK && moe_now_ns() < end)
                moe_link_poll(l, &e);
        } else if (e.kind == MOE_LINK_MSG && e.tag == T_HELLO) {
            l->ops->send(l->ctx, MOE_LINK_COORDINATOR, T_GOT, "ok", 2);
        } else if (e.kind == MOE_LINK_LOST && e.src == peer) {
            int64_t now = moe_now_ns();
            l->ops->send(l->ctx, MOE_LINK_COORDINATOR, T_SAW_LOST, &now, sizeof now);
            moe_link_flush(l, 2000);
            moe_link_free(l);
            return 0;
        } else if (e.kind == MOE_LINK_LOST && e.src == MOE_LINK_COORDINATOR) {
            break;
        }
    }
    moe_link_free(l);
    return 4;
}

static moe_link_event wait_for(moe_link *l, moe_link_event_kind kind, int src, int tag, int ms)
{
    int64_t end = moe_now_ns() + (int64_t)ms * 1000000;
    moe_link_event e;
    while (moe_now_ns() < end) {
        if (!moe_link_poll(l, &e)) {
            moe_sleep_ns(100000);
            continue;
        }
        if (e.kind == kind && (src < 0 || e.src == src) && (tag < 0 || e.tag == tag))
            return e;
    }
    e.kind = 0;
    return e;
}

int main(int argc, char **argv)
{
    bool kid = argc == 4 && !strcmp(argv[1], "child");
    moe_log_init(kid ? argv[2][0] - 'A' + 1 : 0); /* log lines say who: 0, 1 (A), 2 (B) */
    if (kid)
        return child(argv[2], atoi(argv[3]));
    moe_link_ucx_opts o = {.addr = "127.0.0.1:0", .token = TOKEN, .host = "coordinator"};
    moe_link *l = NULL;
    if (moe_link_ucx_listen(&o, &l) != MOE_OK)
        fail("listen");
    int port = moe_link_ucx_port(l), id[2] = {-1, -1};
    char ports[16];
    snprintf(ports, sizeof ports, "%d", port);
    const char *names[2] = {"A", "B"};
    for (int i = 0; i < 2; i++) {
        /* fork + exec, as real ranks start: UCX (started here already) does not survive a bare
         * fork. */
        if ((kids[i] = fork()) == 0) {
            execl("/proc/self/exe", argv[0], "child", names[i], ports, (char *)NULL);
            _exit(127);
        }
        moe_link_event e = wait_for(l, MOE_LINK_JOINED, -1, -1, 10000);
        if (!e.kind)
            fail("no JOINED");
        id[e.len == 1 && e.buf[0] == 'B'] = e.src;
        if (i == 1 && (id[0] < 0 || id[1] < 0))
            fail("JOINED hellos");
    }
    if (l->ops->send(l->ctx, id[1], T_PEER, &id[0], sizeof id[0]) != MOE_OK)
        fail("send to B");
    if (!wait_for(l, MOE_LINK_MSG, id[0], T_GOT, 10000).kind)
        fail("A never heard from B");
    int64_t t0 = moe_now_ns();
    kill(kids[0], SIGKILL);
    /* Both in one loop: B may see the loss (and report it) before the coordinator does. */
    double coord_ms = -1, peer_ms = -1;
    int64_t end = t0 + 3000000000LL;
    while ((coord_ms < 0 || peer_ms < 0) && moe_now_ns() < end) {
        moe_link_event e;
        if (!moe_link_poll(l, &e)) {
            moe_sleep_ns(100000);
            continue;
        }
        if (e.kind == MOE_LINK_LOST && e.src == id[0] && coord_ms < 0)
            coord_ms = (double)(moe_now_ns() - t0) / 1e6;
        if (e.kind == MOE_LINK_MSG && e.src == id[1] && e.tag == T_SAW_LOST &&
            e.len == sizeof(int64_t)) {
            int64_t tb;
            memcpy(&tb, e.buf, sizeof tb);
            peer_ms = (double)(tb - t0) / 1e6;
        }
    }
    if (coord_ms < 0)
        fail("no LOST of the killed rank at the coordinator");
    if (peer_ms < 0)
        fail("B did not report the loss");
    int st = 0;
    waitpid(kids[0], &st, 0);
    kids[0] = 0;
    waitpid(kids[1], &st, 0);
    kids[1] = 0;
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        fail("B exited badly");
    moe_link_free(l);
    printf("link_ucx_kill: SIGKILLed rank lost after %.1f ms at the coordinator, %.1f ms at a peer "
           "rank\n",
           coord_ms, peer_ms);
    if (coord_ms > 1000.0 || peer_ms > 1000.0)
        fail("the loss was seen after more than 1 s");
    return 0;
}
