"""infra/compose/docker-compose.yaml against the official Compose Specification schema.

The schema is the one check-jsonschema vendors (compose-spec.json, from
github.com/compose-spec/compose-spec), so no network and no Docker are needed.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "infra" / "compose"
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR; $$ is a literal $.
VARIABLE = re.compile(r"\$(?:\{(\w+)(?:(:?[-?+])([^}]*))?\}|(\w+))")
SECRET_WORDS = ("PASSWORD", "SECRET", "AUTH_STRING")
# The secrets of .env each service may see, and no other: a service that gets another's
# credentials could act as it. A new service must be listed here.
OWN_SECRETS = {
    "postgres": {"POSTGRES_PASSWORD", "PREFECT_DB_PASSWORD", "MLFLOW_DB_PASSWORD"},
    "minio": {"MINIO_ROOT_PASSWORD"},
    "minio-setup": {"MINIO_ROOT_PASSWORD", "MLFLOW_S3_SECRET_KEY", "TAILWISE_S3_SECRET_KEY"},
    "mlflow": {"MLFLOW_DB_PASSWORD", "MLFLOW_S3_SECRET_KEY", "MLFLOW_ADMIN_PASSWORD",
               "MLFLOW_FLASK_SECRET_KEY"},
    "mlflow-setup": {"MLFLOW_ADMIN_PASSWORD", "TAILWISE_MLFLOW_PASSWORD"},
    "prefect-server": {"PREFECT_DB_PASSWORD", "PREFECT_AUTH_STRING"},
    "prefect-worker": {"TAILWISE_S3_SECRET_KEY", "TAILWISE_MLFLOW_PASSWORD", "PREFECT_AUTH_STRING"},
}


def compose_schema() -> dict[str, Any]:
    files = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((files / "compose-spec.json").read_text())


def raw_compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE_DIR / "docker-compose.yaml").read_text())


def env_example() -> dict[str, str]:
    values = {}
    for line in (COMPOSE_DIR / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution, enough for this file."""
    if isinstance(node, dict):
        return {interpolate(k, env): interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def one(match: re.Match) -> str:
        name = match.group(1) or match.group(4)
        operator, argument = match.group(2), match.group(3)
        value = env.get(name)
        if operator == ":-":
            return value or argument
        if operator == "-":
            return argument if value is None else value
        if operator in (":?", "?") and not value:
            raise KeyError(f"${{{name}}} is required: {argument}")
        return value or ""

    parts = node.split("$$")  # $$ escapes a dollar; keep it out of the substitution
    return "$".join(VARIABLE.sub(one, part) for part in parts)


def strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(k) + strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def validate(document: dict[str, Any]) -> None:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_compose_file_matches_the_compose_spec() -> None:
    validate(raw_compose())


def test_compose_file_matches_the_spec_once_interpolated_from_the_example_env() -> None:
    validate(interpolate(raw_compose(), env_example()))


def test_schema_rejects_what_compose_rejects() -> None:
    """The validator is live: a misspelt key and a wrong depends_on condition fail."""
    broken = raw_compose()
    broken["services"]["mlflow"]["depends_on"]["postgres"]["condition"] = "service_ready"
    with pytest.raises(AssertionError, match="condition"):
        validate(broken)
    broken = raw_compose()
    broken["services"]["minio"]["helthcheck"] = broken["services"]["minio"].pop("healthcheck")
    with pytest.raises(AssertionError, match="helthcheck"):
        validate(broken)


def test_every_variable_is_in_the_env_template_and_vice_versa() -> None:
    text = "\n".join(strings(raw_compose())).replace("$$", "")  # values only, not comments
    used = {m.group(1) or m.group(4) for m in VARIABLE.finditer(text)}
    required = {m.group(1) for m in VARIABLE.finditer(text) if m.group(2) in (":?", "?")}
    documented = set(env_example())
    assert required <= documented, f"not in .env.example: {sorted(required - documented)}"
    assert documented <= used, f"unused in .env.example: {sorted(documented - used)}"


def test_services_are_all_there_and_start_in_order() -> None:
    services = raw_compose()["services"]
    assert {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker"} <= set(services)
    for name, service in services.items():
        for target, rule in service.get("depends_on", {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck"
            if rule["condition"] == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} is not one-shot"
    for name in ("postgres", "minio", "mlflow", "prefect-server"):
        assert "healthcheck" in services[name], name


def test_mlflow_and_prefect_use_postgres_and_minio() -> None:
    services = raw_compose()["services"]
    mlflow = services["mlflow"]
    assert "--serve-artifacts" in mlflow["command"]
    assert any(arg.startswith("--artifacts-destination=s3://") for arg in mlflow["command"])
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    prefect = services["prefect-server"]["environment"]
    assert prefect["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    worker = services["prefect-worker"]
    assert worker["build"]["dockerfile"] == "containers/Dockerfile.cpu"
    assert (COMPOSE_DIR / worker["build"]["context"] / "containers/Dockerfile.cpu").is_file()
    for key in ("TAILWISE_STORE", "AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        assert key in worker["environment"], key


def test_no_credentials_are_written_in_the_compose_file() -> None:
    for name, service in raw_compose()["services"].items():
        for key, value in service.get("environment", {}).items():
            if any(word in key for word in SECRET_WORDS) or key == "AWS_ACCESS_KEY_ID":
                assert str(value).startswith("${"), f"{name}.{key} is written in the file"
            if "://" in str(value) and "@" in str(value):  # user:password@host
                assert "${" in str(value).split("@")[0], f"{name}.{key} embeds a password"


def is_secret(name: str) -> bool:
    return any(word in name for word in SECRET_WORDS)


def references(node: Any) -> list[re.Match]:
    """Every compose variable reference in `node`'s values ($$ is the container's, skipped)."""
    return [match for text in strings(node) for part in text.split("$$")
            for match in VARIABLE.finditer(part)]


def secrets_of(service: dict[str, Any]) -> set[str]:
    return {name for m in references(service) if is_secret(name := m.group(1) or m.group(4))}


def test_every_service_gets_only_its_own_credentials() -> None:
    services = raw_compose()["services"]
    assert set(services) == set(OWN_SECRETS), "list each service's secrets in OWN_SECRETS"
    for name, service in services.items():
        assert secrets_of(service) == OWN_SECRETS[name], name
    # The ones that matter most, spelt out.
    worker, mlflow = secrets_of(services["prefect-worker"]), secrets_of(services["mlflow"])
    assert "MINIO_ROOT_PASSWORD" not in worker and "MLFLOW_ADMIN_PASSWORD" not in worker
    assert "TAILWISE_S3_SECRET_KEY" not in mlflow and "TAILWISE_MLFLOW_PASSWORD" not in mlflow
    assert "MLFLOW_FLASK_SECRET_KEY" not in secrets_of(services["mlflow-setup"])


def test_services_authenticate_to_each_other() -> None:
    services = raw_compose()["services"]
    mlflow = services["mlflow"]
    assert "--app-name=basic-auth" in mlflow["command"]
    assert mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"] in {
        c["target"] for c in mlflow["configs"]}
    ini = raw_compose()["configs"]["mlflow-auth-ini"]["content"]
    assert "database_uri = sqlite:////var/lib/mlflow-auth/" in ini
    assert not any(is_secret(line.split("=")[0].upper()) for line in ini.splitlines())
    assert any(v.endswith(":/var/lib/mlflow-auth") for v in mlflow["volumes"])
    prefect = services["prefect-server"]["environment"]
    worker = services["prefect-worker"]["environment"]
    assert prefect["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_AUTH_STRING:?")
    assert worker["PREFECT_API_AUTH_STRING"].startswith("${PREFECT_AUTH_STRING:?")
    assert worker["MLFLOW_TRACKING_USERNAME"].startswith("${TAILWISE_MLFLOW_USERNAME:?")
    setup = services["mlflow-setup"]
    assert setup["environment"]["MLFLOW_TRACKING_USERNAME"].startswith("${MLFLOW_ADMIN_USERNAME:?")
    assert setup["command"] == ["python", "/opt/tailwise/mlflow_setup.py"]
    assert "COPY mlflow_setup.py /opt/tailwise/mlflow_setup.py" in \
        mlflow["build"]["dockerfile_inline"]
    assert (COMPOSE_DIR / mlflow["build"]["context"] / "mlflow_setup.py").is_file()
    assert "mlflow[auth]==" in mlflow["build"]["dockerfile_inline"]
    # The steps wait until their MLflow user exists.
    assert services["prefect-worker"]["depends_on"]["mlflow-setup"]["condition"] == \
        "service_completed_successfully"


def test_no_secret_has_a_default_value() -> None:
    """Secrets come from .env or compose stops: never `${VAR:-default}`, never a bare `$VAR`."""
    for match in references(raw_compose()):
        name = match.group(1) or match.group(4)
        if is_secret(name):
            assert match.group(2) == ":?", f"{match.group(0)}: use ${{{name}:?...}}"
    for key, value in env_example().items():
        if is_secret(key):
            assert "change-me" in value, f".env.example {key} is not a placeholder"


def test_a_missing_secret_stops_compose() -> None:
    env = env_example()
    del env["TAILWISE_MLFLOW_PASSWORD"]
    with pytest.raises(KeyError, match="TAILWISE_MLFLOW_PASSWORD"):
        interpolate(raw_compose(), env)
