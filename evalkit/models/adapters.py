"""Checking and attaching peft adapters to ONE base instance, by name.

Checks run before anything is loaded, so a wrong adapter fails with a message naming it:
missing folder, pickle weights (refused unless allowed), a corrupt safetensors file, an
adapter_config.json that names another base, or tensor shapes that do not fit the base.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evalkit.errors import ConfigError, ModelError, did_you_mean
from evalkit.fileio import read_json
from evalkit.models.base import ResolvedBase, file_sha256

_QUANT_SUFFIX = re.compile(r"[.-](q\d.*|f16|f32|bf16|gguf)$", re.I)


@dataclass(frozen=True)
class AdapterInfo:
    path: Path
    config: dict[str, Any]
    weights: Path
    sha256: str
    is_dora: bool
    provenance: dict[str, Any] | None


def _name_key(name: str) -> str:
    stem = Path(str(name).rstrip("/")).name.lower()
    while True:
        new = _QUANT_SUFFIX.sub("", stem)
        if new == stem:
            return stem
        stem = new


def base_aliases(resolved: ResolvedBase, model_config: Any = None) -> set[str]:
    names = {resolved.spec.ref, resolved.path, resolved.sha256[:32]}
    if model_config is not None and getattr(model_config, "name_or_path", None):
        names.add(model_config.name_or_path)
    return {_name_key(n) for n in names if n}


def inspect_adapter(path: Path, *, allow_pickle: bool = False) -> AdapterInfo:
    """Validate an adapter folder's files without loading the base."""
    if not path.is_dir():
        raise ConfigError(f"adapter folder not found: {path}")
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"not a peft adapter folder (no adapter_config.json): {path}")
    config = read_json(cfg_path, "adapter config")
    if not isinstance(config, dict):
        raise ConfigError(f"an adapter config must be a JSON object, not {type(config).__name__}", file=cfg_path,
                          line=1)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        pickle_file = path / "adapter_model.bin"
        if pickle_file.is_file() and not allow_pickle:
            raise ModelError(f"{pickle_file}: pickle weights can run arbitrary code when loaded; refusing. "
                             "Convert it to safetensors, or set `allow_pickle: true` on the variant if you trust it")
        if not pickle_file.is_file():
            raise ModelError(f"no adapter_model.safetensors in {path}")
        weights = pickle_file
    else:
        _check_safetensors(weights)
    h = hashlib.sha256()
    h.update(file_sha256(cfg_path).encode())
    h.update(file_sha256(weights).encode())
    prov_path = path / "evalkit_train.json"
    provenance = read_json(prov_path, "provenance") if prov_path.is_file() else None
    return AdapterInfo(path, config, weights, h.hexdigest(), bool(config.get("use_dora")), provenance)


def _check_safetensors(weights: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118  (safe_open is not iterable since safetensors 0.8)
                f.get_slice(k).get_shape()
    except Exception as e:
        raise ModelError(f"{weights}: corrupt or unreadable safetensors file ({e})") from None


def adapter_shapes(info: AdapterInfo) -> dict[str, tuple[int, ...]]:
    if info.weights.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(info.weights), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118  (not iterable since 0.8)


def check_fits_base(info: AdapterInfo, base_model, resolved: ResolvedBase) -> None:
    """The adapter must have been trained on this base (its provenance's content hash, when it has
    one), name this base (or the one its provenance records), and fit its shapes."""
    named = info.config.get("base_model_name_or_path")
    trained_on = (info.provenance or {}).get("base") or {}
    prov_hash = trained_on.get("sha256")
    if prov_hash and prov_hash != resolved.sha256:
        raise ModelError(f"adapter {info.path} was trained on a base with content hash {prov_hash[:12]}…, "
                         f"but this suite's base is {resolved.sha256[:12]}… ({resolved.spec.ref})")
    # the name is a label: the provenance's content hash, when there is one, proves identity, but a
    # config naming neither this base nor the one the provenance records is an adapter for another base
    known = base_aliases(resolved, base_model.config)
    if prov_hash:
        known |= {_name_key(n) for n in (trained_on.get("ref"), trained_on.get("path")) if n}
    if named and _name_key(named) not in known:
        raise ModelError(f"adapter {info.path} was made for base '{named}', not '{resolved.spec.ref}'")
    modules = dict(base_model.named_modules())
    for key, shape in adapter_shapes(info).items():
        m = re.match(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if not m:
            continue
        target = modules.get(m.group(1))
        if target is None or not hasattr(target, "in_features"):
            raise ModelError(f"adapter {info.path}: tensor '{key}' targets module '{m.group(1)}', "
                             f"which base '{resolved.spec.ref}' does not have")
        want = target.in_features if m.group(2) == "A" else target.out_features
        got = shape[1] if m.group(2) == "A" else shape[0]
        if got != want:
            raise ModelError(f"adapter {info.path}: tensor '{key}' has shape {list(shape)}, which does not fit "
                             f"'{m.group(1)}' of base '{resolved.spec.ref}' ({target.in_features}->"
                             f"{target.out_features}); was it trained for another base?")


def peft_name(variant: str) -> str:
    """The name a variant's adapter is attached under. peft names modules by it and refuses a '.',
    which a variant name may hold (`lora-v1.2`, a sweep's `lora[lr=1.5e-3]`): it becomes a one-dot
    leader (U+2024), which no variant name has."""
    return variant.replace(".", "\u2024")


def attach_adapter(model, name: str, info: AdapterInfo):
    """Load a variant's adapter onto `model` under `peft_name(name)`, wrapping it in a PeftModel the first time."""
    from peft import PeftModel

    _check_peft_type(info)
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(info.path), adapter_name=peft_name(name), is_trainable=False)
            return model
        return PeftModel.from_pretrained(model, str(info.path), adapter_name=peft_name(name), is_trainable=False)
    except Exception as e:
        raise ModelError(f"adapter {info.path} (variant '{name}') failed to load: {type(e).__name__}: {e}") from None


def _check_peft_type(info: AdapterInfo) -> None:
    """An adapter_config.json whose peft_type this peft does not know (peft would raise a bare KeyError).
    Checked when attaching, where peft is imported anyway (importing it takes seconds)."""
    import peft

    kind = info.config.get("peft_type")
    known = [t.value for t in peft.PeftType]
    if kind in known:
        return
    close = did_you_mean(kind, known) if isinstance(kind, str) else ""
    if not close.startswith("; did you mean"):
        close = "; a LoRA or DoRA adapter has peft_type 'LORA'"
    what = "has no peft_type" if kind is None else f"peft_type {kind!r} is not an adapter type peft {peft.__version__} knows"
    raise ModelError(f"{info.path / 'adapter_config.json'}: {what}{close}")
