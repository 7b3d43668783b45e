/* The persistent worker pool every multi-threaded kernel runs on (spin-then-futex wake-up). */
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "kernels/cpu/kernels_internal.h"

/* How a run is published and claimed, and why it is safe without a lock:
 *
 * `state` packs (generation << 32 | next task index). The caller fills the job slot of the new
 * generation (two slots, chosen by parity), resets `done`, then stores state = (gen+1, 0) with
 * release order. A worker that sees a new generation g reads slot[g & 1] and claims task i by a
 * CAS from (g, i) to (g, i+1), only when i < n_tasks. If the CAS succeeds, the run g is still
 * live (it cannot end before task i is counted in `done`), so the slot it read is g's: slot
 * g & 1 is only rewritten by run g+2, which starts after state moved past g, which would have
 * failed the CAS. A worker that wakes late thus never runs a task of the wrong run.
 *
 * Waiting: workers spin on `state` (with a pause) for up to `spin_ns`, then sleep on the futex
 * `wake_seq`, announcing themselves in `n_sleeping`. The caller bumps wake_seq after publishing
 * and issues FUTEX_WAKE only when someone sleeps (seq_cst on both sides, so either the worker
 * sees the new state on its last check or the caller sees it sleeping). The caller waits for
 * `done` the same way, with `caller_sleeping` and a wake from whoever finishes the last task. */

typedef struct {
    _Atomic(moe_task_fn) fn;
    _Atomic(void *) arg;
    _Atomic int n_tasks;
} job_slot;

struct moe_threadpool {
    int n_threads;
    pthread_t *threads; /* n_threads - 1 workers; the caller is thread 0 */
    int64_t spin_ns;
    _Atomic uint64_t state;
    job_slot slot[2];
    _Atomic uint32_t done;
    _Atomic uint32_t wake_seq;
    _Atomic int n_sleeping;
    _Atomic uint32_t caller_sleeping;
    _Atomic int stop;
};

typedef struct {
    moe_threadpool_t *pool;
    int thread;
} worker_arg;

/* The futex word is an _Atomic uint32_t, which has the size and alignment of a plain one. */
static long futex_wait(_Atomic uint32_t *addr, uint32_t expected)
{
    return syscall(SYS_futex, (void *)(uintptr_t)addr, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}

static void futex_wake(_Atomic uint32_t *addr, int n)
{
    syscall(SYS_futex, (void *)(uintptr_t)addr, FUTEX_WAKE_PRIVATE, n, NULL, NULL, 0);
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Claims and runs tasks of generation `gen` until none is left. */
static void run_tasks(moe_threadpool_t *pool, uint32_t gen, int thread)
{
    const job_slot *slot = &pool->slot[gen & 1u];
    /* Acquire: if these read a later run's values, the later run's state store is then
     * visible, so the CAS below fails rather than pairing them with generation `gen`. */
    moe_task_fn fn = atomic_load_explicit(&slot->fn, memory_order_acquire);
    void *arg = atomic_load_explicit(&slot->arg, memory_order_acquire);
    uint32_t n = (uint32_t)atomic_load_explicit(&slot->n_tasks, memory_order_acquire);
    uint64_t cur = atomic_load_explicit(&pool->state, memory_order_acquire);
    for (;;) {
        if ((uint32_t)(cur >> 32) != gen || (uint32_t)cur >= n)
            return;
        if (!atomic_compare_exchange_weak_explicit(&pool->state, &cur, cur + 1,
                                                   memory_order_acquire, memory_order_acquire))
            continue; /* cur was reloaded */
        fn(arg, (int)(uint32_t)cur, thread);
        /* acq_rel: the task's writes happen-before the caller's return. */
        uint32_t d = atomic_fetch_add_explicit(&pool->done, 1, memory_order_acq_rel) + 1;
        if (d == n && atomic_load_explicit(&pool->caller_sleeping, memory_order_seq_cst))
            futex_wake(&pool->done, 1);
        cur = atomic_load_explicit(&pool->state, memory_order_acquire);
    }
}

static void *worker_main(void *p)
{
    worker_arg wa = *(worker_arg *)p;
    free(p);
    moe_threadpool_t *pool = wa.pool;
    /* Generation 0 is "no run yet": a run published before this thread got here is still seen. */
    uint32_t seen = 0;
    for (;;) {
        /* Spin for a new generation, then sleep. */
        uint32_t gen = seen;
        int64_t deadline = pool->spin_ns > 0 ? now_ns() + pool->spin_ns : 0;
        for (unsigned it = 0;; it++) {
            gen = (uint32_t)(atomic_load_explicit(&pool->state, memory_order_acquire) >> 32);
            if (gen != seen || atomic_load_explicit(&pool->stop, memory_order_relaxed))
                break;
            if ((it & 63u) == 63u && now_ns() >= deadline) {
                uint32_t seq = atomic_load_explicit(&pool->wake_seq, memory_order_seq_cst);
                atomic_fetch_add_explicit(&pool->n_sleeping, 1, memory_order_seq_cst);
                gen = (uint32_t)(atomic_load_explicit(&pool->state, memory_order_seq_cst) >> 32);
                if (gen == seen && !atomic_load_explicit(&pool->stop, memory_order_seq_cst))
                    futex_wait(&pool->wake_seq, seq);
                atomic_fetch_sub_explicit(&pool->n_sleeping, 1, memory_order_seq_cst);
                deadline = pool->spin_ns > 0 ? now_ns() + pool->spin_ns : 0;
                continue;
            }
            cpu_relax();
        }
        if (atomic_load_explicit(&pool->stop, memory_order_acquire))
            return NULL;
        seen = gen;
        run_tasks(pool, gen, wa.thread);
    }
}

moe_threadpool_t *moe_threadpool_create(int n_threads)
{
    if (n_threads < 1)
        return NULL;
    moe_threadpool_t *pool = calloc(1, sizeof *pool);
    if (!pool)
        return NULL;
    pool->n_threads = n_threads;
    /* Spinning only pays when every thread has a core; oversubscribed, a spinning worker
     * steals the time slice of the one doing the work. MOE_POOL_SPIN_US overrides. */
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    pool->spin_ns = (ncpu > 0 && n_threads <= ncpu) ? 100000 : 0;
    const char *env = getenv("MOE_POOL_SPIN_US");
    if (env && *env)
        pool->spin_ns = (int64_t)atol(env) * 1000;
    if (n_threads > 1) {
        pool->threads = calloc((size_t)n_threads - 1, sizeof *pool->threads);
        if (!pool->threads) {
            free(pool);
            return NULL;
        }
    }
    for (int i = 1; i < n_threads; i++) {
        worker_arg *wa = malloc(sizeof *wa);
        if (wa) {
            wa->pool = pool;
            wa->thread = i;
        }
        if (!wa || pthread_create(&pool->threads[i - 1], NULL, worker_main, wa) != 0) {
            free(wa);
            pool->n_threads = i; /* free() joins only the workers that started */
            moe_threadpool_free(pool);
            return NULL;
        }
    }
    return pool;
}

void moe_threadpool_free(moe_threadpool_t *pool)
{
    if (!pool)
        return;
    atomic_store_explicit(&pool->stop, 1, memory_order_seq_cst);
    atomic_fetch_add_explicit(&pool->wake_seq, 1, memory_order_seq_cst);
    futex_wake(&pool->wake_seq, INT_MAX);
    for (int i = 1; i < pool->n_threads; i++)
        pthread_join(pool->threads[i - 1], NULL);
    free(pool->threads);
    free(pool);
}

int moe_threadpool_size(const moe_threadpool_t *pool)
{
    return pool ? pool->n_threads : 1;
}

void moe_threadpool_run(moe_threadpool_t *pool, moe_task_fn fn, void *arg, int n_tasks)
{
    if (n_tasks <= 0)
        return;
    if (!pool || pool->n_threads == 1 || n_tasks == 1) {
        for (int t = 0; t < n_tasks; t++)
            fn(arg, t, 0);
        return;
    }
    uint64_t st = atomic_load_explicit(&pool->state, memory_order_relaxed);
    uint32_t gen = (uint32_t)(st >> 32) + 1u;
    job_slot *slot = &pool->slot[gen & 1u];
    atomic_store_explicit(&slot->fn, fn, memory_order_release);
    atomic_store_explicit(&slot->arg, arg, memory_order_release);
    atomic_store_explicit(&slot->n_tasks, n_tasks, memory_order_release);
    atomic_store_explicit(&pool->done, 0, memory_order_relaxed);
    atomic_store_explicit(&pool->caller_sleeping, 0, memory_order_relaxed);
    atomic_store_explicit(&pool->state, (uint64_t)gen << 32, memory_order_seq_cst);
    atomic_fetch_add_explicit(&pool->wake_seq, 1, memory_order_seq_cst);
    if (atomic_load_explicit(&pool->n_sleeping, memory_order_seq_cst) > 0)
        futex_wake(&pool->wake_seq, INT_MAX);

    run_tasks(pool, gen, 0);

    uint32_t n = (uint32_t)n_tasks;
    int64_t deadline = 0;
    for (unsigned it = 0;; it++) {
        uint32_t d = atomic_load_explicit(&pool->done, memory_order_acquire);
        if (d == n)
            break;
        if ((it & 63u) == 63u) {
            int64_t t = now_ns();
            if (deadline == 0)
                deadline = t + pool->spin_ns;
            if (t >= deadline) {
                atomic_store_explicit(&pool->caller_sleeping, 1, memory_order_seq_cst);
                d = atomic_load_explicit(&pool->done, memory_order_seq_cst);
                if (d != n)
                    futex_wait(&pool->done, d);
                continue;
            }
        }
        cpu_relax();
    }
    /* Pairs with the workers' acq_rel increments: all task writes are visible now. */
    atomic_thread_fence(memory_order_acquire);
}
