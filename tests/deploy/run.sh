#!/usr/bin/env bash
# deploy/'s tests without a cluster (scripts/test.sh runs this as one stage):
#   tests/deploy/run.sh [TEST...]      e.g. manifests_test.Validate  scripts_test.PreStop.test_waits_for_the_drain
# manifests_test.py: every kustomize overlay renders; kubernetes-validate --strict; LeaderWorkerSets
#   against the LWS CRD schema; the rendered objects agree with each other; yamllint.
# scripts_test.py: the image's entrypoint, preStop and readiness scripts run for real; shellcheck.
# With MOE_DEPLOY_DEBOOTSTRAP=1 also deploy/image/check-debootstrap.sh (minutes, needs Debian's
# mirrors: the image's install steps in fresh bookworm roots).
# Ends with "deploy: N passed, M failed".
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
rc=0
python3 - "$here" "$@" <<'PY' || rc=1
import sys, unittest
here, names = sys.argv[1], sys.argv[2:]
sys.path.insert(0, here)
loader = unittest.defaultTestLoader
suite = loader.loadTestsFromNames(names) if names else loader.discover(here, pattern="*_test.py", top_level_dir=here)
r = unittest.TextTestRunner(verbosity=2).run(suite)
bad = len(r.failures) + len(r.errors) + len(r.unexpectedSuccesses)
print(f"deploy: {r.testsRun - bad - len(r.skipped)} passed, {bad} failed")
sys.exit(1 if bad or r.testsRun == 0 else 0)
PY
if [ "${MOE_DEPLOY_DEBOOTSTRAP:-0}" = 1 ]; then
  "$here/../../deploy/image/check-debootstrap.sh" || rc=1
fi
exit "$rc"
