"""The CUDA backend in a running cluster, against moe-generate on the CPU (docs/backends.md).
`gpu_tests.py --list` names the tests, `gpu_tests.py NAME` runs one (exit 0 = pass, 77 = skipped:
the reason is printed). Where there is no GPU the absence test runs (--device cuda must be a clear
error, not a crash), and the KV hand-off and migration cases run on the CPU through the staging
path a device takes (staged_*); scripts/gpu-check.sh runs them all on a GPU machine."""
import os
import subprocess
import sys

from cluster import (MPI_ENV, MODEL, Cluster, TestFailure, build_dir, check, gen_request, generate, mixed_workload,
                     reference)

tests = {}


def test(fn):
    tests[fn.__name__] = fn
    return fn


class Skip(Exception):
    pass


def gpus():
    """GPUs nvidia-smi lists (0 without a driver)."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def need_gpus(n):
    have = gpus()
    if have < n:
        raise Skip("needs %d GPU(s), %d visible" % (n, have))


PROMPTS = [[5, 6, 7, 8], [17, 3, 99, 250, 11, 2], [400, 401, 402]]


def matches_cpu(np, args):
    refs = [reference(ids=p, max_new=12) for p in PROMPTS]
    with Cluster(np=np, args=["--colocated", "--device", "cuda"] + args, startup_s=180) as c:
        for p, want in zip(PROMPTS, refs):
            got, _, _ = generate(c.stub, gen_request(ids=p, max_new=12), timeout=120)
            check(got == want, "prompt %s: cuda %s, cpu moe-generate %s" % (p, got, want))
        log = c.stderr()
        check("cuda backend" in log, "no worker said it runs the cuda backend:\n%s" % log[-2000:])
        rc = c.stop()
        check(rc == 0, "mpirun exited %s after the drain:\n%s" % (rc, c.stderr()[-3000:]))


@test
def cuda_absent_is_a_clear_error():
    """No GPU: moe-generate and moe-serve --device cuda exit non-zero with a message naming the
    device and the way out (--device cpu), before any request."""
    if gpus() > 0:
        raise Skip("a GPU is present: the absence path cannot be seen here")
    gen = subprocess.run([os.path.join(build_dir(), "moe-generate"), "--model", MODEL, "--prompt-ids", "1,2",
                          "--max-new-tokens", "2", "--device", "cuda"], capture_output=True, text=True, timeout=60)
    check(gen.returncode != 0, "moe-generate --device cuda exited 0 without a GPU")
    check("device cuda" in gen.stderr and "--device cpu" in gen.stderr, "moe-generate said: %r" % gen.stderr)
    env = dict(os.environ, **MPI_ENV)
    srv = subprocess.run(["mpirun", "--oversubscribe", "-np", "2", os.path.join(build_dir(), "moe-serve"), "--model",
                          MODEL, "--listen", "127.0.0.1:0", "--device", "cuda"], capture_output=True, text=True,
                         timeout=60, env=env)
    check(srv.returncode != 0, "moe-serve --device cuda exited 0 without a GPU")
    check("--device cuda:" in srv.stderr, "moe-serve said: %r" % srv.stderr[-2000:])


@test
def cuda_mixed_instance_matches_cpu():
    """One mixed instance on GPU 0: greedy ids equal moe-generate's on the CPU."""
    need_gpus(1)
    matches_cpu(2, [])


# ---- the KV hand-off and live migration on device blocks (worker/kv_stage.c) ----
# The same cases run twice: on CUDA (GPU 0 for every worker rank), and on the CPU with
# MOE_TEST_KV_STAGING=1, which sends every block through the host staging buffers a device pool
# needs (download before a send, upload after a verified receive): that path runs here on every
# machine, the CUDA one wherever a GPU is.
STAGED = {"MOE_TEST_KV_STAGING": "1"}


def handoff_case(device_args, env):
    """1 prefill + 1 decode instance, layer-by-layer push then whole-block pull: outputs equal
    moe-generate's on the CPU, every multi-token request's KV crossed, no checksum failure, no
    recompute, KV back to zero."""
    from cluster_tests import compare, references, run_workload
    reqs = mixed_workload(12, seed=515)
    refs = references(reqs)
    for mode in ("layer", "block"):
        with Cluster(np=3, args=["--batch-tokens", "64", "--kv-transfer", mode] + device_args, env=env,
                     startup_s=180) as c:
            got = run_workload(c, reqs)
            compare(reqs, got, refs)
            pulled = sum(1 for ids, _ in got if len(ids) > 1)
            st = c.wait_counters(lambda k: k.kv_transfers >= pulled)
            k = st.counters
            check(k.kv_transfers >= pulled and k.kv_transfer_bytes > 0, "%s: %s" % (mode, k))
            check(k.kv_checksum_failures == 0 and k.kv_transfer_recomputes == 0, "%s: %s" % (mode, k))
            check((k.kv_transfers_layerwise > 0) == (mode == "layer"), "%s: %s" % (mode, k))
            if env:
                check("MOE_TEST_KV_STAGING=1" in c.stderr(), "the staging hook was not read")
            c.wait_idle()
            print("%s: %d KV transfers (%d layer by layer), %d bytes" % (mode, k.kv_transfers,
                                                                       k.kv_transfers_layerwise, k.kv_transfer_bytes))
            rc = c.stop()
            check(rc == 0, "mpirun exited %s after the drain:\n%s" % (rc, c.stderr()[-3000:]))


def migration_case(device_args, env):
    """1 prefill + 2 decode instances, every decoding request moved every 4 tokens: the streams
    equal the unmigrated outputs (moe-generate on the CPU), KV back to zero."""
    from migration_tests import LAYOUT, ref_of, run_and_compare, workload
    reqs = workload(4, 60)
    refs = [ref_of(r) for r in reqs]
    with Cluster(np=4, args=LAYOUT + device_args, env=dict(env, MOE_TEST_MIGRATE_EVERY="4"), startup_s=180) as c:
        run_and_compare(c, reqs, refs)
        st = c.wait_idle()
        g = st.migration
        check(g.completed >= len(reqs) and g.bytes > 0 and g.stages >= g.completed, "migration counters: %s" % g)
        print("%d migrations completed, %d aborted, %.2f MiB, pause max %.2f ms"
              % (g.completed, g.aborted, g.bytes / 2**20, g.pause_ms_max))
        rc = c.stop()
        check(rc == 0, "mpirun exited %s after the drain:\n%s" % (rc, c.stderr()[-3000:]))


@test
def staged_kv_handoff_on_cpu():
    """The hand-off through host staging buffers (the device path), on the CPU backend."""
    handoff_case([], STAGED)


@test
def staged_kv_migration_on_cpu():
    """Live migration through host staging buffers (the device path), on the CPU backend."""
    migration_case([], STAGED)


@test
def cuda_disaggregated_1p1d_matches_cpu():
    """1P+1D on GPU 0 (both ranks): device KV blocks staged through host memory, pushed layer by
    layer and pulled whole; outputs equal moe-generate's on the CPU."""
    need_gpus(1)
    handoff_case(["--device", "cuda"], {})


@test
def cuda_migration_matches_cpu():
    """1P+2D on GPU 0, forced migrations of device KV blocks: outputs equal moe-generate's."""
    need_gpus(1)
    migration_case(["--device", "cuda"], {})


@test
def cuda_ep2_instance_matches_cpu():
    """One expert-parallel instance of 2 ranks on GPUs 0 and 1, all-to-all over NCCL on device
    buffers: greedy ids equal moe-generate's on the CPU. NCCL cannot put two ranks of one
    communicator on one GPU, so one GPU is a skip, said so."""
    need_gpus(2)
    matches_cpu(3, ["--ep-size", "2"])


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] == "--list":
        print("\n".join(tests))
        sys.exit(0)
    if len(sys.argv) != 2 or sys.argv[1] not in tests:
        print("usage: gpu_tests.py --list | NAME", file=sys.stderr)
        sys.exit(2)
    try:
        tests[sys.argv[1]]()
    except Skip as e:
        print("SKIP: %s" % e)
        sys.exit(77)
    except TestFailure as e:
        print("FAIL: %s" % e)
        sys.exit(1)
    print("PASS")
