"""infra/k8s against the Kubernetes OpenAPI schemas, and where each step's GPU request lands.

Schemas come from `kubernetes-validate` (JSON schemas generated from the
Kubernetes OpenAPI spec, shipped in the wheel), so no cluster is needed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prefect.utilities.templating import apply_values

from steps.core.jobs import (
    PLACEHOLDER,
    STEPS_FILE,
    TEMPLATE_FILE,
    job_variables,
    load_steps,
    load_template,
    render_job,
    substitute,
)

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
# A version current managed clusters run; the schemas are strict (no unknown fields).
K8S_VERSION = "1.33"
STEPS = sorted(load_steps()["steps"])
GPU_STEPS = [s for s in STEPS if load_steps()["steps"][s]["gpu"] > 0]
CPU_STEPS = [s for s in STEPS if load_steps()["steps"][s]["gpu"] == 0]
SECRET_WORDS = ("PASSWORD", "SECRET", "AUTH_STRING", "TOKEN")
# The Secrets each workload may read, and no other (a workload that can read another's
# credentials can act as it). "step-job" is the pool template every step Job comes from;
# the two charts are configured by the *-values.yaml files. A new workload must be listed.
OWN_SECRETS = {
    "StatefulSet/minio": {"minio-root"},
    "Job/minio-setup": {"minio-root", "tailwise-s3", "mlflow-s3"},
    "Deployment/mlflow": {"mlflow-db", "mlflow-s3", "mlflow-auth"},
    "Job/mlflow-setup": {"mlflow-auth", "tailwise-mlflow"},
    "step-job": {"tailwise-s3", "tailwise-mlflow", "prefect-auth"},
    "chart/prefect-worker": {"prefect-auth"},
    "chart/prefect-server": {"prefect-auth"},
}


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """The Kubernetes objects (helm values files are not objects)."""
    return [(f"{path.name}#{i}", doc)
            for path in sorted(K8S.glob("*.yaml")) if not path.name.endswith("-values.yaml")
            for i, doc in enumerate(yaml.safe_load_all(path.read_text()))]


def helm_values(chart: str) -> dict[str, Any]:
    return yaml.safe_load((K8S / f"{chart}-values.yaml").read_text())


def workload(kind: str, name: str) -> dict[str, Any]:
    return next(doc for _, doc in manifests()
                if doc["kind"] == kind and doc["metadata"]["name"] == name)


def secret_names(node: Any) -> set[str]:
    """The Secrets `node` reads: by secretKeyRef and by secretRef (envFrom)."""
    return {ref["name"] for ref in walk(node, "secretKeyRef") + walk(node, "secretRef")}


def template_secret_defaults() -> dict[str, str]:
    """The pool template's `*_secret` variables and the Secret each names by default."""
    return {key: prop["default"] for key, prop in load_template()["variables"]["properties"].items()
            if key.endswith("_secret")}


def is_secret(name: str) -> bool:
    return any(word in name.upper() for word in SECRET_WORDS)


def container(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]["containers"][0]


def walk(node: Any, key: str) -> list[Any]:
    """Every value stored under `key`, anywhere in `node`."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [
            found for v in node.values() for found in walk(v, key)]
    if isinstance(node, list):
        return [found for v in node for found in walk(v, key)]
    return []


def test_steps_file_and_template_are_the_ones_render_job_reads() -> None:
    assert STEPS_FILE == REPO / "containers" / "steps.yaml"
    assert TEMPLATE_FILE == K8S / "prefect-base-job-template.json"


@pytest.mark.parametrize("name", [name for name, _ in manifests()])
def test_manifest_is_valid_kubernetes(name: str) -> None:
    doc = dict(manifests())[name]
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validator_is_live() -> None:
    """A misspelt field fails strict validation, so the passes above mean something."""
    doc = copy.deepcopy(workload("Deployment", "mlflow"))
    doc["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_expected_objects_exist() -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in manifests()}
    assert {("Deployment", "mlflow"), ("Service", "mlflow"), ("StatefulSet", "minio"),
            ("Service", "minio"), ("ConfigMap", "tailwise-config"),
            ("ServiceAccount", "tailwise-steps"), ("Job", "mlflow-setup"),
            ("ConfigMap", "mlflow-auth-config"), ("PersistentVolumeClaim", "mlflow-auth")} <= kinds


def test_secrets_are_referenced_by_name_and_documented() -> None:
    docs = [doc for _, doc in manifests()]
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are created, not committed"
    names = {name for d in docs for name in secret_names(d)}
    names |= set(template_secret_defaults().values())
    for chart in ("prefect-worker", "prefect-server"):
        names |= secret_names(helm_values(chart))
    assert names == {"minio-root", "tailwise-s3", "mlflow-s3", "mlflow-db", "mlflow-auth",
                     "tailwise-mlflow", "prefect-auth"}
    readme = (REPO / "infra" / "README.md").read_text()
    for name in names:
        assert f"secret generic {name}" in readme, f"infra/README.md does not create {name}"


@pytest.mark.parametrize("step", STEPS)
def test_rendered_job_is_valid_kubernetes(step: str) -> None:
    job = render_job(step)
    kubernetes_validate.validate(job, K8S_VERSION)
    # Strictly valid too, except for two fields Prefect's worker insists on finding in
    # the pod spec (its default template puts them there; the API server drops them).
    pod = job["spec"]["template"]["spec"]
    assert pod.pop("completions") == 1 and pod.pop("parallelism") == 1
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)


@pytest.mark.parametrize("step", GPU_STEPS)
def test_gpu_step_requests_its_gpu_where_kubernetes_reads_it(step: str) -> None:
    job = render_job(step)
    resources = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    assert container(job)["image"] == load_steps()["images"]["cuda"]


@pytest.mark.parametrize("step", CPU_STEPS)
def test_cpu_step_requests_no_gpu(step: str) -> None:
    job = render_job(step)
    assert "nvidia.com/gpu" not in json.dumps(job)
    assert container(job)["image"] == load_steps()["images"]["cpu"]
    assert container(job)["resources"]["requests"]["cpu"] == str(load_steps()["steps"][step]["cpu"])


def test_finetune_job_in_full() -> None:
    job = render_job("finetune")
    spec = load_steps()["steps"]["finetune"]
    assert job["kind"] == "Job" and job["metadata"]["namespace"] == "tailwise"
    assert job["metadata"]["generateName"] == "tailwise-finetune-"
    assert container(job)["resources"] == {
        "requests": {"cpu": spec["cpu"], "memory": spec["memory"]},
        "limits": {"memory": spec["memory"], "nvidia.com/gpu": "1"}}
    # The image's ENTRYPOINT is `python -m`: this runs `python -m prefect flow-run execute`.
    assert container(job)["args"] == ["prefect", "flow-run", "execute"]
    assert {"name": "TAILWISE_CONTAINER_IMAGE", "value": load_steps()["images"]["cuda"]} in \
        container(job)["env"]
    assert {e["configMapRef"]["name"] for e in container(job)["envFrom"] if "configMapRef" in e} \
        == {"tailwise-config"}


def test_overrides_win_and_deployment_env_is_listed() -> None:
    job = render_job("spectral", {"gpu": "2", "image": "registry.example/tailwise-cuda:1",
                                  "env": {"HF_HUB_OFFLINE": "1"}})
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container(job)["image"] == "registry.example/tailwise-cuda:1"
    assert container(job)["env"][0] == {"name": "HF_HUB_OFFLINE", "value": "1"}


def test_unknown_step_is_an_error() -> None:
    with pytest.raises(KeyError, match="not in containers/steps.yaml"):
        render_job("no_such_step")


@pytest.mark.parametrize("step", STEPS)
def test_substitution_matches_prefects(step: str) -> None:
    template = load_template()
    values = {name: prop["default"] for name, prop in template["variables"]["properties"].items()
              if prop.get("default") is not None} | job_variables(step)
    assert substitute(template["job_configuration"], values) == \
        apply_values(template["job_configuration"], values)


def test_every_placeholder_is_a_declared_variable() -> None:
    template = load_template()
    text = json.dumps(template["job_configuration"])
    used = {match.group(1) for match in PLACEHOLDER.finditer(text)}
    declared = set(template["variables"]["properties"])
    assert used <= declared, f"placeholders without a variable: {sorted(used - declared)}"
    assert {"cpu", "memory", "gpu", "image"} <= used


@pytest.mark.parametrize("step", STEPS)
def test_step_job_variables_pass_the_pool_schema(step: str) -> None:
    """What Prefect checks when a deployment sets job_variables for the pool."""
    schema = load_template()["variables"]
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(job_variables(step), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"gpu": "one"}, schema)


def test_worker_values_point_at_the_pool_and_template() -> None:
    values = yaml.safe_load((K8S / "prefect-worker-values.yaml").read_text())
    worker = values["worker"]
    assert worker["config"]["type"] == "kubernetes"
    assert worker["apiConfig"] == "server"
    assert worker["serverApiConfig"]["apiUrl"].endswith("/api")
    config_map = worker["config"]["baseJobTemplate"]["existingConfigMapName"]
    # The chart reads the key baseJobTemplate.json from that ConfigMap.
    readme = (REPO / "infra" / "README.md").read_text()
    assert (f"create configmap {config_map} --from-file=baseJobTemplate.json="
            "infra/k8s/prefect-base-job-template.json") in readme
    assert f"--pool {worker['config']['workPool']}" in readme or \
        f"work-pool create {worker['config']['workPool']}" in readme


def workload_secrets() -> dict[str, set[str]]:
    found = {f"{doc['kind']}/{doc['metadata']['name']}": secret_names(doc)
             for _, doc in manifests() if doc["kind"] in ("Deployment", "StatefulSet", "Job")}
    job = render_job("spectral")  # every step's Job: only the image and resources differ
    found["step-job"] = secret_names(job) | secret_names(load_template()["job_configuration"])
    found["step-job"] = {template_secret_defaults().get(n.strip("{} "), n)
                         for n in found["step-job"]}
    for chart in ("prefect-worker", "prefect-server"):
        found[f"chart/{chart}"] = secret_names(helm_values(chart))
    return found


def test_every_workload_gets_only_its_own_secrets() -> None:
    found = workload_secrets()
    assert set(found) == set(OWN_SECRETS), "list each workload's Secrets in OWN_SECRETS"
    for name, secrets in found.items():
        assert secrets == OWN_SECRETS[name], name
    # The setup Job needs the admin's login, not the key that signs MLflow's UI sessions.
    setup = workload("Job", "mlflow-setup")
    keys = {ref["key"] for ref in walk(setup, "secretKeyRef") if ref["name"] == "mlflow-auth"}
    assert keys == {"MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"}
    assert not walk(setup, "secretRef"), "envFrom would hand it the whole mlflow-auth Secret"


def test_no_secret_is_written_as_a_literal() -> None:
    """A secret-named env var always comes from a Secret (valueFrom), never `value:`."""
    documents = [doc for _, doc in manifests()] + [
        load_template()["job_configuration"], helm_values("prefect-worker"),
        helm_values("prefect-server")]
    for doc in documents:
        for env in walk(doc, "env") + walk(doc, "extraEnvVars"):
            for var in env if isinstance(env, list) else []:
                if is_secret(var["name"]):
                    assert "valueFrom" in var and "value" not in var, var
    # The pool template's env default may only blank secrets out (see the next test).
    default_env = load_template()["variables"]["properties"]["env"]["default"]
    assert all(value is None for key, value in default_env.items() if is_secret(key))
    # The charts' literal auth strings are never used.
    assert not walk([helm_values("prefect-worker"), helm_values("prefect-server")], "authString")


def test_mlflow_runs_basic_auth_from_its_secret() -> None:
    mlflow = workload("Deployment", "mlflow")
    box = container(mlflow)
    assert "--app-name=basic-auth" in box["args"]
    config_path = next(e["value"] for e in box["env"] if e["name"] == "MLFLOW_AUTH_CONFIG_PATH")
    mounts = {m["name"]: m["mountPath"] for m in box["volumeMounts"]}
    assert config_path.startswith(mounts["auth-config"] + "/")
    ini = workload("ConfigMap", "mlflow-auth-config")["data"][Path(config_path).name]
    assert f"sqlite:///{mounts['auth-db']}/" in ini
    assert not any(is_secret(line.split("=")[0]) for line in ini.splitlines())
    assert mlflow["spec"]["replicas"] == 1 and mlflow["spec"]["strategy"]["type"] == "Recreate"
    setup = container(workload("Job", "mlflow-setup"))
    assert setup["command"] == ["python", "/opt/tailwise/mlflow_setup.py"]
    assert setup["image"] == box["image"]


def test_step_jobs_read_their_credentials_from_secrets() -> None:
    job = render_job("spectral")
    refs = {e["secretRef"]["name"] for e in container(job)["envFrom"] if "secretRef" in e}
    assert refs == {"tailwise-s3", "tailwise-mlflow"}
    template_env = load_template()["job_configuration"]["job_manifest"]["spec"]["template"][
        "spec"]["containers"][0]["env"]
    auth = next(e for e in template_env if e["name"] == "PREFECT_API_AUTH_STRING")
    assert auth["valueFrom"]["secretKeyRef"] == {"name": "{{ prefect_auth_secret }}",
                                                 "key": "auth-string"}
    # The pool's null default keeps the worker's own string out; the Secret reference stays.
    rendered = [e for e in container(job)["env"] if e["name"] == "PREFECT_API_AUTH_STRING"]
    assert rendered == [{"name": "PREFECT_API_AUTH_STRING", "valueFrom": {"secretKeyRef": {
        "name": "prefect-auth", "key": "auth-string"}}}]
