"""The Dockerfiles and containers/steps.yaml, checked without a Docker engine.

The Dockerfiles are parsed with `dockerfile` (BuildKit's own parser), so a
syntax error fails here as it would in `docker build`.
"""

from __future__ import annotations

import re
from pathlib import Path

import dockerfile
import pytest
import yaml

from steps.core.registry import STEP_NAMES

REPO = Path(__file__).resolve().parents[2]
CONTAINERS = REPO / "containers"
# Which torch build each image must pin: the CPU index, or a CUDA 12.x one.
TORCH_INDEX = {
    "cpu": re.compile(r"--index-url[ =]https://download\.pytorch\.org/whl/cpu(\s|$)"),
    "cuda": re.compile(r"--index-url[ =]https://download\.pytorch\.org/whl/cu12\d(\s|$)"),
}
PLANNED_STEPS = {"build_model", "spectral", "allocate", "prune", "evaluate", "finetune",
                 "diagnose"}
# Kubernetes quantities as containers/steps.yaml writes them.
CPU_QUANTITY = re.compile(r"^([0-9]+m|[0-9]+(\.[0-9]+)?)$")
MEMORY_QUANTITY = re.compile(r"^[0-9]+(Ki|Mi|Gi|Ti)$")


def stages(path: Path) -> list[list[dockerfile.Command]]:
    """The Dockerfile's instructions, split into build stages (ARGs before FROM dropped)."""
    result: list[list[dockerfile.Command]] = []
    for command in dockerfile.parse_file(str(path)):
        if command.cmd == "FROM":
            result.append([])
        if result:
            result[-1].append(command)
    return result


def steps_config() -> dict:
    return yaml.safe_load((CONTAINERS / "steps.yaml").read_text())


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_dockerfile_is_multi_stage_with_a_slim_runtime(flavour: str) -> None:
    parsed = stages(CONTAINERS / f"Dockerfile.{flavour}")
    assert len(parsed) >= 2, "a builder stage and a runtime stage"
    runtime = parsed[-1]
    copies = [c for c in runtime if c.cmd == "COPY"]
    assert any("--from=builder" in c.flags for c in copies), "runtime copies the builder's venv"
    # The runtime gets no compilers: whatever is built happens in the builder.
    runtime_runs = " ".join(" ".join(c.value) for c in runtime if c.cmd == "RUN")
    assert "build-essential" not in runtime_runs and "pip install" not in runtime_runs


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_dockerfile_pins_its_torch_build(flavour: str) -> None:
    runs = [" ".join(c.value) for stage in stages(CONTAINERS / f"Dockerfile.{flavour}")
            for c in stage if c.cmd == "RUN"]
    torch_installs = [r for r in runs if re.search(r"pip install [^&|]*\btorch==", r)]
    assert len(torch_installs) == 1, torch_installs
    assert re.search(r"\btorch==2\.13\.0(\s|$)", torch_installs[0])
    assert TORCH_INDEX[flavour].search(torch_installs[0]), torch_installs[0]
    # The project install must not be free to swap the torch build for PyPI's.
    project = [r for r in runs if re.search(r"pip install .*'\.\[", r)]
    assert project and all("-c " in r for r in project), project


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_runtime_runs_steps_as_non_root(flavour: str) -> None:
    runtime = stages(CONTAINERS / f"Dockerfile.{flavour}")[-1]
    users = [c.value[0] for c in runtime if c.cmd == "USER"]
    assert users, "the runtime stage sets USER"
    assert users[-1].split(":")[0] not in {"0", "root"}
    entrypoint = [c for c in runtime if c.cmd == "ENTRYPOINT"]
    cmd = [c for c in runtime if c.cmd == "CMD"]
    assert entrypoint and entrypoint[-1].json, "exec-form ENTRYPOINT"
    assert list(entrypoint[-1].value) == ["python", "-m"]
    assert cmd and cmd[-1].json
    default = REPO / cmd[-1].value[0].replace(".", "/") / "__main__.py"  # `python -m` of it
    assert default.is_file(), f"CMD {cmd[-1].value[0]} is not a runnable package of the repo"


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_runtime_records_revision_and_image(flavour: str) -> None:
    runtime = stages(CONTAINERS / f"Dockerfile.{flavour}")[-1]
    args = {c.value[0].split("=")[0] for c in runtime if c.cmd == "ARG"}
    env = dict(zip(*[iter(v for c in runtime if c.cmd == "ENV" for v in c.value)] * 2,
                   strict=True))
    assert "GIT_REVISION" in args
    assert env["TAILWISE_GIT_REVISION"] == "${GIT_REVISION}"
    assert env["TAILWISE_CONTAINER_IMAGE"].startswith("${")
    assert "/opt/venv/bin" in env["PATH"]


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_dockerfile_copies_paths_that_exist(flavour: str) -> None:
    for stage in stages(CONTAINERS / f"Dockerfile.{flavour}"):
        for command in stage:
            if command.cmd == "COPY" and not any(f.startswith("--from") for f in command.flags):
                for source in command.value[:-1]:
                    assert (REPO / source).exists(), f"COPY {source}: not in the repository"


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_base_images_are_pinned(flavour: str) -> None:
    parsed = dockerfile.parse_file(str(CONTAINERS / f"Dockerfile.{flavour}"))
    defaults = dict(c.value[0].split("=", 1) for c in parsed
                    if c.cmd == "ARG" and "=" in c.value[0])
    for command in parsed:
        if command.cmd == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), ""),
                           command.value[0])
            if image == "builder":
                continue
            assert ":" in image and not image.endswith(":latest"), image


def test_every_step_has_an_image_and_resources() -> None:
    config = steps_config()
    assert set(config["images"]) == {"cpu", "cuda"}
    assert PLANNED_STEPS <= set(config["steps"])
    for name, spec in config["steps"].items():
        assert spec["image"] in config["images"], name
        assert CPU_QUANTITY.match(str(spec["cpu"])), (name, spec["cpu"])
        assert MEMORY_QUANTITY.match(str(spec["memory"])), (name, spec["memory"])
        assert isinstance(spec["gpu"], int) and spec["gpu"] >= 0, name
        if spec["gpu"] > 0:
            assert spec["image"] == "cuda", f"{name} asks for a GPU on the CPU image"


def test_registered_steps_are_mapped_and_runnable_in_a_container() -> None:
    config = steps_config()
    for name in STEP_NAMES:
        assert name in config["steps"], f"step {name} has no image in containers/steps.yaml"
        # The container command is `python -m steps.<name>`.
        assert (REPO / "steps" / name / "__main__.py").is_file(), f"steps/{name}: no __main__.py"


def test_retry_policy_has_defaults_and_per_step_overrides() -> None:
    from steps.core.jobs import retry_policy

    config = steps_config()
    assert retry_policy("spectral", config) == (2, [2.0, 10.0])
    assert retry_policy("build_text", config) == (1, [2.0, 10.0])
    assert retry_policy("prune", config) == (2, [10.0, 60.0])
    assert retry_policy("spectral", {"steps": {}}) == (2, [2.0, 10.0])
    with pytest.raises(ValueError, match="bad retry policy for 'spectral'"):
        retry_policy("spectral", {"retries": {"retries": -1}, "steps": {}})
