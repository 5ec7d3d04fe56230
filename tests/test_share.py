"""Sharing stores: export/import packages, Parquet, fsspec URLs, and cache browsing (ls/rm/gc)."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from ocd import cli
from ocd.pipeline import share
from ocd.pipeline.cache import Cache
from ocd.pipeline.errors import OcdError
from ocd.pipeline.reader import StoreStream
from ocd.pipeline.store import RECORD_FIELDS, SPLITS, RecordStore
from ocd.pipeline.verify import verify_store

CONFIG = "[base]\nepochs = 2\n\n[overfit]\nblock_size = 128\n"


def ocd(*args) -> dict:
    """``ocd ARGS --json`` in-process (usable from module-scoped fixtures)."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["ocd", *map(str, args), "--json", "--no-progress"])
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            cli.main()
    assert (exit_info.value.code or 0) == 0, out.getvalue()
    return json.loads(out.getvalue())


def overfit(cache_root: Path, config: Path) -> dict:
    return ocd("overfit", "--task", "digits", "--cache-dir", cache_root, "--config", config, "--workers", "0")


def read_all(store: RecordStore) -> dict[str, dict[str, np.ndarray]]:
    return {split: {name: store.read(split, name) for name in RECORD_FIELDS} for split in SPLITS}


def assert_same(a, b) -> None:
    for split in SPLITS:
        for name in RECORD_FIELDS:
            np.testing.assert_array_equal(a[split][name], b[split][name], err_msg=f"{split}/{name}")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A digits store (2-epoch base model, 128-sample blocks) in its own cache."""
    root = tmp_path_factory.mktemp("source")
    config = root / "ocd.toml"
    config.write_text(CONFIG)
    result = overfit(root / "cache", config)
    store = RecordStore.open(result["store"])
    return {
        "cache": Cache(root / "cache"),
        "config": config,
        "key": result["key"],
        "base_key": store.attrs["base_key"],
        "store": Path(result["store"]),
        "arrays": read_all(store),
    }


@pytest.fixture(scope="module")
def packages(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("packages")
    return {
        zipped: share.export_store(source["cache"], source["key"][:6], root / f"pkg-{zipped}", zip=zipped)
        for zipped in (False, True)
    }


def copy_package(packages, zipped: bool, tmp_path: Path) -> Path:
    return Path(shutil.copytree(packages[zipped], tmp_path / "pkg"))


# -- export / import ---------------------------------------------------------------------------------


@pytest.mark.parametrize("zipped", [False, True], ids=["dir", "zip"])
def test_export_import_roundtrip(source, packages, zipped, tmp_path, monkeypatch):
    pkg = packages[zipped]
    store_name = "store.zarr.zip" if zipped else "store.zarr"
    manifest = json.loads((pkg / "MANIFEST.json").read_text())
    paths = [f["path"] for f in manifest["files"]]
    assert paths == sorted(paths) and "MANIFEST.json" not in paths
    assert {"README.md", "base/model.safetensors", "base/meta.json", "base/metrics.json", "overfit/meta.json"} <= set(
        paths
    )
    assert (pkg / store_name).exists() and manifest["store"] == store_name
    assert manifest["overfit_key"] == source["key"] and manifest["base_key"] == source["base_key"]
    assert manifest["format_version"] == share.PACKAGE_VERSION
    assert not list(pkg.parent.glob(".*tmp"))  # no leftover build directory beside the package
    card = (pkg / "README.md").read_text()
    for needle in ("digits", source["base_key"], "(16, 32)", "adam", "train: 1,497", "RecordStore.open", "zarr"):
        assert needle in card, needle

    # the card's code blocks run as written, from the package directory
    monkeypatch.chdir(pkg)
    for block in re.findall(r"```python\n(.*?)```", card, re.S):
        scope: dict = {}
        exec(block, scope)
        assert scope["delta"].shape[1:] == (16, 32)
    monkeypatch.undo()

    cache = Cache(tmp_path / "fresh")
    result = share.import_store(pkg, cache)
    assert tuple(result) == (source["key"], source["base_key"]) and not result.already
    assert cache.lookup("overfit", source["key"]) is not None
    assert cache.lookup("base", source["base_key"]) is not None
    imported = RecordStore.open(str(cache.path("overfit", source["key"]) / "store.zarr"))
    assert_same(read_all(imported), source["arrays"])
    assert imported.attrs == RecordStore.open(str(source["store"])).attrs
    base_src = source["cache"].path("base", source["base_key"]) / "model.safetensors"
    base_dst = cache.path("base", source["base_key"]) / "model.safetensors"
    assert base_dst.read_bytes() == base_src.read_bytes()
    assert not list((tmp_path / "fresh").glob("*/*.partial"))

    again = share.import_store(pkg, cache)
    assert again.already and tuple(again) == tuple(result) and "already" in again.message

    # the pipeline finds both as cache hits: stage one is not recomputed
    hit = overfit(tmp_path / "fresh", source["config"])
    assert hit["cached"] is True and hit["key"] == source["key"]


def test_export_is_deterministic_apart_from_its_manifest(source, packages, tmp_path):
    again = share.export_store(source["cache"], source["store"], tmp_path / "again", zip=True)
    for name in ("store.zarr.zip", "README.md", "base/model.safetensors"):
        assert (again / name).read_bytes() == (packages[True] / name).read_bytes(), name


def test_export_refusals(source, packages, tmp_path):
    with pytest.raises(OcdError, match="already exists"):
        share.export_store(source["cache"], source["key"], packages[False])
    with pytest.raises(OcdError, match="no cache entry matches"):
        share.export_store(source["cache"], "ffffffff", tmp_path / "x")
    # an incomplete store: one block not finished
    root = Path(shutil.copytree(source["cache"].root, tmp_path / "cache"))
    store = RecordStore.open(str(root / "overfit" / source["key"] / "store.zarr"), mode="r+")
    store.split("test")["done"][1] = False
    with pytest.raises(OcdError, match="cannot be exported: test block 1: not finished"):
        share.export_store(Cache(root), source["key"], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    # a .partial entry is not exported either
    entry = root / "overfit" / source["key"]
    entry.rename(entry.with_name(entry.name + ".partial"))
    with pytest.raises(OcdError, match="incomplete"):
        share.export_store(Cache(root), source["key"][:5], tmp_path / "out")


@pytest.mark.parametrize(
    ("zipped", "target"),
    [(False, "store.zarr/train/delta/c/0/0/0"), (False, "README.md"), (False, "base/model.safetensors"),
     (True, "store.zarr.zip")],
)
def test_tampered_package_fails_naming_the_file(packages, zipped, target, tmp_path):
    pkg = copy_package(packages, zipped, tmp_path)
    path = pkg / target
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    cache = Cache(tmp_path / "fresh")
    with pytest.raises(OcdError, match=re.escape(f"file {target} does not match its sha256")):
        share.import_store(pkg, cache)
    assert list(share.list_entries(cache)) == []


def test_missing_and_extra_files_fail(packages, tmp_path):
    pkg = copy_package(packages, False, tmp_path)
    (pkg / "base" / "metrics.json").unlink()
    with pytest.raises(OcdError, match="missing file base/metrics.json"):
        share.import_store(pkg, Cache(tmp_path / "fresh"))
    shutil.copy(packages[False] / "base" / "metrics.json", pkg / "base" / "metrics.json")
    (pkg / "store.zarr" / "notes.txt").write_text("hi")
    with pytest.raises(OcdError, match="unexpected file store.zarr/notes.txt"):
        share.import_store(pkg, Cache(tmp_path / "fresh"))
    (pkg / "store.zarr" / "notes.txt").unlink()
    (pkg / "MANIFEST.json").unlink()
    with pytest.raises(OcdError, match="no MANIFEST.json"):
        share.import_store(pkg, Cache(tmp_path / "fresh"))


def test_schema_version_is_checked(packages, tmp_path):
    pkg = copy_package(packages, True, tmp_path)
    manifest = json.loads((pkg / "MANIFEST.json").read_text())
    (pkg / "MANIFEST.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(OcdError, match="schema 99/1"):
        share.import_store(pkg, Cache(tmp_path / "fresh"))


def test_corrupt_chunk_with_a_matching_manifest_fails_verification(packages, tmp_path):
    """A package re-hashed after damage still fails: every block is checked against its checksum."""
    pkg = copy_package(packages, False, tmp_path)
    chunk = pkg / "store.zarr" / "test" / "delta" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[-5] ^= 0xFF
    chunk.write_bytes(bytes(data))
    info = {k: v for k, v in json.loads((pkg / "MANIFEST.json").read_text()).items()
            if k not in ("format", "format_version", "total_bytes", "files")}
    share.write_manifest(pkg, info)
    cache = Cache(tmp_path / "fresh")
    with pytest.raises(OcdError, match="store fails verification: test block 1"):
        share.import_store(pkg, cache)
    assert share.list_entries(cache) == []  # neither the store nor the base model was registered


def test_import_refuses_a_different_base_model_under_the_same_key(source, packages, tmp_path):
    cache = Cache(tmp_path / "fresh")
    partial = cache.begin("base", source["base_key"])
    (partial / "model.safetensors").write_bytes(b"other weights")
    cache.publish("base", source["base_key"], {"task": "digits"})
    with pytest.raises(OcdError, match="with other weights"):
        share.import_store(packages[False], cache)


# -- Parquet -----------------------------------------------------------------------------------------


def test_parquet_round_trip(source, tmp_path):
    import datasets
    import pyarrow.parquet as pq

    paths = share.export_parquet(source["store"], tmp_path / "parquet")
    assert [p.name for p in paths] == ["train.parquet", "test.parquet"]
    store = RecordStore.open(str(source["store"]))
    fields = json.loads((tmp_path / "parquet" / "ocd_fields.json").read_text())["fields"]
    assert fields["delta"] == {"shape": [16, 32], "dtype": "float32"}
    for split, path in zip(SPLITS, paths, strict=True):
        meta = pq.ParquetFile(path).metadata
        assert meta.num_row_groups == len(store.blocks(split)) and meta.num_rows == store.size(split)
        schema_info = json.loads(pq.read_schema(path).metadata[b"ocd"])
        assert schema_info["fields"] == fields and schema_info["split"] == split
    loaded = datasets.load_dataset(
        "parquet", data_files={s: str(p) for s, p in zip(SPLITS, paths, strict=True)}, cache_dir=str(tmp_path / "hf")
    ).with_format("numpy")
    for split in SPLITS:
        n = store.size(split)
        np.testing.assert_array_equal(loaded[split]["index"], np.arange(n))
        for name in RECORD_FIELDS:
            values = np.asarray(loaded[split][name]).reshape(n, *fields[name]["shape"])
            assert values.dtype == np.dtype(fields[name]["dtype"]), name
            np.testing.assert_array_equal(values, source["arrays"][split][name], err_msg=f"{split}/{name}")


def test_parquet_from_a_zipped_package(packages, source, tmp_path):
    import pyarrow.parquet as pq

    paths = share.export_parquet(packages[True] / "store.zarr.zip", tmp_path)
    table = pq.read_table(paths[1])
    np.testing.assert_array_equal(table["label"].to_numpy(), source["arrays"]["test"]["label"])


# -- remote (fsspec) reading -------------------------------------------------------------------------


@pytest.fixture
def memory_url(source):
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/ocd-test-{uuid.uuid4().hex[:8]}"
    fs.put(str(source["store"]), f"{root}/store.zarr", recursive=True)
    yield f"memory://{root}/store.zarr"
    fs.rm(root, recursive=True)


def test_record_store_opens_fsspec_urls(source, packages, memory_url):
    local = RecordStore.open(str(source["store"]))
    for url in (memory_url, source["store"].resolve().as_uri(), f"zip::{packages[True] / 'store.zarr.zip'}"):
        remote = RecordStore.open(url)
        assert remote.attrs["key"] == source["key"] and remote.complete
        for split in SPLITS:
            for block in (0, len(local.blocks(split)) - 1):
                got, want = remote.read_block(split, block), local.read_block(split, block)
                for name in RECORD_FIELDS:
                    np.testing.assert_array_equal(got[name], want[name], err_msg=f"{url} {split}/{name}")
    assert verify_store(RecordStore.open(memory_url)) == []


def test_store_stream_reads_from_a_url(source, memory_url):
    fields = ("delta", "label")
    stream = StoreStream(memory_url, "test", fields, shuffle=False)
    assert len(stream) == 300
    records = list(stream)
    np.testing.assert_array_equal(np.stack([r["delta"].numpy() for r in records]), source["arrays"]["test"]["delta"])
    shuffled = StoreStream(memory_url, "test", fields, shuffle=True, buffer_size=64, seed=1)
    labels = sorted(int(r["label"]) for r in shuffled)
    assert labels == sorted(source["arrays"]["test"]["label"].tolist())


# -- cache ls / rm / gc ------------------------------------------------------------------------------


def fake_entry(cache: Cache, stage: str, key: str, **meta) -> None:
    (cache.begin(stage, key) / "x.bin").write_bytes(b"0" * 10)
    cache.publish(stage, key, {"task": "digits", **meta})


def test_cache_ls_rm_gc(source, tmp_path):
    from rich.console import Console

    root = Path(shutil.copytree(source["cache"].root, tmp_path / "cache"))
    cache = Cache(root)
    (root / "raw" / "mnist").mkdir(parents=True)  # dataset downloads are not entries
    key, base_key = source["key"], source["base_key"]

    entries = share.list_entries(cache)
    assert [(e.stage, e.key, e.complete, e.task) for e in entries] == [
        ("base", base_key, True, "digits"), ("overfit", key, True, "digits")
    ]
    assert entries[1].parent == base_key and entries[1].size > 1_000_000 and entries[1].created
    # only the stale lock files of the finished runs are garbage
    assert share.garbage(cache) == sorted([root / "base" / f"{base_key}.lock", root / "overfit" / f"{key}.lock"])

    fake_entry(cache, "train", "aaaa000000000001", store_key=key)
    fake_entry(cache, "train", "aaaa000000000002", store_key="0000000000000000")  # orphan
    fake_entry(cache, "evaluate", "bbbb000000000001", train_key="aaaa000000000002")  # orphan's child
    cache.begin("train", "cccc000000000001")  # killed run
    cache.begin("train", "dddd000000000001")  # running now (lock held)
    with cache.lock("train", "dddd000000000001"):
        listed = {(e.stage, e.key): e for e in share.list_entries(cache)}
        assert not listed[("train", "cccc000000000001")].complete
        assert listed[("train", "aaaa000000000001")].complete
        found = share.garbage(cache)
        assert root / "train" / "cccc000000000001.partial" in found
        assert root / "train" / "aaaa000000000002" in found and root / "evaluate" / "bbbb000000000001" in found
        assert root / "train" / "aaaa000000000001" not in found
        assert not any("dddd" in p.name for p in found)
        assert root / "base" / base_key not in found and root / "overfit" / key not in found
        console = Console(record=True, width=200)
        console.print(share.entries_table(share.list_entries(cache)))
        text = console.export_text()
        assert key in text and "partial" in text and "MiB" in text
        removed = share.remove_garbage(cache)
        assert sorted(removed) == sorted(found)
    assert {(e.stage, e.key) for e in share.list_entries(cache)} == {
        ("base", base_key), ("overfit", key), ("train", "aaaa000000000001"), ("train", "dddd000000000001")
    }

    fake_entry(cache, "train", "aaaa000000000003", store_key=key)
    with pytest.raises(OcdError, match="ambiguous"):
        share.remove_entry(cache, "aaaa")
    with pytest.raises(OcdError, match="no cache entry matches"):
        share.remove_entry(cache, "ffff")
    with cache.lock("train", "aaaa000000000003"), pytest.raises(OcdError, match="lock held"):
        share.remove_entry(cache, "train/aaaa000000000003")
    removed = share.remove_entry(cache, "dddd")  # a partial entry, by prefix
    assert [(e.stage, e.key, e.complete) for e in removed] == [("train", "dddd000000000001", False)]
    share.remove_entry(cache, base_key[:6])
    assert cache.lookup("base", base_key) is None
    # the store, and the train entries made from it, lost their base model
    assert set(share.garbage(cache)) >= {
        root / "overfit" / key, root / "train" / "aaaa000000000001", root / "train" / "aaaa000000000003"
    }
    share.remove_garbage(cache)
    assert share.list_entries(cache) == [] and share.garbage(cache) == []
    assert (root / "raw" / "mnist").is_dir()


def test_imported_store_trains_and_evaluates_to_the_same_results(tmp_path):
    """The acceptance path: export, import into a fresh cache, `ocd train` + `ocd evaluate` there."""
    import os
    import subprocess

    from tests_support import ocd_command

    config = tmp_path / "tiny.toml"
    config.write_text("[train]\nprofile = 'tiny'\nepochs = 1\nbatch_size = 64\n"
                      "[evaluate]\nensemble = 2\nbootstrap = 50\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def ocd(*args):
        extra = ("--no-progress",) if args[0] in ("train", "evaluate") else ()
        proc = subprocess.run(ocd_command(*args, "--json", *extra), capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else proc.stdout

    original, received = tmp_path / "original", tmp_path / "received"
    common = ("--task", "digits", "--config", config, "--workers", "0")
    first = ocd("evaluate", *common, "--cache-dir", original)
    store_key = next((original / "overfit").glob("*/store.zarr")).parent.name
    ocd("store", "export", store_key, tmp_path / "package", "--cache-dir", original)
    ocd("store", "import", tmp_path / "package", "--cache-dir", received)
    trained = ocd("train", *common, "--cache-dir", received)
    second = ocd("evaluate", *common, "--cache-dir", received)
    assert not (received / "base" / "raw").exists()
    assert trained["cached"] is False and second["key"] == first["key"]
    assert second["metrics"] == first["metrics"]
    tampered = tmp_path / "package" / "base" / "model.safetensors"
    tampered.write_bytes(tampered.read_bytes()[:-1] + b"\x00")
    proc = subprocess.run(ocd_command("store", "import", tmp_path / "package", "--cache-dir", tmp_path / "third"),
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "base/model.safetensors" in proc.stderr
