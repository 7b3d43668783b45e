/* Measures moe_threadpool_run's fixed cost: empty tasks, hot (back-to-back runs: workers spin)
 * and cold (a pause between runs: workers sleep in the futex and must be woken). */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "kernels/kernels.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void empty_task(void *arg, int task, int thread)
{
    (void)task;
    (void)thread;
    atomic_fetch_add_explicit((_Atomic long *)arg, 1, memory_order_relaxed);
}

int main(int argc, char **argv)
{
    int max_threads = argc > 1 ? atoi(argv[1]) : 2;
    int runs = argc > 2 ? atoi(argv[2]) : 200000;
    _Atomic long counter = 0;
    printf("threads  tasks  hot_us/run  cold_us/run (after 1 ms idle)\n");
    for (int nt = 1; nt <= max_threads; nt++) {
        moe_threadpool_t *pool = moe_threadpool_create(nt);
        if (!pool) {
            fprintf(stderr, "threadpool_create(%d) failed\n", nt);
            return 1;
        }
        int n_tasks = nt * 4;
        for (int i = 0; i < 1000; i++) /* warm up: threads started and spinning */
            moe_threadpool_run(pool, empty_task, &counter, n_tasks);
        double t0 = now_s();
        for (int i = 0; i < runs; i++)
            moe_threadpool_run(pool, empty_task, &counter, n_tasks);
        double hot = (now_s() - t0) / runs * 1e6;
        int cold_runs = 200;
        double cold = 0;
        for (int i = 0; i < cold_runs; i++) {
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
            double c0 = now_s();
            moe_threadpool_run(pool, empty_task, &counter, n_tasks);
            cold += now_s() - c0;
        }
        printf("%7d  %5d  %10.3f  %10.3f\n", nt, n_tasks, hot, cold / cold_runs * 1e6);
        moe_threadpool_free(pool);
    }
    long want = 0;
    for (int nt = 1; nt <= max_threads; nt++)
        want += (long)nt * 4 * (1000 + runs + 200);
    if (atomic_load(&counter) != want) {
        fprintf(stderr, "task count mismatch: %ld != %ld\n", atomic_load(&counter), want);
        return 1;
    }
    return 0;
}
