"""Step folders meet only through artifacts and steps/core: no step imports another step.

Every .py file under steps/<a>/ (a step folder: any but core) is parsed, and each
``import steps.<b>...`` / ``from steps.<b>... import`` / ``from steps import <b>`` naming
another step folder b is a finding. The command layers that compose steps (flows/ and the
`tailwise` command line, tailwise_cli/) live outside steps/, and no step code imports them
or the local services (tailwise_dev/).
"""

from __future__ import annotations

import ast
from pathlib import Path

STEPS = Path(__file__).resolve().parents[1] / "steps"
NOT_STEPS = {"core"}


def step_folders() -> list[str]:
    return sorted(p.name for p in STEPS.iterdir()
                  if p.is_dir() and (p / "__init__.py").is_file() and p.name not in NOT_STEPS)


def imported_steps(tree: ast.AST) -> list[tuple[int, str, str]]:
    """(line, module as written, step folder) of every import of a steps.<folder>."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [(alias.name, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "steps":  # from steps import finetune
                modules = [(f"steps.{a.name}", f"from steps import {a.name}") for a in node.names]
            else:
                modules = [(node.module, node.module)]
        else:
            continue
        for module, written in modules:
            parts = module.split(".")
            if parts[0] == "steps" and len(parts) > 1:
                found.append((node.lineno, written, parts[1]))
    return found


def test_step_folders_are_found():
    assert {"finetune", "diagnose", "evaluate", "spectral"} <= set(step_folders())


def test_no_step_folder_imports_another():
    findings = []
    for folder in step_folders():
        for path in sorted((STEPS / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for line, module, target in imported_steps(tree):
                if target not in (folder, "core"):
                    findings.append(f"{path.relative_to(STEPS.parent)}:{line} imports {module}")
    assert not findings, ("a step folder imports another step folder (move the shared code "
                          "to steps/core):\n" + "\n".join(findings))


def test_no_step_code_imports_the_command_layers_or_the_local_services():
    """tailwise_dev (S3 / MLflow / Prefect processes for tests and `make up`), the CLI and the
    flows are not step code: they use steps, never the other way round."""
    users = []
    for path in sorted(STEPS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            used = [n for n in names if n.split(".")[0] in ("tailwise_dev", "tailwise_cli",
                                                            "flows")]
            users += [f"{path.relative_to(STEPS.parent)}:{node.lineno} {n}" for n in used]
    assert not users, f"step code imports a command layer: {', '.join(users)}"


def test_the_check_sees_a_cross_import():
    tree = ast.parse("import steps.spectral.esd\nfrom steps.finetune.hf import x\n"
                     "from steps import allocate\nfrom steps.core.naming import block_of\n"
                     "from . import sibling\n")
    assert [(t, m) for _, m, t in imported_steps(tree)] == [
        ("spectral", "steps.spectral.esd"), ("finetune", "steps.finetune.hf"),
        ("allocate", "from steps import allocate"), ("core", "steps.core.naming")]
