"""The FLUID export format: the file names of an export folder and its versioned `fluid.json`.

In:  an export folder (a local path, or an fsspec URL for `localize_export`), or the metadata a
     trainer wants to record (a dict, or a `FluidMeta`).
Out: * `FluidMeta`: the schema of `fluid.json` — base model, mask token and id, k_max, the policy
       defaults, the drafter and horizon-head parts, the data and training configs; unknown keys are
       kept in `extra`. `FluidMeta.from_dict` validates, `to_dict` gives the JSON object back.
     * `read_fluid_meta(folder)` → FluidMeta: the one reader (FluidError for a missing, corrupt,
       incomplete or newer file). `write_fluid_meta(folder, meta)`: the one writer (validated, atomic).
     * `localize_export(spec)` → a local export folder: a path as is, a URL copied into a fresh
       temporary folder by `copy_folder` (the one fsspec folder copier; pickled weights are skipped).

Format versions: 1 is what the code of commit 5d2063a writes (tests/fixtures/export_v1/fluid.json).
A newer version than FORMAT_VERSION is refused with one line naming the file and both versions.

Only the standard library, fsspec (imported when a URL is copied) and pipeline.errors are imported:
every layer, from pipeline.sources up to serve, may import this module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import FluidError

FLUID_META_FILE = "fluid.json"
HORIZON_HEAD_FILE = "horizon_head.safetensors"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")  # never copied, never loaded
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
FORMAT_VERSION = 1  # the newest version this code reads, and the one it writes
REQUIRED_META = (
    "mask_token", "mask_token_id", "k_max", "policy_defaults", "base_model", "data_config", "train_config",
)
_OPTIONAL_META = ("drafter", "horizon_head", "code_version")
_POLICY_KEYS = ("policy", "gamma", "max_horizon")
_BASE_KEYS = ("spec", "sha256")


@dataclass(frozen=True)
class FluidMeta:
    """`fluid.json` of format 1. `drafter` is set for a frozen base with a gated drafter
    (pipeline/model/drafter.py), `horizon_head` once `fluid fit-horizon` added a head."""

    mask_token: str
    mask_token_id: int
    k_max: int
    policy_defaults: dict[str, Any]  # policy, gamma, max_horizon
    base_model: dict[str, Any]  # spec, sha256
    data_config: dict[str, Any]  # {"data": DataConfig, "noise": NoiseConfig} as dicts
    train_config: dict[str, Any]  # TrainConfig as a dict, plus steps_done
    format_version: int = FORMAT_VERSION
    drafter: dict[str, Any] | None = None
    horizon_head: dict[str, Any] | None = None
    code_version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def base_spec(self) -> str | None:
        return self.base_model.get("spec")

    @property
    def data_fingerprint(self) -> dict[str, Any]:
        """What the training data was made from (format 1 records the data and noise configs)."""
        return self.data_config

    @property
    def dtype(self) -> str | None:
        """The training dtype, where recorded (format 1 does not: the weights' dtype is in config.json)."""
        return self.train_config.get("dtype")

    @classmethod
    def from_dict(cls, meta: Any, where: str = "fluid metadata") -> FluidMeta:
        """Validate a parsed `fluid.json` (FluidError naming `where`) and build the schema."""
        _check(meta, where)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in meta.items() if k in names},
                   extra={k: v for k, v in meta.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: format_version first, optional parts only when set, extra keys last but code_version."""
        d = {"format_version": self.format_version, **{k: getattr(self, k) for k in REQUIRED_META}}
        d |= {k: getattr(self, k) for k in ("drafter", "horizon_head") if getattr(self, k) is not None}
        d |= self.extra
        return d | ({"code_version": self.code_version} if self.code_version is not None else {})


def _check(meta: Any, where: str) -> None:
    if not isinstance(meta, dict):
        raise FluidError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version")
    if version is None:
        raise FluidError(f"{where}: missing format_version (not a FLUID export?)")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise FluidError(f"{where}: unknown format_version {version} (newer than {FORMAT_VERSION}, the newest "
                         "this code reads); upgrade fluid-on-ray to load this export")
    if version != FORMAT_VERSION:
        raise FluidError(f"{where}: unknown format_version {version!r} (this code reads {FORMAT_VERSION})")
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise FluidError(f"{where}: missing keys {missing}")
    if not isinstance(meta["mask_token_id"], int) or meta["mask_token_id"] < 0:
        raise FluidError(f"{where}: mask_token_id must be a non-negative integer, got {meta['mask_token_id']!r}")
    if not isinstance(meta["k_max"], int) or meta["k_max"] < 1:
        raise FluidError(f"{where}: k_max must be a positive integer, got {meta['k_max']!r}")
    for key, sub in (("policy_defaults", _POLICY_KEYS), ("base_model", _BASE_KEYS)):
        if not isinstance(meta[key], dict) or any(s not in meta[key] for s in sub):
            raise FluidError(f"{where}: {key} must be an object with keys {list(sub)}")


def is_export(path: str | Path) -> bool:
    """True for a local folder holding `fluid.json`."""
    return Path(path).is_dir() and (Path(path) / FLUID_META_FILE).is_file()


def read_fluid_meta(export_dir: str | Path) -> FluidMeta:
    """Read and validate `fluid.json` of an export folder."""
    path = Path(export_dir) / FLUID_META_FILE
    if not path.is_file():
        raise FluidError(f"{export_dir}: no {FLUID_META_FILE} (not a FLUID export)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FluidError(f"{path}: corrupt JSON ({e})") from e
    return FluidMeta.from_dict(meta, str(path))


def write_fluid_meta(export_dir: str | Path, meta: FluidMeta | dict) -> Path:
    """Validate `meta` and write it as `export_dir/fluid.json` (a temporary file renamed into place);
    a dict keeps its key order. Returns the file's path."""
    d = meta.to_dict() if isinstance(meta, FluidMeta) else meta
    FluidMeta.from_dict(d)
    path = Path(export_dir) / FLUID_META_FILE
    tmp = path.parent / f".{FLUID_META_FILE}.tmp"
    tmp.write_text(json.dumps(d, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def copy_folder(url: str, dest: str | Path, *, what: str | None = None, skip: tuple[str, ...] = PICKLED_SUFFIXES) -> Path:
    """Copy the files under the fsspec URL `url` into the local folder `dest` (created), names kept,
    files ending in `skip` left out. `what` names the source in errors (default: the URL)."""
    import fsspec

    what = what or url
    try:
        fs, root = fsspec.core.url_to_fs(url)
        files = [f for f in fs.find(root) if not fs.isdir(f)]
    except Exception as e:
        raise FluidError(f"cannot list {what} ({type(e).__name__}: {e})") from None
    if not files:
        raise FluidError(f"{what} is empty or missing")
    dest, root = Path(dest), root.rstrip("/")
    for f in files:
        rel = f[len(root):].lstrip("/")
        if not rel.endswith(skip):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f, str(dest / rel))
    return dest


def localize_export(spec: str, what: str | None = None) -> Path:
    """A local export folder for `spec`: a path (or file:// URL) as is, any other fsspec URL copied into
    a fresh temporary folder (pickled weight files skipped). FluidError when there is no fluid.json."""
    what = what or spec
    if "://" not in spec or spec.startswith("file://"):
        path = Path(spec.removeprefix("file://")).expanduser()
        if not is_export(path):
            raise FluidError(f"{what}: no {FLUID_META_FILE} there (not a FLUID export folder)")
        return path
    out = Path(tempfile.mkdtemp(prefix="fluid-export-"))
    try:
        copy_folder(spec, out, what=what)
        if not is_export(out):
            raise FluidError(f"{what}: no {FLUID_META_FILE} there (not a FLUID export folder)")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out
