"""The environment that keeps tailwise, its services and their clients off the internet."""

from __future__ import annotations

OFFLINE_ENV: dict[str, str] = {
    "DO_NOT_TRACK": "true",  # Prefect accepts 1/true/yes, MLflow only "true"
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # boto3 must never fall back to the EC2 metadata service (169.254.169.254).
    "AWS_EC2_METADATA_DISABLED": "true",
}
