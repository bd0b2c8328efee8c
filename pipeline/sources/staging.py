"""Moving what the driver prepared to nodes that share nothing but object storage (no Ray here).

In:  a local folder (a resolved model, an export) or local corpus files, and a storage root: an
     `s3://` / `gs://` URL or a folder every node mounts (NFS).
Out: * `stage_folder(folder, root)` → `<root>/.fluid/models/<sha256>` (content-addressed: the sha256
       of its manifest of file names and file digests). Uploaded once, `manifest.json` last, so a
       half-finished upload is never used; later runs with the same files reuse it.
     * `local_folder(ref, cache_dir)` → a local folder for a path (as is) or a staged URL: fetched
       once per node into `<cache>/staged/<sha256>`, every file checked against the manifest, the
       folder renamed into place only when complete (concurrent fetchers serialise on a lock).
     * `stage_files(paths, root)` → URLs of the files under `<root>/.fluid/corpora/<sha256>/`, names
       kept (the split of a `.txt` document is decided by its file name, so it does not change);
       `stage_items` does it for planned corpus files and stages the tokenizer (`stage_tokenizer`: the
       model folder without its weights, `<root>/.fluid/tokenizers/<sha256>`).
     * `upload_dir`, `copy_out`, `is_remote`, `join`: small fsspec helpers for outputs (copying a
       remote folder down is `pipeline.export_format.copy_folder`).

Credentials and endpoints come from the environment as the cloud SDKs read them (e.g.
`AWS_ENDPOINT_URL` for an S3-compatible store); nothing here prints them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.errors import FluidError
from pipeline.sources.model_source import sha256_file

MANIFEST = "manifest.json"
STAGE_DIR = ".fluid"
_KNOWN: dict[str, Path] = {}  # staged URL → the local folder it came from (this process)


def is_remote(path: str | os.PathLike | None) -> bool:
    """True for a URL of another file system (s3://, gs://, memory://…); False for paths and file://."""
    s = str(path or "")
    return "://" in s and not s.startswith(("file://", "local://"))


def join(root: str, *parts: str) -> str:
    return "/".join([str(root).rstrip("/"), *(p.strip("/") for p in parts)])


def _fs(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(str(url))
    except (ImportError, ValueError) as e:  # e.g. s3:// without s3fs installed
        scheme = str(url).split("://", 1)[0]
        hint = {"s3": " (pip install 'fluid-on-ray[s3]')", "gs": " (pip install 'fluid-on-ray[gcs]')"}.get(scheme, "")
        raise FluidError(f"cannot open {url}: {type(e).__name__}: {e}{hint}") from None


def manifest_of(folder: Path) -> dict:
    """{"sha256": digest of the file list, "files": {relative name: {"sha256", "size"}}} (links followed)."""
    files = {}
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).as_posix()
        if f.is_dir() or rel.startswith(".") or "/." in rel or rel == MANIFEST:
            continue
        files[rel] = {"sha256": sha256_file(f), "size": f.stat().st_size}
    if not files:
        raise FluidError(f"{folder} is empty: nothing to stage")
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "files": files}


def content_manifest(url: str, suffix: str = ".parquet") -> dict:
    """{"sha256": digest of the list, "files": {relative name: sha256 of its bytes}} of the files under
    `url` (a path or any fsspec URL) whose names end in `suffix`: a folder of shards by what it holds."""
    fs, root = _fs(url)
    root = root.rstrip("/")
    files = {}
    for f in sorted(fs.find(root)):
        rel = f[len(root):].lstrip("/")
        if not f.endswith(suffix) or rel.startswith(".") or "/." in rel:
            continue
        h = hashlib.sha256()
        with fs.open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
        files[rel] = h.hexdigest()
    if not files:
        raise FluidError(f"no {suffix} files under {url}")
    return {"sha256": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(), "files": files}


def stage_folder(folder: str | Path, root: str, kind: str = "models") -> str:
    """Upload `folder` content-addressed under `<root>/.fluid/<kind>/<sha256>` (once); returns that URL."""
    folder = Path(folder)
    manifest = manifest_of(folder)
    url = join(root, STAGE_DIR, kind, manifest["sha256"])
    fs, base = _fs(url)
    try:
        if not fs.exists(join(base, MANIFEST)):
            for rel in manifest["files"]:
                fs.makedirs(os.path.dirname(join(base, rel)), exist_ok=True)
                fs.put_file(str((folder / rel).resolve()), join(base, rel))
            fs.pipe_file(join(base, MANIFEST), json.dumps(manifest, indent=1).encode())  # last: marks it complete
    except FluidError:
        raise
    except Exception as e:
        raise FluidError(f"cannot stage {folder} to {url} ({type(e).__name__}: {e})") from None
    _KNOWN[url] = folder
    return url


def local_folder(ref: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local folder for `ref`: a local path as is; a staged URL fetched once into this node's cache."""
    ref = str(ref)
    if not is_remote(ref):
        return Path(ref.removeprefix("file://"))
    if ref in _KNOWN and _KNOWN[ref].is_dir():
        return _KNOWN[ref]
    from pipeline.sources.model_source import build_cached, default_cache_dir, ensure_writable_dir

    fs, base = _fs(ref)
    try:
        manifest = json.loads(fs.cat_file(join(base, MANIFEST)))
    except FileNotFoundError:
        raise FluidError(f"{ref} has no {MANIFEST}: not a staged folder (or its upload never finished)") from None
    except Exception as e:
        raise FluidError(f"cannot read {join(ref, MANIFEST)} ({type(e).__name__}: {e})") from None
    cache = ensure_writable_dir(Path(cache_dir) if cache_dir else default_cache_dir())

    def build(tmp: Path) -> None:
        for rel, info in manifest["files"].items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(join(base, rel), str(dest))
            if sha256_file(dest) != info["sha256"]:
                raise FluidError(f"{join(ref, rel)} does not match its checksum in {MANIFEST}; "
                                 "the staged copy is corrupt: delete the folder and run again")
        (tmp / MANIFEST).write_text(json.dumps(manifest))

    return build_cached(cache / "staged" / manifest["sha256"], build, marker=MANIFEST)


def stage_files(paths: list[str], root: str) -> list[str]:
    """Upload local files (once, content-addressed as a set) and return their URLs, in the same order."""
    with tempfile.TemporaryDirectory(prefix="fluid-stage-") as tmp:
        names = []
        for p in paths:
            name = Path(p).name
            if name in names:
                raise FluidError(f"two corpus files named {name}: rename one (staged files keep their names)")
            names.append(name)
            os.symlink(Path(p).resolve(), Path(tmp) / name)
        url = stage_folder(Path(tmp), root, kind="corpora")
    _KNOWN.pop(url, None)
    return [join(url, n) for n in names]


def upload_dir(local: str | Path, url: str) -> None:
    """Copy a local folder's files to `url` (a remote folder), replacing files of the same name."""
    fs, base = _fs(url)
    local = Path(local)
    for f in sorted(local.rglob("*")):
        if f.is_file():
            dest = join(base, f.relative_to(local).as_posix())
            fs.makedirs(os.path.dirname(dest), exist_ok=True)
            fs.put_file(str(f), dest)


def copy_out(local: str | Path, target: str) -> None:
    """Put a finished local folder at `target`: uploaded if remote, else moved (replacing it) there."""
    if is_remote(target):
        upload_dir(local, target)
        return
    dst = Path(target.removeprefix("file://"))
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(local, dst)


def stage_items(items: list[dict], tokenizer_path, root: str) -> tuple[list[dict], str]:
    """Planned corpus files (pipeline/data/local.py `plan_sources`) and a tokenizer folder, with every
    local path replaced by its staged URL under `root`; remote URLs are left as they are."""
    local = [it["url"] for it in items if "://" not in it["url"] or it["url"].startswith("file://")]
    staged = dict(zip(local, stage_files([u.removeprefix("file://") for u in local], root), strict=True)) if local else {}
    items = [{**it, "url": staged.get(it["url"], it["url"])} for it in items]
    tok = str(tokenizer_path) if is_remote(tokenizer_path) else stage_tokenizer(Path(tokenizer_path), root)
    return items, tok


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".pkl")


def stage_tokenizer(folder: Path, root: str) -> str:
    """Stage a model folder's files without its weights (what the data pipeline's tokenizers need)."""
    with tempfile.TemporaryDirectory(prefix="fluid-stage-") as tmp:
        for f in folder.iterdir():
            if f.is_file() and not f.name.startswith(".") and not f.name.endswith(WEIGHT_SUFFIXES):
                os.symlink(f.resolve(), Path(tmp) / f.name)
        url = stage_folder(Path(tmp), root, kind="tokenizers")
    _KNOWN[url] = folder
    return url
