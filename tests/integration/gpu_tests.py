"""The CUDA backend in a running cluster, against moe-generate on the CPU (docs/backends.md).
`gpu_tests.py --list` names the tests, `gpu_tests.py NAME` runs one (exit 0 = pass, 77 = skipped:
the reason is printed). Where there is no GPU only the absence test runs: --device cuda must be a
clear error, not a crash. scripts/gpu-check.sh runs them all on a GPU machine."""
import os
import subprocess
import sys

from cluster import MPI_ENV, MODEL, Cluster, TestFailure, build_dir, check, gen_request, generate, reference

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
