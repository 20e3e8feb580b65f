#!/usr/bin/env python3
"""Validates deploy/ offline; run by deploy/validate/run (scripts/test).

1. deploy/Dockerfile: hadolint, then dockerfile.py (stages, user, binaries,
   and the build context loaded by cargo with the committed lock).
2. Each kustomization under deploy/k8s: rendered by render.py; where kubectl
   exists, also by `kubectl kustomize`, and the two must agree.
3. Every rendered object against the Kubernetes API schema of
   KUBERNETES_VERSION, strictly (unknown fields fail): kubernetes-validate.
4. policy.py on each rendering (drain arithmetic, probes, references, ...).
5. A self-test: known-bad variants of the manifests and the Dockerfile must
   each be rejected, so a check that silently stopped working is noticed.
"""

import copy
import os
import shutil
import subprocess
import sys
import tempfile

import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import dockerfile  # noqa: E402
import policy  # noqa: E402
import render  # noqa: E402

KUBERNETES_VERSION = "1.30.0"
K8S = os.path.join(ROOT, "deploy", "k8s")
# name -> (require_app, require_datastores, Secrets/ConfigMaps made elsewhere).
# The base names its images without tags (`chat-gateway`, `chat-persister`):
# overlays set them, so only overlays must have fixed tags.
KUSTOMIZATIONS = {
    "base": (True, False, {"chat-secrets", "chat-tls"}),
    "datastores": (False, True, {"chat-secrets"}),
    "overlays/local": (True, True, set()),
    "overlays/managed": (True, False, {"chat-tls"}),
}
# Files applied by hand beside a kustomization (schema-checked and added to
# its objects for reference checks).
EXTRA = {"overlays/managed": ["overlays/managed/secret.example.yaml"]}

failures = []


def fail(message):
    failures.append(message)
    print(f"FAIL {message}")


def ok(message):
    print(f"ok   {message}")


def key(obj):
    meta = obj["metadata"]
    return (obj["kind"], meta.get("namespace", ""), meta["name"])


def differences(a, b, path=""):
    if type(a) is not type(b):
        return [f"{path or '/'}: {a!r} vs {b!r}"]
    if isinstance(a, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in {'kubectl' if k in b else 'render.py'}")
            else:
                out.extend(differences(a[k], b[k], f"{path}/{k}"))
        return out
    if isinstance(a, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}/{i}")]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def kubectl_render(directory):
    # KUBECTL= (empty) skips the comparison, as on a machine without kubectl.
    kubectl = os.environ.get("KUBECTL", shutil.which("kubectl"))
    if not kubectl:
        return None
    result = subprocess.run([kubectl, "kustomize", directory], capture_output=True, text=True)
    if result.returncode != 0:
        fail(f"kubectl kustomize {os.path.relpath(directory, ROOT)}: {result.stderr.strip()}")
        return []
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def schema_problems(docs):
    problems = []
    for obj in docs:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.append(f"{obj['kind']}/{obj['metadata'].get('name')}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{obj['kind']}/{obj['metadata'].get('name')}: {e}")
    return problems


def check_dockerfile():
    hadolint = shutil.which("hadolint")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", os.path.join(ROOT, "deploy", "Dockerfile")],
        capture_output=True,
        text=True,
    )
    if result.returncode == 0:
        ok("hadolint deploy/Dockerfile")
    else:
        fail(f"hadolint deploy/Dockerfile:\n{result.stdout}{result.stderr}")
    problems = dockerfile.check(ROOT)
    if problems:
        for p in problems:
            fail(p)
    else:
        ok("deploy/Dockerfile: stages build/runtime/gateway/persister, user 10001, build context loads with Cargo.lock")


def check_kustomizations():
    rendered = {}
    for name, (require_app, require_datastores, external) in KUSTOMIZATIONS.items():
        directory = os.path.join(K8S, name)
        try:
            docs = render.build(directory)
        except (render.RenderError, OSError) as e:
            fail(f"render.py deploy/k8s/{name}: {e}")
            continue
        by_kubectl = kubectl_render(directory)
        if by_kubectl is None:
            ok(f"deploy/k8s/{name}: rendered by render.py ({len(docs)} objects; no kubectl to compare with)")
        elif by_kubectl:
            mine = {key(d): d for d in docs}
            theirs = {key(d): d for d in by_kubectl}
            diff = []
            for k in sorted(set(mine) | set(theirs)):
                if k not in mine or k not in theirs:
                    diff.append(f"{k}: only in {'kubectl' if k in theirs else 'render.py'}")
                else:
                    diff.extend(f"{k}: {d}" for d in differences(mine[k], theirs[k]))
            if diff:
                fail(f"deploy/k8s/{name}: render.py and kubectl kustomize differ:\n  " + "\n  ".join(diff[:20]))
            else:
                ok(f"deploy/k8s/{name}: render.py and kubectl kustomize agree ({len(docs)} objects)")
        extra = []
        for path in EXTRA.get(name, []):
            extra.extend(render.load_documents(os.path.join(K8S, path)))
        problems = schema_problems(docs + extra)
        if problems:
            for p in problems:
                fail(f"deploy/k8s/{name}: Kubernetes {KUBERNETES_VERSION} schema: {p}")
        else:
            ok(f"deploy/k8s/{name}: {len(docs) + len(extra)} objects valid for Kubernetes {KUBERNETES_VERSION} (strict)")
        problems = policy.check(
            docs + extra, require_app, require_datastores, external, require_tags=name.startswith("overlays/")
        )
        if problems:
            for p in problems:
                fail(f"deploy/k8s/{name}: {p}")
        else:
            ok(f"deploy/k8s/{name}: policy")
        rendered[name] = docs
    return rendered


def find(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def gateway_container(docs):
    return find(docs, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]


def env_entry(container, name):
    return next(e for e in container["env"] if e["name"] == name)


# Each mutation of the local overlay that a check must reject.
def _grace(d):
    find(d, "Deployment", "gateway")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30


def _min_ready(d):
    find(d, "Deployment", "gateway")["spec"]["minReadySeconds"] = 5


def _drain_longer(d):
    find(d, "ConfigMap", "chat-config")["data"]["GATEWAY_DRAIN_SECS"] = "300"


def _surge(d):
    find(d, "Deployment", "gateway")["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] = 1


def _no_prestop(d):
    del gateway_container(d)["lifecycle"]


def _readiness(d):
    gateway_container(d)["readinessProbe"]["httpGet"]["path"] = "/healthz"


def _consumer(d):
    c = find(d, "Deployment", "persister")["spec"]["template"]["spec"]["containers"][0]
    entry = env_entry(c, "PERSISTER_CONSUMER")
    entry.clear()
    entry.update(name="PERSISTER_CONSUMER", value="persister")


def _aof(d):
    args = find(d, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]["args"]
    args[args.index("--appendonly") + 1] = "no"


def _secret_key(d):
    env_entry(gateway_container(d), "REDIS_URL")["valueFrom"]["secretKeyRef"]["key"] = "REDIS"


def _service_port(d):
    find(d, "Service", "gateway")["spec"]["ports"][0]["targetPort"] = "web"


def _ws_timeout(d):
    find(d, "Ingress", "chat-ws")["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"] = "60"


def _latest(d):
    gateway_container(d)["image"] = "chat-gateway:latest"


def _root(d):
    gateway_container(d)["securityContext"]["readOnlyRootFilesystem"] = False


def _unknown_field(d):
    gateway_container(d)["readinesProbe"] = {}


POLICY_MUTATIONS = [
    ("a grace period shorter than preStop + drain", _grace),
    ("minReadySeconds shorter than preStop + drain", _min_ready),
    ("a drain longer than the grace period", _drain_longer),
    ("maxUnavailable 1", _surge),
    ("no preStop hook", _no_prestop),
    ("readiness on /healthz", _readiness),
    ("one consumer name for every persister", _consumer),
    ("Redis without AOF", _aof),
    ("a Secret key that does not exist", _secret_key),
    ("a Service targetPort that does not exist", _service_port),
    ("a WebSocket read timeout of 60 s", _ws_timeout),
    ("an image tagged latest", _latest),
    ("a writable root filesystem", _root),
]


def self_test(rendered):
    local = rendered.get("overlays/local")
    if not local:
        fail("self-test: the local overlay did not render")
        return
    _, _, external = KUSTOMIZATIONS["overlays/local"]
    for what, mutate in POLICY_MUTATIONS:
        docs = copy.deepcopy(local)
        mutate(docs)
        if not policy.check(docs, True, True, external):
            fail(f"self-test: policy.py accepts {what}")
    docs = copy.deepcopy(local)
    _unknown_field(docs)
    if not schema_problems([find(docs, "Deployment", "gateway")]):
        fail("self-test: the schema check accepts an unknown field (readinesProbe)")

    with tempfile.TemporaryDirectory(prefix="chat-render-") as scratch:
        with open(os.path.join(scratch, "kustomization.yaml"), "w") as f:
            f.write("commonLabels: {a: b}\nresources: []\n")
        try:
            render.build(scratch)
            fail("self-test: render.py accepts a field outside its subset (commonLabels)")
        except render.RenderError:
            pass

    original = open(os.path.join(ROOT, "deploy", "Dockerfile"), encoding="utf-8").read()
    head, marker, gateway_stage = original.partition("FROM runtime AS gateway\n")
    for what, bad in [
        ("a final stage without USER 10001", head + marker + gateway_stage.replace("USER 10001:10001", "USER 0")),
        ("a workspace member left out of the build", original.replace("COPY scripts/loadgen scripts/loadgen\n", "")),
        ("a toolchain in the gateway image", head + marker + "RUN apt-get install -y gcc\n" + gateway_stage),
        ("a gateway image without the browser client", original.replace("COPY gateway/web/public ", "# ")),
    ]:
        if bad == original:
            fail(f"self-test: could not make {what} (deploy/Dockerfile changed shape; update the self-test)")
            continue
        with tempfile.TemporaryDirectory(prefix="chat-dockerfile-root-") as scratch:
            os.makedirs(os.path.join(scratch, "deploy"))
            with open(os.path.join(scratch, "deploy", "Dockerfile"), "w", encoding="utf-8") as f:
                f.write(bad)
            for entry in ("Cargo.toml", "Cargo.lock", "shared", "gateway", "persister", "migrations", "scripts"):
                os.symlink(os.path.join(ROOT, entry), os.path.join(scratch, entry))
            if not dockerfile.check(scratch):
                fail(f"self-test: dockerfile.py accepts {what}")
    if not any(f.startswith("self-test") for f in failures):
        ok(
            f"self-test: {len(POLICY_MUTATIONS)} bad manifests, an unknown field, an unsupported "
            "kustomize field and 4 bad Dockerfiles are all rejected"
        )


def main():
    check_dockerfile()
    rendered = check_kustomizations()
    self_test(rendered)
    if failures:
        print(f"\ndeploy validation: {len(failures)} problem(s)")
        return 1
    print("\ndeploy validation: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
