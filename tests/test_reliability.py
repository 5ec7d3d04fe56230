"""Fault injection: killed runs, lost workers, corrupt stores, mismatches, bad input, no pickle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr
from tests_support import ocd_command, start_dask_cluster, stop_processes, wait_for

from ocd.pipeline.cache import Cache
from ocd.pipeline.store import RECORD_FIELDS, SPLITS, RecordStore


def cli_json(run_cli, *args):
    result = run_cli(*args, "--json", "--no-progress")
    assert result.code == 0, result.err
    return result.json()


def store_arrays(path) -> dict:
    store = RecordStore.open(str(path))
    return {(s, n): store.read(s, n) for s in SPLITS for n in RECORD_FIELDS}


def partial_store(cache_dir: Path) -> Path | None:
    found = list((cache_dir / "overfit").glob("*.partial/store.zarr"))
    return found[0] if found else None


def done_blocks(path: Path) -> int:
    store = RecordStore.open(str(path))
    return sum(int(store.done_mask(s).sum()) for s in SPLITS)


def finish_and_compare_with_a_clean_rerun(run_cli, cache, report) -> None:
    """The finished store must equal a fresh, uninterrupted in-process run on the same base model."""
    finished = store_arrays(report["store"])
    rerun = cli_json(
        run_cli, "overfit", "--task", "digits", "--cache-dir", cache, "--workers", "0", "--block-size", "64", "--force"
    )
    assert rerun["key"] == report["key"] and rerun["cached"] is False
    clean = store_arrays(rerun["store"])
    for name in clean:
        np.testing.assert_array_equal(finished[name], clean[name], err_msg=str(name))


def test_killed_overfit_resumes_and_matches_an_uninterrupted_run(run_cli, tmp_path):
    cache = tmp_path / "cache"
    cli_json(run_cli, "base", "--task", "digits", "--cache-dir", cache)
    proc = subprocess.Popen(
        ocd_command(
            "overfit", "--task", "digits", "--cache-dir", cache, "--workers", "0", "--block-size", "64", "--no-progress"
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert wait_for(lambda: partial_store(cache) and done_blocks(partial_store(cache)) >= 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = RecordStore.open(str(partial_store(cache)))
    kept, total = done_blocks(partial_store(cache)), sum(len(store.blocks(s)) for s in SPLITS)
    assert 3 <= kept < total, "the run must be killed part-way"
    resumed = run_cli(
        "overfit",
        "--task",
        "digits",
        "--cache-dir",
        cache,
        "--workers",
        "0",
        "--block-size",
        "64",
        "--json",
        "--no-progress",
    )
    assert resumed.code == 0, resumed.err
    assert f"{kept} finished blocks kept" in resumed.err
    finish_and_compare_with_a_clean_rerun(run_cli, cache, resumed.json())


@pytest.fixture
def nanny_free_cluster(tmp_path):
    """A real scheduler and two workers without nannies, so a killed worker stays dead."""
    address, scheduler, workers = start_dask_cluster(tmp_path, nanny=False)
    try:
        yield address, workers
    finally:
        stop_processes(*workers, scheduler)


def test_a_killed_dask_worker_does_not_lose_the_run(run_cli, tmp_path, nanny_free_cluster):
    address, workers = nanny_free_cluster
    cache = tmp_path / "cache"
    cli_json(run_cli, "base", "--task", "digits", "--cache-dir", cache)
    proc = subprocess.Popen(
        ocd_command(
            "overfit",
            "--task",
            "digits",
            "--cache-dir",
            cache,
            "--scheduler",
            address,
            "--block-size",
            "64",
            "--json",
            "--no-progress",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert wait_for(lambda: partial_store(cache) and done_blocks(partial_store(cache)) >= 2)
    workers[0].send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert workers[0].wait(timeout=10) == -signal.SIGKILL
    finish_and_compare_with_a_clean_rerun(run_cli, cache, json.loads(out))


TRAIN_CONFIG = "[train]\nprofile = 'tiny'\nepochs = 2\ncheckpoint_every = 10\nbatch_size = 32\n"


def run_ocd(*args, env=None) -> tuple[dict, str]:
    """Run the CLI in a subprocess with --json; returns (report, stderr)."""
    proc = subprocess.run(ocd_command(*args, "--json", "--no-progress"), capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def test_killed_training_resumes_from_its_checkpoint(run_cli, tmp_path):
    from safetensors.numpy import load_file

    config = tmp_path / "train.toml"
    config.write_text(TRAIN_CONFIG)
    cache = tmp_path / "cache"
    args = ("train", "--task", "digits", "--config", config, "--workers", "0", "--cache-dir", cache)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # every run with the same torch thread count
    cli_json(run_cli, "overfit", "--task", "digits", "--cache-dir", cache, "--workers", "0")
    proc = subprocess.Popen(ocd_command(*args, "--no-progress"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint_state = lambda: next((cache / "train").glob("*.partial/checkpoint/state.json"))  # noqa: E731
    assert wait_for(lambda: json.loads(checkpoint_state().read_text())["state"]["step"] >= 20, timeout=300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads(checkpoint_state().read_text())["state"]["step"]
    report, err = run_ocd(*args, env=env)
    assert f"resuming training at step {step}" in err
    resumed_weights = load_file(str(Path(report["path"]) / "denoiser.safetensors"))
    clean, _ = run_ocd(*args, "--force", env=env)
    assert clean["key"] == report["key"] and clean["steps"] == report["steps"] and clean["cached"] is False
    clean_weights = load_file(str(Path(clean["path"]) / "denoiser.safetensors"))
    assert resumed_weights.keys() == clean_weights.keys()
    for name in clean_weights:
        np.testing.assert_array_equal(resumed_weights[name], clean_weights[name], err_msg=name)


@pytest.fixture
def digits_store(run_cli, tmp_path):
    report = cli_json(run_cli, "overfit", "--task", "digits", "--cache-dir", tmp_path / "cache", "--workers", "0")
    return tmp_path / "cache", Path(report["store"])


def test_verify_passes_a_sound_store(run_cli, digits_store):
    _, store = digits_store
    result = run_cli("store", "verify", store)
    assert result.code == 0 and result.out.startswith("ok:")


def test_verify_names_a_corrupted_chunk_and_train_refuses(run_cli, digits_store):
    cache, store = digits_store
    chunk = store / "train" / "delta" / "c" / "2" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    result = run_cli("store", "verify", store)
    assert result.code == 1 and "train block 2" in result.err
    train = run_cli("train", "--task", "digits", "--cache-dir", cache, "--workers", "0", "--no-progress")
    assert train.code == 1 and "cannot be used for training: train block 2" in train.err


def test_verify_names_a_missing_chunk(run_cli, digits_store):
    _, store = digits_store
    (store / "test" / "act_in" / "c" / "1" / "0").unlink()
    result = run_cli("store", "verify", store, "--json")
    assert result.code == 1
    assert any("test block 1" in p for p in result.json()["problems"])


def test_verify_flags_an_unfinished_block(run_cli, digits_store):
    _, store = digits_store
    zarr.open_array(str(store / "train" / "done"), mode="r+")[0] = False
    result = run_cli("store", "verify", store)
    assert result.code == 1 and "train block 0: not finished" in result.err


def test_a_store_from_another_task_is_never_reused(run_cli, digits_store):
    cache, store = digits_store
    zarr.open_group(str(store), mode="r+").attrs["layer"] = "0"
    result = run_cli("overfit", "--task", "digits", "--cache-dir", cache, "--workers", "0", "--no-progress")
    assert result.code == 1 and "refusing to reuse it" in result.err


BAD_TASKS = textwrap.dedent(
    """
    import datasets, numpy as np
    from torch import nn
    from ocd.tasks.base import Task, make_split
    from ocd.pipeline.metrics import regression_metrics, squared_error

    def _data(x):
        y = np.zeros(len(x), dtype="float32")
        return lambda cache: datasets.DatasetDict(train=make_split(x, y), test=make_split(x, y))

    def _task(x, model=None):
        model = model or (lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1)))
        return Task(name="bad", load_data=_data(x), build_model=model, layer="0", loss=squared_error,
                    metrics=regression_metrics)

    def nan_inputs():
        x = np.ones((8, 4), dtype="float32"); x[3, 2] = np.inf
        return _task(x)

    def wrong_shape():
        return _task(np.ones((8, 5), dtype="float32"))
    """
)


def test_bad_input_is_one_line_and_writes_nothing(run_cli, tmp_path):
    tasks = tmp_path / "bad_tasks.py"
    tasks.write_text(BAD_TASKS)
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("[overfit]\nsteps = 'three'\n")
    unknown_key = tmp_path / "unknown.toml"
    unknown_key.write_text("[train]\nlearning_rate = 1.0\n")
    cache = tmp_path / "cache"
    cases = {
        "unknown task": ("overfit", "--task", "nope"),
        "unknown task file": ("overfit", "--task", f"{tmp_path}/missing.py:task"),
        "unknown layer": ("overfit", "--task", "digits", "--layer", "fc9"),
        "unsupported layer": ("overfit", "--task", "digits", "--layer", "1"),
        "non-finite data": ("overfit", "--task", f"{tasks}:nan_inputs"),
        "wrong input shape": ("overfit", "--task", f"{tasks}:wrong_shape"),
        "wrong config type": ("overfit", "--task", "digits", "--config", bad_config),
        "unknown config key": ("train", "--task", "digits", "--config", unknown_key),
        "bad option value": ("overfit", "--task", "digits", "--workers", "-3"),
    }
    for name, args in cases.items():
        result = (
            run_cli(*args, "--cache-dir", cache, "--workers", "0", "--no-progress")
            if "--workers" not in args
            else run_cli(*args, "--cache-dir", cache, "--no-progress")
        )
        lines = result.err.strip().splitlines()
        assert result.code != 0, name
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, result.err)
    written = [p for p in cache.rglob("*") if p.is_file() and "raw" not in p.parts and p.suffix != ".lock"]
    assert written == [], written


def test_unwritable_cache_directory(run_cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_cli("overfit", "--task", "digits", "--cache-dir", blocker / "sub", "--no-progress")
    assert result.code == 1 and "not writable" in result.err


def test_a_second_writer_of_the_same_store_is_refused(run_cli, tmp_path):
    cache = tmp_path / "cache"
    report = cli_json(run_cli, "overfit", "--task", "digits", "--cache-dir", cache, "--workers", "0")
    with Cache(cache).lock("overfit", report["key"]):
        result = run_cli(
            "overfit", "--task", "digits", "--cache-dir", cache, "--workers", "0", "--force", "--no-progress"
        )
    assert result.code == 1 and "lock held" in result.err


PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def test_no_pickle_anywhere_in_stores_or_checkpoints(run_cli, tmp_path):
    config = tmp_path / "train.toml"
    config.write_text(TRAIN_CONFIG.replace("epochs = 2", "epochs = 1"))
    cache = tmp_path / "cache"
    cli_json(
        run_cli,
        "evaluate",
        "--task",
        "digits",
        "--cache-dir",
        cache,
        "--config",
        config,
        "--workers",
        "0",
        "--ensemble",
        "2",
        "--bootstrap",
        "50",
    )
    files = [p for p in cache.rglob("*") if p.is_file() and "raw" not in p.parts]
    assert any(p.suffix == ".safetensors" for p in files)
    for path in files:
        head = path.read_bytes()[:2]
        assert head not in PICKLE_MAGIC, path
        assert path.suffix not in {".pkl", ".pt", ".pth", ".pickle"}, path
    for npz in cache.rglob("*.npz"):
        with np.load(npz, allow_pickle=False) as data:
            assert data.files
