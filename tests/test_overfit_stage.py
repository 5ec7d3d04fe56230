"""Stage one end to end: coverage, caching, determinism across workers, Dask schedulers, user tasks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests_support import start_dask_cluster, stop_processes, write_user_task

from ocd.pipeline.store import RECORD_FIELDS, SPLITS, RecordStore


def overfit(run_cli, cache_dir, *extra):
    result = run_cli("overfit", "--task", "digits", "--cache-dir", cache_dir, "--json", "--no-progress", *extra)
    assert result.code == 0, result.err
    return result.json()


def read_all(path: str) -> dict[str, dict[str, np.ndarray]]:
    store = RecordStore.open(path)
    return {split: {name: store.read(split, name) for name in RECORD_FIELDS} for split in SPLITS}


def assert_same_arrays(a, b, exact=True):
    for split in SPLITS:
        for name in RECORD_FIELDS:
            if exact:
                np.testing.assert_array_equal(a[split][name], b[split][name], err_msg=f"{split}/{name}")
            else:
                np.testing.assert_allclose(
                    a[split][name], b[split][name], rtol=1e-5, atol=1e-7, err_msg=f"{split}/{name}"
                )


def test_overfit_covers_every_sample_and_caches(run_cli, cache_dir):
    first = overfit(run_cli, cache_dir, "--workers", "0")
    assert first["cached"] is False and first["samples"] == 1797
    store = RecordStore.open(first["store"])
    assert store.complete and store.size("train") == 1497 and store.size("test") == 300
    for split in SPLITS:
        assert store.done_mask(split).all()
        before, after = store.read(split, "loss_before"), store.read(split, "loss_after")
        assert (after < before).mean() >= 0.99
    attrs = store.attrs
    for field in (
        "schema_version",
        "task",
        "base_key",
        "layer",
        "weight_shape",
        "optimizer",
        "data_fingerprint",
        "sizes",
        "ocd_version",
        "created",
        "stats",
    ):
        assert field in attrs, field
    assert attrs["layer"] == "2" and attrs["weight_shape"] == [16, 32]
    assert store.read("train", "delta").shape == (1497, 16, 32)
    assert attrs["stats"]["train"]["delta"]["std"] > 0
    assert (Path(first["store"]) / "zarr.json").is_file()
    assert json.loads((Path(first["store"]) / "zarr.json").read_text()).get("consolidated_metadata")
    second = overfit(run_cli, cache_dir, "--workers", "0")
    assert second["cached"] is True and second["key"] == first["key"]
    changed = overfit(run_cli, cache_dir, "--workers", "0", "--steps", "2")
    assert changed["key"] != first["key"]


def test_contents_do_not_depend_on_workers_or_block_size(run_cli, tmp_path):
    one = overfit(run_cli, tmp_path / "a", "--workers", "1", "--block-size", "128")
    two = overfit(run_cli, tmp_path / "b", "--workers", "2", "--block-size", "128")
    inproc = overfit(run_cli, tmp_path / "c", "--workers", "0", "--block-size", "320")
    assert one["key"] == two["key"] == inproc["key"]
    a, b, c = read_all(one["store"]), read_all(two["store"]), read_all(inproc["store"])
    assert_same_arrays(a, b, exact=True)
    assert_same_arrays(a, c, exact=True)


def test_block_size_must_fit_the_micro_batch(run_cli, cache_dir):
    result = run_cli("overfit", "--task", "digits", "--cache-dir", cache_dir, "--block-size", "100", "--no-progress")
    assert result.code == 1 and "multiple of 64" in result.err


def test_user_task_file_with_its_own_model(run_cli, cache_dir, tmp_path):
    path = write_user_task(tmp_path)
    result = run_cli(
        "overfit", "--task", f"{path}:my_task", "--cache-dir", cache_dir, "--json", "--no-progress", "--workers", "1"
    )
    assert result.code == 0, result.err
    store = RecordStore.open(result.json()["store"])
    assert store.attrs["layer"] == "body.0" and store.read("train", "delta").shape == (120, 8, 5)
    assert store.read("test", "act_in").shape == (40, 5)


@pytest.fixture
def dask_cluster(tmp_path):
    """A real `dask scheduler` and two `dask worker` processes on loopback."""
    address, scheduler, workers = start_dask_cluster(tmp_path)
    try:
        yield address
    finally:
        stop_processes(*workers, scheduler)


def test_runs_on_a_real_dask_scheduler(run_cli, tmp_path, dask_cluster):
    remote = overfit(run_cli, tmp_path / "remote", "--scheduler", dask_cluster, "--block-size", "256")
    local = overfit(run_cli, tmp_path / "local", "--workers", "0", "--block-size", "256")
    assert remote["key"] == local["key"]
    assert_same_arrays(read_all(remote["store"]), read_all(local["store"]), exact=True)
    assert RecordStore.open(remote["store"]).complete


def test_unreachable_scheduler_is_one_line(run_cli, cache_dir):
    result = run_cli(
        "overfit", "--task", "digits", "--cache-dir", cache_dir, "--scheduler", "tcp://127.0.0.1:9", "--no-progress"
    )
    assert result.code == 1 and result.err.startswith("error: cannot reach Dask scheduler")
