"""What is recorded beside every trained adapter (`evalkit_train.json`), and the staleness fingerprint.

The fingerprint hashes everything that changes what training produces: the resolved recipe (minus
its output path and name), the content of the training file, the base model's content hash and the
versions of the training libraries. Its parts are stored too, so a retrain can say why.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from evalkit.environment import package_versions, python_version
from evalkit.fileio import atomic_write
from evalkit.models.base import ResolvedBase, file_sha256
from evalkit.types import stable_hash

PROVENANCE_FILE = "evalkit_train.json"
SCHEMA_VERSION = 1
RUNNER_VERSION = 1  # bump when the runner changes how it trains: every adapter becomes stale
TRAIN_LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes")
RECORDED_LIBRARIES = (*TRAIN_LIBRARIES, "accelerate", "datasets", "evalkit")


def recorded_versions() -> dict[str, str | None]:
    """The `versions` of a provenance record: Python, then every RECORDED_LIBRARIES package."""
    return {"python": python_version(), **package_versions(RECORDED_LIBRARIES)}


def file_record(path: Path) -> dict[str, Any]:
    return {"path": str(path), "sha256": file_sha256(path), "bytes": path.stat().st_size}


def fingerprint_parts(recipe_dict: dict[str, Any], data_sha256: str, base: ResolvedBase) -> dict[str, str]:
    training_view = {k: v for k, v in recipe_dict.items() if k not in ("name", "output", "source", "base_dir")}
    data = dict(training_view.pop("data"))
    data.pop("train")  # its content counts, not where it lives
    data.pop("check_against")  # leakage report only; does not change the adapter
    training_view["data"] = data
    training_view.pop("base")  # identified by content hash below
    if training_view.get("launcher") is None:  # trained in evalkit's process, as every adapter before launchers
        training_view.pop("launcher", None)
    return {"recipe": stable_hash(training_view), "data": data_sha256, "base": base.sha256,
            "versions": stable_hash(package_versions(TRAIN_LIBRARIES)), "runner": str(RUNNER_VERSION)}


def fingerprint(parts: dict[str, str]) -> str:
    return stable_hash(parts)[:32]


def stale_reason(old: dict[str, Any] | None, parts: dict[str, str]) -> str:
    if old is None:
        return "no adapter yet"
    before = old.get("fingerprint_parts") or {}
    what = {"recipe": "recipe changed", "data": "training data changed", "base": "base model changed",
            "versions": "library versions changed", "runner": "runner version changed"}
    changed = [msg for key, msg in what.items() if before.get(key) != parts.get(key)]
    return ", ".join(changed) or "fingerprint changed"


def device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device, "host_cpu": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count(), "platform": sys.platform}
    try:
        with open("/proc/cpuinfo") as f:
            flags_line = next((ln for ln in f if ln.startswith("flags")), "")
            f.seek(0)
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        info["cpu_model"] = model
        info["cpu_avx512_bf16"] = "avx512_bf16" in flags_line.split()
    except OSError:
        pass
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def read_provenance(adapter_dir: str | Path) -> dict[str, Any] | None:
    """The adapter's `evalkit_train.json`, or None when it has none (or it is unreadable)."""
    path = Path(adapter_dir) / PROVENANCE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_provenance(adapter_dir: Path, provenance: dict[str, Any]) -> None:
    atomic_write(adapter_dir / PROVENANCE_FILE, json.dumps(provenance, indent=2, ensure_ascii=False) + "\n")
