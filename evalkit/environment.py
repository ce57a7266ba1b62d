"""What software a record was produced with: the Python and package versions, captured one way.

The run record's `environment` block (results.json) and a trained adapter's provenance
(`evalkit_train.json`, whose fingerprint hashes the training libraries' versions) both read
versions here.
"""
from __future__ import annotations

import platform
from collections.abc import Iterable
from importlib import metadata
from typing import Any

# what a run record lists (None: not installed)
RUN_PACKAGES = ("evalkit", "torch", "transformers", "peft", "trl", "bitsandbytes", "lm_eval", "datasets", "openai",
                "jsonschema", "safetensors", "accelerate")


def python_version() -> str:
    return platform.python_version()


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """name -> installed version (None when the distribution is not installed), in the order given.
    Names are distribution names; `lm_eval` and `lm-eval` find the same one."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(device: str) -> dict[str, Any]:
    """The run record's `environment`: Python, platform, device and package versions."""
    return {"python": python_version(), "platform": platform.platform(), "device": device,
            "packages": package_versions(RUN_PACKAGES)}
