"""What a bench's numbers depend on, printed beside them.

    from bench.common import print_provenance
    print_provenance(model=model_dir, texts={"calibration": path}, settings={"nsamples": 8})

prints the package versions, torch's thread counts and BLAS, the device, and sha256 digests
(12 characters) of the model's weight files and of every text, so two tables can be compared:
equal inputs give an equal table; when a cell moves, these lines say which input moved.
"""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "scipy", "gguf",
            "scikit-learn")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_CHUNK = 1 << 20


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, 12 hex characters."""
    sha = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()[:12]


def weights_digest(model: str | Path) -> str:
    """sha256 over a model's weight files (name and content, in name order), 12 hex
    characters; a single file is digested as it is."""
    path = Path(model)
    if path.is_file():
        return file_digest(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{path}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    sha = hashlib.sha256()
    for file in files:
        sha.update(str(file.relative_to(path)).encode())
        sha.update(file_digest(file).encode())
    return sha.hexdigest()[:12]


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed versions of the packages the numbers depend on (absent ones left out)."""
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def runtime() -> dict[str, Any]:
    """Python, torch's intra-/inter-op threads, its BLAS and CPU capability."""
    import torch

    config = torch.__config__.show()
    blas = next((part.split("=", 1)[1] for line in config.splitlines()
                 for part in line.replace(",", " ").split() if part.startswith("BLAS_INFO=")),
                "unknown")
    return {"python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "blas": blas,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda": torch.version.cuda if torch.cuda.is_available() else None}


def provenance(*, model: str | Path | None = None,
               texts: Mapping[str, str | Path] | None = None,
               settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything a bench's table is a function of, as one dict."""
    return {"packages": package_versions(), "runtime": runtime(),
            "model": None if model is None else weights_digest(model),
            "texts": {name: file_digest(path) for name, path in (texts or {}).items()},
            "settings": dict(settings or {})}


def print_provenance(**kwargs: Any) -> dict[str, Any]:
    """Print ``provenance(**kwargs)`` as a few ``depends on`` lines; return it."""
    facts = provenance(**kwargs)
    print("numbers depend on:")
    print("  packages: " + ", ".join(f"{k} {v}" for k, v in facts["packages"].items()))
    print("  runtime: " + ", ".join(f"{k} {v}" for k, v in facts["runtime"].items()))
    if facts["model"] is not None:
        print(f"  model weights sha256 {facts['model']}")
    if facts["texts"]:
        print("  texts sha256: " + ", ".join(f"{k} {v}" for k, v in facts["texts"].items()))
    if facts["settings"]:
        print("  settings: " + ", ".join(f"{k}={v}" for k, v in facts["settings"].items()))
    return facts
