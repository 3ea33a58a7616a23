"""Create or update the MLflow user the tailwise steps log as. One-shot, safe to rerun.

Runs as the MLflow admin against a server started with `--app-name basic-auth`:

    MLFLOW_TRACKING_URI=http://mlflow:5000 \\
    MLFLOW_TRACKING_USERNAME=<admin> MLFLOW_TRACKING_PASSWORD=<admin password> \\
    TAILWISE_MLFLOW_USERNAME=tailwise TAILWISE_MLFLOW_PASSWORD=<the steps' password> \\
    python mlflow_setup.py

It creates the steps' user, or sets its password when the user exists (that is how
the steps' password is rotated: change the secret, run this again); creates the
experiment `tailwise` when missing (TAILWISE_MLFLOW_EXPERIMENT names another); and
grants the user EDIT on it, so the steps may create runs there and, elsewhere, only
what the server's default permission allows. It prints what it did and never a
password; a failure is one line on stderr and exit status 1.

Baked into the tailwise-mlflow image (infra/compose/docker-compose.yaml) as
/opt/tailwise/mlflow_setup.py; run by the compose service and the Kubernetes Job
`mlflow-setup`, and by tests/hardening/test_auth.py against a real server.
"""

from __future__ import annotations

import os
import sys

from mlflow.exceptions import MlflowException, RestException
from mlflow.server.auth.client import AuthServiceClient
from mlflow.tracking import MlflowClient

PERMISSION = "EDIT"


class SetupError(Exception):
    """A setting is missing or wrong; the message names it."""


def required(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise SetupError(f"{name} is not set")
    return value


def ensure_user(auth: AuthServiceClient, username: str, password: str) -> str:
    """Create `username` with `password`, or set that password when the user exists."""
    try:
        auth.get_user(username)
    except RestException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        auth.create_user(username, password)
        return "created"
    auth.update_user_password(username, password)
    return "exists, password set"


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created (with the server's artifact root) when missing."""
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else client.create_experiment(name)


def ensure_permission(auth: AuthServiceClient, username: str, experiment_id: str) -> str:
    """Give `username` exactly PERMISSION on the experiment (replacing another grant)."""
    current = auth.get_user_permission(username, "experiment", experiment_id).permission
    if current == PERMISSION:
        return "kept"
    try:
        auth.grant_user_permission(username, "experiment", experiment_id, PERMISSION)
    except RestException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        # MLflow's grant does not overwrite: an explicit other permission must go first.
        auth.revoke_user_permission(username, "experiment", experiment_id)
        auth.grant_user_permission(username, "experiment", experiment_id, PERMISSION)
    return "granted"


def setup() -> str:
    """Do the work; return the line that says what was done."""
    uri = required("MLFLOW_TRACKING_URI")
    admin = required("MLFLOW_TRACKING_USERNAME")
    required("MLFLOW_TRACKING_PASSWORD")  # read by the MLflow clients themselves
    username = required("TAILWISE_MLFLOW_USERNAME")
    password = required("TAILWISE_MLFLOW_PASSWORD")
    experiment = os.environ.get("TAILWISE_MLFLOW_EXPERIMENT") or "tailwise"
    if username == admin:
        raise SetupError("TAILWISE_MLFLOW_USERNAME must not be the admin user: the steps "
                         "get a user of their own")
    auth = AuthServiceClient(uri)
    state = ensure_user(auth, username, password)
    experiment_id = ensure_experiment(MlflowClient(uri), experiment)
    granted = ensure_permission(auth, username, experiment_id)
    return (f"mlflow-setup: user {username!r} {state}; {PERMISSION} on experiment "
            f"{experiment!r} (id {experiment_id}) {granted}")


def main() -> int:
    try:
        print(setup(), flush=True)
    except (SetupError, MlflowException) as exc:
        # The first line only: MLflow's messages name the endpoint and status, not the body sent.
        print(f"mlflow-setup: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
