"""Sharing stage one's record stores, and browsing the cache.

A *package* is a self-contained directory that collaborators exchange::

    <package>/
      MANIFEST.json              format version, keys, schema, sha256 + size of every other file (written last)
      README.md                  the dataset card
      store.zarr/                the record store as is    (or store.zarr.zip: one zip, read-only via ZipStore)
      base/model.safetensors     the base model the deltas were computed against
      base/meta.json base/metrics.json
      overfit/meta.json          the store's cache entry metadata

:func:`import_store` checks every file against the manifest and every block against its checksum,
then registers the base model and the store in a cache under their original keys, so that
``ocd train`` / ``ocd run`` of the same task find them as cache hits.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import numpy as np

from .cache import META, Cache, dir_size, write_json_atomic
from .errors import OcdError
from .fingerprint import SCHEMA_VERSION
from .store import RECORD_FIELDS, SPLITS, STORE_SCHEMA, RecordStore, block_checksum
from .verify import verify_store

PACKAGE_FORMAT = "ocd-store-package"
PACKAGE_VERSION = 1
MANIFEST = "MANIFEST.json"
CARD = "README.md"
STORE_DIR = "store.zarr"  # == stages.overfit.STORE_NAME (not imported: stages import pipeline, not back)
STORE_ZIP = "store.zarr.zip"
BASE_FILES = ("model.safetensors", META, "metrics.json")

STAGES = ("base", "overfit", "train", "evaluate")
PARENTS = {"overfit": ("base", "base_key"), "train": ("overfit", "store_key"), "evaluate": ("train", "train_key")}
"""stage -> (parent stage, meta field holding the parent's key)."""

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: the same store zips to the same bytes


# -- helpers -----------------------------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    """Relative POSIX paths of every file under `root`, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def open_store_path(path: Path | str) -> RecordStore:
    """A read-only RecordStore from a directory, a ``.zip`` file or an fsspec URL."""
    text = str(path)
    if text.endswith(".zip") and "://" not in text and "::" not in text:
        import zarr
        import zarr.storage

        try:
            group = zarr.open_group(zarr.storage.ZipStore(text, mode="r"), mode="r", zarr_format=3)
        except (FileNotFoundError, zipfile.BadZipFile, zarr.errors.GroupNotFoundError, KeyError, ValueError) as exc:
            raise OcdError(f"no ocd record store in {text}: {exc}") from None
        if group.attrs.get("store_schema") != STORE_SCHEMA:
            raise OcdError(f"{text} is not an ocd record store of schema {STORE_SCHEMA}")
        return RecordStore(group, text)
    return RecordStore.open(text)


def _match_keys(cache: Cache, key: str, stages: Iterable[str]) -> list[tuple[str, str]]:
    """(stage, key) of the entries (finished or not) whose key starts with `key`; `stage/key` narrows."""
    if "/" in key:
        stage, _, key = key.partition("/")
        stages = [stage]
    found: set[tuple[str, str]] = set()
    for stage in stages:
        stage_dir = cache.root / stage
        if not stage_dir.is_dir():
            continue
        for path in stage_dir.iterdir():
            name = path.name.removesuffix(".partial")
            if path.is_dir() and name.startswith(key):
                found.add((stage, name))
    return sorted(found)


def _unique(cache: Cache, key: str, stages: Iterable[str]) -> tuple[str, str]:
    if not key or key.startswith("/") or key in (".", ".."):
        raise OcdError(f"not a cache key: {key!r}")
    matches = _match_keys(cache, key, stages)
    if not matches:
        raise OcdError(f"no cache entry matches {key!r} in {cache.root}")
    if len(matches) > 1:
        names = ", ".join(f"{s}/{k}" for s, k in matches[:5])
        raise OcdError(f"{key!r} is ambiguous in {cache.root}: {names}{' ...' if len(matches) > 5 else ''}")
    return matches[0]


def find_store(cache: Cache, key_or_path: str | Path) -> Path:
    """The store directory for an overfit key (or unique prefix), an entry directory or a store path."""
    path = Path(key_or_path)
    if isinstance(key_or_path, Path) or path.exists():
        if (path / STORE_DIR).is_dir():
            path = path / STORE_DIR
        if not (path / "zarr.json").is_file():
            raise OcdError(f"{path} is not a record store (no zarr.json)")
        return path
    stage, key = _unique(cache, str(key_or_path), ["overfit"])
    if cache.lookup(stage, key) is None:
        raise OcdError(f"overfit entry {key} is incomplete (a .partial store); finish it with `ocd overfit`")
    return cache.path(stage, key) / STORE_DIR


# -- export ------------------------------------------------------------------------------------------


def delta_norm_stats(store: RecordStore) -> dict[str, dict[str, float]]:
    """Per split: mean, median, max and std of the per-sample Frobenius norm of `delta` (streamed)."""
    out = {}
    for split in SPLITS:
        norms = np.concatenate(
            [
                np.sqrt((r["delta"].astype(np.float64) ** 2).reshape(len(r["delta"]), -1).sum(1))
                for r in store.iter_blocks(split, ("delta",))
            ]
        )
        out[split] = {
            "mean": float(norms.mean()),
            "median": float(np.median(norms)),
            "max": float(norms.max()),
            "std": float(norms.std()),
        }
    return out


def _overfit_meta(store_path: Path, attrs: dict[str, Any]) -> dict[str, Any]:
    """The cache entry's meta.json, or one rebuilt from the store's provenance."""
    meta_file = store_path.parent / META
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("key") == attrs.get("key"):
            return meta
    sizes = attrs.get("sizes", {})
    return {
        "stage": "overfit",
        "key": attrs["key"],
        "created": attrs.get("created"),
        "task": attrs.get("task"),
        "base_key": attrs.get("base_key"),
        "layer": attrs.get("layer"),
        "config": attrs.get("config", {}),
        "samples": sizes,
        "computed_samples": sum(sizes.values()),
        "seconds": None,
        "stats": attrs.get("stats", {}),
    }


def _find_base(cache: Cache, store_path: Path, base_key: str) -> Path:
    entry = cache.lookup("base", base_key)
    if entry is not None:
        return entry.path
    # a store inside another cache (<root>/overfit/<key>/store.zarr): its own root's base entry
    sibling = Cache(store_path.resolve().parent.parent.parent).lookup("base", base_key)
    if sibling is not None:
        return sibling.path
    raise OcdError(f"base model {base_key} of the store is not in cache {cache.root}; cannot package it")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def dataset_card(attrs: dict[str, Any], base_meta: dict[str, Any], norms: dict[str, Any], zipped: bool,
                 arrays: dict[str, tuple[list[int], str]]) -> str:
    """The package's README.md."""
    store_name = STORE_ZIP if zipped else STORE_DIR
    opt = attrs.get("optimizer", {})
    sizes = attrs.get("sizes", {})
    stats = attrs.get("stats", {})
    lines = [
        f"# ocd weight-delta dataset: {attrs.get('task')} / layer {attrs.get('layer')}",
        "",
        "Per-sample weight changes from stage one of *OCD: Learning to Overfit with Conditional Diffusion Models*:",
        "every sample was finetuned alone from the base model below, on one layer, and its conditioning signals",
        "and weight change (`delta`) recorded.",
        "",
        "| field | value |",
        "| --- | --- |",
        f"| task | `{attrs.get('task')}` (version {attrs.get('task_version')}) |",
        f"| store key | `{attrs.get('key')}` |",
        f"| base model key | `{attrs.get('base_key')}` (`base/model.safetensors`) |",
        f"| layer | `{attrs.get('layer')}` ({attrs.get('layer_kind')}) |",
        f"| weight shape | {tuple(attrs.get('weight_shape', []))} |",
        f"| optimizer | {opt.get('name', '?')}: " + ", ".join(f"{k}={v}" for k, v in opt.items() if k != "name") + " |",
        "| split sizes | " + ", ".join(f"{s}: {n:,}" for s, n in sizes.items()) + " |",
        f"| schema version | {attrs.get('schema_version')} (store schema {attrs.get('store_schema')}) |",
        f"| codec | {attrs.get('codec')} |",
        f"| data fingerprint | `{attrs.get('data_fingerprint')}` |",
        f"| created | {attrs.get('created')} with ocd {attrs.get('ocd_version')} |",
    ]
    metrics = base_meta.get("metrics", {})
    if metrics:
        lines.append(
            "| base model metrics | "
            + "; ".join(f"{s}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in m.items()) for s, m in metrics.items())
            + " |"
        )
    lines += ["", "## Arrays (per split, first axis = sample)", "", "| name | shape | dtype |", "| --- | --- | --- |"]
    lines += [f"| {name} | {tuple(shape)} | {dtype} |" for name, (shape, dtype) in arrays.items()]
    lines += [
        "",
        "## Delta statistics",
        "",
        "| split | delta mean | delta std | ‖delta‖ mean | ‖delta‖ median | ‖delta‖ max "
        "| loss before | loss after | improved |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for split in SPLITS:
        s, n = stats.get(split, {}), norms.get(split, {})
        d = s.get("delta", {})
        row = [d.get("mean"), d.get("std"), n.get("mean"), n.get("median"), n.get("max"),
               s.get("loss_before"), s.get("loss_after"), s.get("improved_fraction")]
        lines.append(f"| {split} | " + " | ".join(_fmt(v) for v in row) + " |")
    if zipped:
        ocd_open = f'store = RecordStore.open("zip::{store_name}")'
        zarr_open = f'root = zarr.open_group(zarr.storage.ZipStore("{store_name}", mode="r"), mode="r")'
        zarr_import = "import zarr, zarr.storage"
    else:
        ocd_open = f'store = RecordStore.open("{store_name}")'
        zarr_open = f'root = zarr.open_group("{store_name}", mode="r")'
        zarr_import = "import zarr"
    lines += [
        "",
        "## Load it in three lines",
        "",
        "From this directory, with ocd installed:",
        "",
        "```python",
        "from ocd.pipeline.store import RecordStore",
        ocd_open,
        'delta = store.read_block("train", 0)["delta"]  # the first block: (block, *weight shape)',
        "```",
        "",
        "With plain zarr (>= 3):",
        "",
        "```python",
        zarr_import,
        zarr_open,
        'delta = root["train/delta"][:]  # (n_train, *weight shape)',
        "```",
        "",
        f"Into a cache, for `ocd train` / `ocd run --task {attrs.get('task')}`: "
        "`ocd store import <this directory>`.",
        "Every file's sha256 is in `MANIFEST.json`; every block's checksum is in `<split>/checksum`.",
        "",
    ]
    return "\n".join(lines)


def _write_zip(store_dir: Path, dest: Path) -> None:
    """Zip a store directory (keys at the zip's root, stored uncompressed: chunks are compressed already)."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name in _files(store_dir):
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            with open(store_dir / name, "rb") as src, zf.open(info, "w", force_zip64=True) as out:
                shutil.copyfileobj(src, out, 1 << 20)


def write_manifest(package: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Hash every file of `package` into MANIFEST.json (written last)."""
    files = [
        {"path": name, "size": (package / name).stat().st_size, "sha256": sha256_file(package / name)}
        for name in _files(package)
        if name != MANIFEST
    ]
    manifest = {
        "format": PACKAGE_FORMAT,
        "format_version": PACKAGE_VERSION,
        **info,
        "total_bytes": sum(f["size"] for f in files),
        "files": files,
    }
    write_json_atomic(package / MANIFEST, manifest)
    return manifest


def export_store(cache: Cache, overfit_key_or_path: str | Path, dest: Path, *, zip: bool = False) -> Path:
    """Write a self-contained package of a finished store to `dest` (built beside it, then renamed)."""
    from .. import __version__

    dest = Path(dest)
    store_path = find_store(cache, overfit_key_or_path)
    store = RecordStore.open(str(store_path))
    problems = verify_store(store)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise OcdError(f"store {store_path} cannot be exported: {problems[0]}{more}")
    attrs = store.attrs
    key, base_key = attrs["key"], attrs["base_key"]
    base_path = _find_base(cache, store_path, base_key)
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise OcdError(f"{dest} already exists; choose a new destination")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        if zip:
            _write_zip(store_path, tmp / STORE_ZIP)
        else:
            shutil.copytree(store_path, tmp / STORE_DIR)
        (tmp / "base").mkdir()
        for name in BASE_FILES:
            if (base_path / name).is_file():
                shutil.copy2(base_path / name, tmp / "base" / name)
        if not (tmp / "base" / "model.safetensors").is_file():
            raise OcdError(f"base model {base_key} has no model.safetensors in {base_path}")
        base_meta = json.loads((base_path / META).read_text())
        (tmp / "overfit").mkdir()
        write_json_atomic(tmp / "overfit" / META, _overfit_meta(store_path, attrs))
        arrays = {name: (list(store.split("train")[name].shape[1:]), str(store.split("train")[name].dtype))
                  for name in RECORD_FIELDS}
        (tmp / CARD).write_text(dataset_card(attrs, base_meta, delta_norm_stats(store), zip, arrays))
        write_manifest(tmp, {
            "overfit_key": key,
            "base_key": base_key,
            "task": attrs.get("task"),
            "schema_version": attrs.get("schema_version"),
            "store_schema": attrs.get("store_schema"),
            "store": STORE_ZIP if zip else STORE_DIR,
            "ocd_version": __version__,
        })
        os.chmod(tmp, 0o755)
        if dest.exists():
            dest.rmdir()  # an empty directory: replaced by the package
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


# -- import ------------------------------------------------------------------------------------------


class ImportResult(tuple):
    """``(overfit_key, base_key)``; `created` names the stages newly written, `message` says what happened."""

    def __new__(cls, overfit_key: str, base_key: str, created: tuple[str, ...] = ()) -> ImportResult:
        self = super().__new__(cls, (overfit_key, base_key))
        self.created = tuple(created)
        return self

    @property
    def overfit_key(self) -> str:
        return self[0]

    @property
    def base_key(self) -> str:
        return self[1]

    @property
    def already(self) -> bool:
        return not self.created

    @property
    def message(self) -> str:
        if self.already:
            return f"store {self[0]} and base model {self[1]} are already in the cache; nothing imported"
        return "imported " + " and ".join(
            f"{'store' if s == 'overfit' else 'base model'} {self[0] if s == 'overfit' else self[1]}"
            for s in self.created
        )


def read_manifest(src: Path) -> dict[str, Any]:
    """The package's manifest, after checking its format and schema versions."""
    path = src / MANIFEST
    if not src.is_dir():
        raise OcdError(f"{src} is not a package directory")
    if not path.is_file():
        raise OcdError(f"{src} is not an ocd store package (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OcdError(f"{MANIFEST} of {src} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
        raise OcdError(f"{src}/{MANIFEST} is not an ocd store package manifest")
    if manifest.get("format_version") != PACKAGE_VERSION:
        raise OcdError(
            f"package format version {manifest.get('format_version')} of {src} is not {PACKAGE_VERSION}; "
            "use the ocd version that wrote it"
        )
    if manifest.get("schema_version") != SCHEMA_VERSION or manifest.get("store_schema") != STORE_SCHEMA:
        raise OcdError(
            f"package {src} has schema {manifest.get('schema_version')}/{manifest.get('store_schema')}, "
            f"this ocd reads {SCHEMA_VERSION}/{STORE_SCHEMA}"
        )
    for field in ("overfit_key", "base_key", "store", "files"):
        if field not in manifest:
            raise OcdError(f"{src}/{MANIFEST} lacks {field!r}")
    if manifest["store"] not in (STORE_DIR, STORE_ZIP):
        raise OcdError(f"{src}/{MANIFEST}: unknown store {manifest['store']!r}")
    return manifest


def check_files(src: Path, manifest: dict[str, Any]) -> None:
    """Every file listed, none extra, each with its size and sha256; the error names the bad file(s)."""
    listed = {f["path"]: f for f in manifest["files"]}
    actual = set(_files(src)) - {MANIFEST}
    for label, names in (("missing", sorted(set(listed) - actual)), ("unexpected", sorted(actual - set(listed)))):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            where = "" if label == "missing" else f" (not in {MANIFEST})"
            raise OcdError(f"package {src}: {label} file {names[0]}{where}{more}")
    bad = [
        name
        for name, f in sorted(listed.items())
        if (src / name).stat().st_size != f["size"] or sha256_file(src / name) != f["sha256"]
    ]
    if bad:
        more = ""
        if len(bad) > 1:
            more = f" (and {len(bad) - 1} more: {', '.join(bad[1:4])}{'...' if len(bad) > 4 else ''})"
        raise OcdError(f"package {src}: file {bad[0]} does not match its sha256 in {MANIFEST}{more}; "
                       "the package is damaged or was modified")


def _extract_zip(zip_path: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            name = info.filename
            if info.is_dir():
                continue
            if name.startswith("/") or ".." in Path(name).parts or "\\" in name:
                raise OcdError(f"{zip_path} holds an unsafe member name {name!r}")
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


def import_store(src: Path, cache: Cache) -> ImportResult:
    """Check a package (manifest, schema, every block) and register its base model and store in `cache`."""
    src = Path(src)
    manifest = read_manifest(src)
    check_files(src, manifest)
    key, base_key = manifest["overfit_key"], manifest["base_key"]
    overfit_meta = json.loads((src / "overfit" / META).read_text())
    base_meta = json.loads((src / "base" / META).read_text())
    if overfit_meta.get("key") != key or overfit_meta.get("base_key") != base_key or base_meta.get("key") != base_key:
        raise OcdError(f"package {src}: the keys of {MANIFEST}, overfit/{META} and base/{META} disagree")
    cache.ensure_writable()
    imported_from = {"from": str(src.resolve()), "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    created: list[str] = []

    existing = cache.lookup("base", base_key)
    if existing is not None:
        ours = existing.path / "model.safetensors"
        if not ours.is_file() or sha256_file(ours) != sha256_file(src / "base" / "model.safetensors"):
            raise OcdError(
                f"cache {cache.root} already has base model {base_key} with other weights than the package's; "
                f"remove it (`ocd cache rm base/{base_key}`) to import this store"
            )

    def register_base() -> None:
        if cache.lookup("base", base_key) is not None:
            return
        with cache.lock("base", base_key):
            partial = cache.begin("base", base_key, fresh=True)
            for name in BASE_FILES:
                if name != META and (src / "base" / name).is_file():
                    shutil.copy2(src / "base" / name, partial / name)
            cache.publish("base", base_key, {**base_meta, "imported": imported_from})
        created.append("base")

    if cache.lookup("overfit", key) is None:
        # the store is copied and verified first: a package whose store fails registers nothing
        with cache.lock("overfit", key):
            partial = cache.begin("overfit", key, fresh=True)
            store_path = partial / STORE_DIR
            try:
                if manifest["store"] == STORE_ZIP:
                    _extract_zip(src / STORE_ZIP, store_path)
                else:
                    shutil.copytree(src / STORE_DIR, store_path)
                store = RecordStore.open(str(store_path))
                problems = verify_store(store)
                if not problems and (store.attrs.get("key"), store.attrs.get("base_key")) != (key, base_key):
                    problems = [f"the store's keys {store.attrs.get('key')}/{store.attrs.get('base_key')} "
                                f"are not the manifest's {key}/{base_key}"]
                if problems:
                    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                    raise OcdError(f"package {src}: store fails verification: {problems[0]}{more}")
                register_base()
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            cache.publish("overfit", key, {**overfit_meta, "imported": imported_from})
        created.append("overfit")
    else:
        register_base()
    return ImportResult(key, base_key, tuple(created))


# -- Parquet -----------------------------------------------------------------------------------------


def export_parquet(store_path: str | Path, dest_dir: Path) -> list[Path]:
    """One Parquet file per split, a row group per block, arrays flattened to fixed-size lists.

    Shapes and dtypes go to each file's schema metadata (key ``ocd``) and to ``ocd_fields.json``.
    Every block's checksum is checked on the way; the store is never read whole.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = open_store_path(store_path)
    if not store.complete or any(store.missing_blocks(s) for s in SPLITS):
        raise OcdError(f"store {store_path} is incomplete; finish it with `ocd overfit` first")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    attrs = store.attrs
    fields = {
        name: {"shape": list(store.split(SPLITS[0])[name].shape[1:]), "dtype": str(store.split(SPLITS[0])[name].dtype)}
        for name in RECORD_FIELDS
    }
    info = {
        "fields": fields,
        "flattening": "C order; reshape each row to `shape`",
        **{k: attrs.get(k) for k in ("key", "base_key", "task", "layer", "weight_shape", "schema_version")},
    }
    columns = [pa.field("index", pa.int64())]
    for name, spec in fields.items():
        value = pa.from_numpy_dtype(np.dtype(spec["dtype"]))
        size = math.prod(spec["shape"])
        columns.append(pa.field(name, pa.list_(value, size) if spec["shape"] else value))
    paths = []
    for split in SPLITS:
        schema = pa.schema(columns, metadata={"ocd": json.dumps({**info, "split": split})})
        path = dest_dir / f"{split}.parquet"
        tmp = dest_dir / f".{split}.parquet.tmp-{os.getpid()}"
        checksums = store.read(split, "checksum")
        try:
            with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
                for block, (start, stop) in enumerate(store.blocks(split)):
                    records = store.read_block(split, block)
                    if block_checksum(records) != int(checksums[block]):
                        raise OcdError(f"store {store_path}: {split} block {block} fails its checksum")
                    arrays = [pa.array(np.arange(start, stop, dtype=np.int64))]
                    for name, spec in fields.items():
                        values = np.ascontiguousarray(records[name])
                        if spec["shape"]:
                            flat = pa.array(values.reshape(-1))
                            arrays.append(pa.FixedSizeListArray.from_arrays(flat, math.prod(spec["shape"])))
                        else:
                            arrays.append(pa.array(values))
                    writer.write_table(pa.Table.from_arrays(arrays, schema=schema), row_group_size=stop - start)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        paths.append(path)
    write_json_atomic(dest_dir / "ocd_fields.json", info)
    return paths


# -- cache browsing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EntryInfo:
    """One cache entry, finished or not."""

    stage: str
    key: str
    task: str | None
    size: int
    created: str | None
    complete: bool
    path: Path
    parent: str | None = None  # the key of the entry it was made from (base_key, store_key, train_key)


def _lock_path(cache: Cache, stage: str, key: str) -> Path:
    return cache.root / stage / f"{key}.lock"


def lock_held(path: Path) -> bool:
    """Whether another holder (process or lock object) has the lock file `path`."""
    if not path.exists():
        return False
    lock = filelock.FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return True
    lock.release()
    return False


def list_entries(cache: Cache) -> list[EntryInfo]:
    """Every entry of the pipeline's stages, finished or not, in stage then key order."""
    out = []
    for stage in STAGES:
        stage_dir = cache.root / stage
        if not stage_dir.is_dir():
            continue
        for path in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
            key = path.name.removesuffix(".partial")
            entry = None if path.name.endswith(".partial") else cache.lookup(stage, key)
            meta = entry.meta if entry else {}
            created = meta.get("created")
            if entry is None:
                created = datetime.datetime.fromtimestamp(path.stat().st_mtime).astimezone().strftime(
                    "%Y-%m-%dT%H:%M:%S%z"
                )
            parent_field = PARENTS.get(stage, (None, None))[1]
            out.append(
                EntryInfo(
                    stage=stage,
                    key=key,
                    task=meta.get("task"),
                    size=dir_size(path),
                    created=created,
                    complete=entry is not None,
                    path=path,
                    parent=meta.get(parent_field) if parent_field else None,
                )
            )
    return out


def remove_entry(cache: Cache, key: str) -> list[EntryInfo]:
    """Delete the entry (finished and partial) with this key, unique key prefix or ``stage/key``."""
    stage, full = _unique(cache, key, STAGES)
    removed = [e for e in list_entries(cache) if e.stage == stage and e.key == full]
    with cache.lock(stage, full):
        cache.remove(stage, full)
    _lock_path(cache, stage, full).unlink(missing_ok=True)
    return removed


def garbage(cache: Cache) -> list[Path]:
    """What ``ocd cache gc`` would delete: unfinished entries (not being written), lock files nobody
    holds, and entries whose parent entry is gone (transitively: a train entry of an orphaned store too).

    Note that a ``.partial`` overfit entry is the resumable progress of a killed ``ocd overfit``.
    """
    entries = list_entries(cache)
    found: list[Path] = []
    busy: set[tuple[str, str]] = set()
    for stage in STAGES:
        stage_dir = cache.root / stage
        if stage_dir.is_dir():
            for lock in sorted(stage_dir.glob("*.lock")):
                if lock_held(lock):
                    busy.add((stage, lock.name.removesuffix(".lock")))
                else:
                    found.append(lock)
    alive: set[tuple[str, str]] = set()
    for stage in STAGES:
        for e in (e for e in entries if e.stage == stage):
            if (stage, e.key) in busy:
                continue
            if not e.complete:
                found.append(e.path)
                continue
            parent_stage = PARENTS.get(stage, (None,))[0]
            if parent_stage is None or e.parent is None or (parent_stage, e.parent) in alive:
                alive.add((stage, e.key))
            else:
                found.append(e.path)
    return sorted(found)


def remove_garbage(cache: Cache, paths: list[Path] | None = None) -> list[Path]:
    """Delete `paths` (default: :func:`garbage`); lock files are unlinked only while not held."""
    removed = []
    for path in garbage(cache) if paths is None else paths:
        if path.name.endswith(".lock") and path.is_file():
            lock = filelock.FileLock(str(path))
            try:
                lock.acquire(timeout=0)
            except filelock.Timeout:
                continue
            try:
                path.unlink(missing_ok=True)
            finally:
                lock.release()
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        removed.append(path)
    return removed


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"


def entries_table(entries: list[EntryInfo], title: str = "ocd cache"):
    """A Rich table of cache entries."""
    from rich.table import Table

    table = Table(title=title)
    for name, justify in (("stage", "left"), ("key", "left"), ("task", "left"), ("size", "right"),
                          ("created", "left"), ("status", "left"), ("parent", "left")):
        table.add_column(name, justify=justify, style="bold" if name == "key" else None)
    for e in entries:
        table.add_row(
            e.stage,
            e.key,
            e.task or "",
            human_size(e.size),
            e.created or "",
            "complete" if e.complete else "[yellow]partial[/yellow]",
            e.parent or "",
        )
    return table
