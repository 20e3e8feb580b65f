"""What the chat service needs from its Kubernetes objects, beyond what the
API schema says: the drain arithmetic (grace period and minReadySeconds
follow preStop and GATEWAY_DRAIN_SECS), probes on the right paths, rolling
updates one pod at a time, a non-root read-only container everywhere,
references that resolve (Secrets, ConfigMaps, Services, ports), Redis with
AOF. docs/operations.md explains each rule; check.py runs them on every
rendered kustomization.

`check(docs, ...)` returns a list of problems (strings); empty means fine.
"""

import re

# The user the images run as (deploy/Dockerfile: USER 10001:10001).
IMAGE_UID = 10001
# Margin between the gateway's drain deadline and SIGKILL, and between one
# gateway's drain and the next one's start in a rolling update.
DRAIN_MARGIN_SECS = 5
WEBSOCKET_TIMEOUT_SECS = 3600
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "DaemonSet"}


class Objects:
    def __init__(self, docs):
        self.docs = docs

    def of(self, kind):
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind, name):
        for d in self.of(kind):
            if d["metadata"]["name"] == name:
                return d
        return None


def pod_spec(obj):
    return obj["spec"]["template"]["spec"]


def pod_labels(obj):
    return obj["spec"]["template"]["metadata"].get("labels", {})


def containers(obj):
    spec = pod_spec(obj)
    return spec.get("initContainers", []) + spec.get("containers", [])


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def quantity_seconds(value):
    try:
        return int(str(value))
    except ValueError:
        return None


def check(docs, require_app=False, require_datastores=False, external=(), require_tags=True):
    """`external`: names of Secrets or ConfigMaps that are created outside
    these manifests (references to them are not resolved). `require_tags`:
    every image must have a fixed tag or digest (an overlay's job)."""
    o = Objects(docs)
    problems = []

    def need(condition, message):
        if not condition:
            problems.append(message)
        return condition

    config = o.get("ConfigMap", "chat-config")
    gateway = o.get("Deployment", "gateway")
    persister = o.get("Deployment", "persister")
    migrate = o.get("Job", "chat-migrate")
    redis = o.get("StatefulSet", "redis")
    postgres = o.get("StatefulSet", "postgres")
    if require_app:
        for kind, name, obj in [
            ("ConfigMap", "chat-config", config),
            ("Deployment", "gateway", gateway),
            ("Deployment", "persister", persister),
            ("Job", "chat-migrate", migrate),
            ("HorizontalPodAutoscaler", "gateway", o.get("HorizontalPodAutoscaler", "gateway")),
            ("PodDisruptionBudget", "gateway", o.get("PodDisruptionBudget", "gateway")),
            ("PodDisruptionBudget", "persister", o.get("PodDisruptionBudget", "persister")),
            ("Service", "gateway", o.get("Service", "gateway")),
        ]:
            need(obj is not None, f"{kind}/{name} is missing")
        need(len(o.of("Ingress")) > 0, "no Ingress")
    if require_datastores:
        need(redis is not None, "StatefulSet/redis is missing")
        need(postgres is not None, "StatefulSet/postgres is missing")

    # --- every workload: resources, non-root, read-only, pinned images -----
    for obj in [d for d in docs if d["kind"] in WORKLOAD_KINDS]:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        spec = pod_spec(obj)
        need(spec.get("securityContext", {}).get("runAsNonRoot") is True, f"{where}: runAsNonRoot is not true")
        for c in containers(obj):
            cw = f"{where} container {c['name']}"
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    need(r in res.get(part, {}), f"{cw}: no {part}.{r}")
            sc = c.get("securityContext", {})
            need(sc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation is not false")
            need(sc.get("readOnlyRootFilesystem") is True, f"{cw}: readOnlyRootFilesystem is not true")
            need("ALL" in sc.get("capabilities", {}).get("drop", []), f"{cw}: capabilities are not all dropped")
            image = c.get("image", "")
            tagged = re.search(r":[^/:@]+$", image.split("@")[0]) or "@" in image
            if require_tags:
                need(tagged and not image.endswith(":latest"), f"{cw}: image {image!r} has no fixed tag")
        check_references(o, obj, where, external, need)

    for obj in [gateway, persister, migrate]:
        if obj is not None:
            uid = pod_spec(obj).get("securityContext", {}).get("runAsUser")
            need(uid == IMAGE_UID, f"{obj['kind']}/{obj['metadata']['name']}: runAsUser {uid}, the image's user is {IMAGE_UID}")

    if gateway is not None:
        check_gateway(o, gateway, config, need)
    if persister is not None:
        check_persister(o, persister, need)
    if migrate is not None:
        c = pod_spec(migrate)["containers"][0]
        need(c.get("args") == ["migrate"], f"Job/chat-migrate: args {c.get('args')}, want ['migrate']")
        if persister is not None:
            need(
                c.get("image") == pod_spec(persister)["containers"][0].get("image"),
                "Job/chat-migrate does not run the persister's image",
            )
        need(pod_spec(migrate).get("restartPolicy") in ("OnFailure", "Never"), "Job/chat-migrate: bad restartPolicy")
    if redis is not None:
        check_redis(redis, need)
    if postgres is not None:
        c = pod_spec(postgres)["containers"][0]
        need(c.get("image", "").startswith("postgres:15"), f"StatefulSet/postgres: image {c.get('image')}, want PostgreSQL 15")
        check_volume(postgres, "/var/lib/postgresql/data", need)

    check_services(o, need)
    check_ingresses(o, external, need)
    return problems


def check_gateway(o, gateway, config, need):
    spec = gateway["spec"]
    need("replicas" not in spec, "Deployment/gateway sets replicas; the HorizontalPodAutoscaler owns them")
    strategy = spec.get("strategy", {})
    rolling = strategy.get("rollingUpdate", {})
    need(strategy.get("type") == "RollingUpdate", "Deployment/gateway: strategy is not RollingUpdate")
    need(rolling.get("maxSurge") == 1, f"Deployment/gateway: maxSurge {rolling.get('maxSurge')!r}, want 1")
    need(rolling.get("maxUnavailable") == 0, f"Deployment/gateway: maxUnavailable {rolling.get('maxUnavailable')!r}, want 0")
    container = next((c for c in pod_spec(gateway)["containers"] if c["name"] == "gateway"), None)
    if not need(container is not None, "Deployment/gateway: no container `gateway`"):
        return
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        got = container.get(probe, {}).get("httpGet", {})
        need(got.get("path") == path, f"Deployment/gateway: {probe} is not GET {path}")
        need(port_exists(container, got.get("port")), f"Deployment/gateway: {probe} port {got.get('port')!r} is not a container port")
    node_id = env_of(container).get("GATEWAY_NODE_ID", {})
    need(
        node_id.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
        "Deployment/gateway: GATEWAY_NODE_ID is not the pod's name",
    )
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    sleep = quantity_seconds(command[1]) if len(command) == 2 and command[0] == "sleep" else None
    if not need(sleep is not None and sleep >= 5, f"Deployment/gateway: preStop is {command}, want ['sleep', N >= 5]"):
        return
    if not need(config is not None and "GATEWAY_DRAIN_SECS" in config.get("data", {}), "chat-config has no GATEWAY_DRAIN_SECS"):
        return
    drain = quantity_seconds(config["data"]["GATEWAY_DRAIN_SECS"])
    if not need(drain is not None and drain > 0, "GATEWAY_DRAIN_SECS is not a positive integer"):
        return
    needed = sleep + drain + DRAIN_MARGIN_SECS
    grace = pod_spec(gateway).get("terminationGracePeriodSeconds", 30)
    need(
        grace >= needed,
        f"Deployment/gateway: terminationGracePeriodSeconds {grace} < preStop {sleep} + "
        f"GATEWAY_DRAIN_SECS {drain} + {DRAIN_MARGIN_SECS}: SIGKILL would cut the drain",
    )
    ready = spec.get("minReadySeconds", 0)
    need(
        ready >= needed,
        f"Deployment/gateway: minReadySeconds {ready} < preStop {sleep} + GATEWAY_DRAIN_SECS {drain} + "
        f"{DRAIN_MARGIN_SECS}: two gateways would drain at once in a rolling update",
    )
    hpa = o.get("HorizontalPodAutoscaler", "gateway")
    if hpa is not None:
        need(hpa.get("apiVersion") == "autoscaling/v2", "HorizontalPodAutoscaler/gateway is not autoscaling/v2")
        ref = hpa["spec"].get("scaleTargetRef", {})
        need(ref.get("kind") == "Deployment" and ref.get("name") == "gateway", "HorizontalPodAutoscaler/gateway targets something else")
        need(
            any(m.get("type") == "Resource" and m.get("resource", {}).get("name") == "cpu" for m in hpa["spec"].get("metrics", [])),
            "HorizontalPodAutoscaler/gateway does not scale on CPU",
        )
        need(hpa["spec"].get("minReplicas", 1) >= 2, "HorizontalPodAutoscaler/gateway: minReplicas < 2 (a drain would leave no gateway)")
    check_pdb(o, "gateway", gateway, need)


def check_persister(o, persister, need):
    need(persister["spec"].get("replicas", 1) >= 2, "Deployment/persister: fewer than 2 replicas")
    container = pod_spec(persister)["containers"][0]
    consumer = env_of(container).get("PERSISTER_CONSUMER", {})
    need(
        consumer.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
        "Deployment/persister: PERSISTER_CONSUMER is not the pod's name (replicas must not share a consumer name)",
    )
    need(container.get("args", ["run"]) == ["run"], "Deployment/persister: args are not ['run']")
    probe = container.get("livenessProbe", {}).get("httpGet", {})
    need(probe.get("path") == "/healthz", "Deployment/persister: livenessProbe is not GET /healthz")
    need(port_exists(container, probe.get("port")), "Deployment/persister: livenessProbe port is not a container port")
    check_pdb(o, "persister", persister, need)


def check_pdb(o, name, workload, need):
    pdb = o.get("PodDisruptionBudget", name)
    if pdb is not None:
        selector = pdb["spec"].get("selector", {}).get("matchLabels", {})
        need(selects(selector, pod_labels(workload)), f"PodDisruptionBudget/{name} does not select the {name} pods")


def check_redis(redis, need):
    args = pod_spec(redis)["containers"][0].get("args", [])
    pairs = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    need(pairs.get("--appendonly") == "yes", "StatefulSet/redis: appendonly is not yes")
    need(pairs.get("--appendfsync") in ("everysec", "always"), "StatefulSet/redis: appendfsync is not everysec or always")
    need(pairs.get("--maxmemory-policy") == "noeviction", "StatefulSet/redis: maxmemory-policy is not noeviction")
    check_volume(redis, pairs.get("--dir", "/data"), need)


def check_volume(statefulset, path, need):
    name = statefulset["metadata"]["name"]
    claims = {c["metadata"]["name"] for c in statefulset["spec"].get("volumeClaimTemplates", [])}
    mounts = {m["mountPath"]: m["name"] for c in containers(statefulset) for m in c.get("volumeMounts", [])}
    need(mounts.get(path) in claims, f"StatefulSet/{name}: {path} is not on a persistent volume claim")


def port_exists(container, port):
    ports = container.get("ports", [])
    return any(port in (p.get("name"), p.get("containerPort")) for p in ports)


def check_references(o, obj, where, external, need):
    spec = pod_spec(obj)
    for c in containers(obj):
        for source in c.get("envFrom", []):
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key in source:
                    name = source[key]["name"]
                    need(name in external or o.get(kind, name) is not None, f"{where}: {kind}/{name} does not exist")
        for e in c.get("env", []):
            ref = e.get("valueFrom", {})
            for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                if key in ref:
                    name, item = ref[key]["name"], ref[key]["key"]
                    if name in external:
                        continue
                    target = o.get(kind, name)
                    if need(target is not None, f"{where}: {kind}/{name} does not exist"):
                        keys = set(target.get("data", {})) | set(target.get("stringData", {}))
                        need(item in keys, f"{where}: {kind}/{name} has no key {item}")
    for v in spec.get("volumes", []):
        for kind, key, field in (("ConfigMap", "configMap", "name"), ("Secret", "secret", "secretName")):
            if key in v:
                name = v[key][field]
                need(name in external or o.get(kind, name) is not None, f"{where}: volume {kind}/{name} does not exist")


def check_services(o, need):
    workloads = [d for d in o.docs if d["kind"] in WORKLOAD_KINDS - {"Job"}]
    for svc in o.of("Service"):
        name = svc["metadata"]["name"]
        selector = svc["spec"].get("selector", {})
        backends = [w for w in workloads if selects(selector, pod_labels(w))]
        if not need(backends, f"Service/{name} selects no pods"):
            continue
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort", port.get("port"))
            need(
                any(port_exists(c, target) for w in backends for c in containers(w)),
                f"Service/{name}: targetPort {target!r} is no port of its pods",
            )
    for sts in o.of("StatefulSet"):
        governing = sts["spec"].get("serviceName")
        svc = o.get("Service", governing)
        need(
            svc is not None and svc["spec"].get("clusterIP") == "None",
            f"StatefulSet/{sts['metadata']['name']}: serviceName {governing!r} is not a headless Service",
        )


def check_ingresses(o, external, need):
    websocket = False
    for ing in o.of("Ingress"):
        name = ing["metadata"]["name"]
        for tls in ing["spec"].get("tls", []):
            secret = tls.get("secretName")
            need(secret in external or o.get("Secret", secret) is not None, f"Ingress/{name}: TLS Secret/{secret} does not exist")
        for rule in ing["spec"].get("rules", []):
            for p in rule.get("http", {}).get("paths", []):
                backend = p["backend"]["service"]
                svc = o.get("Service", backend["name"])
                if not need(svc is not None, f"Ingress/{name}: Service/{backend['name']} does not exist"):
                    continue
                port = backend["port"].get("name", backend["port"].get("number"))
                need(
                    any(port in (sp.get("name"), sp.get("port")) for sp in svc["spec"]["ports"]),
                    f"Ingress/{name}: Service/{backend['name']} has no port {port!r}",
                )
                if p["path"] == "/v1/ws":
                    websocket = True
                    notes = ing["metadata"].get("annotations", {})
                    for a in ("proxy-read-timeout", "proxy-send-timeout"):
                        value = quantity_seconds(notes.get(f"nginx.ingress.kubernetes.io/{a}", "0"))
                        need(
                            value is not None and value >= WEBSOCKET_TIMEOUT_SECS,
                            f"Ingress/{name}: {a} below {WEBSOCKET_TIMEOUT_SECS} s on /v1/ws",
                        )
    if o.of("Ingress"):
        need(websocket, "no Ingress routes /v1/ws")
