"""Stage zero through the CLI: training, caching, errors."""
from __future__ import annotations


def test_base_on_digits_trains_and_caches(run_cli, cache_dir):
    first = run_cli("base", "--task", "digits", "--cache-dir", cache_dir, "--json", "--no-progress")
    assert first.code == 0, first.err
    report = first.json()
    assert report["cached"] is False
    assert report["metrics"]["test"]["accuracy"] > 0.9
    assert report["metrics"]["test"]["loss"] < 0.5
    second = run_cli("base", "--task", "digits", "--cache-dir", cache_dir, "--json", "--no-progress")
    assert second.code == 0 and second.json()["cached"] is True
    assert second.json()["key"] == report["key"]
    changed = run_cli("base", "--task", "digits", "--cache-dir", cache_dir, "--json", "--no-progress", "--epochs", "2")
    assert changed.json()["key"] != report["key"] and changed.json()["cached"] is False
    forced = run_cli("base", "--task", "digits", "--cache-dir", cache_dir, "--json", "--no-progress", "--force")
    assert forced.json()["cached"] is False and forced.json()["key"] == report["key"]


def test_user_task_file_runs_through_cli(run_cli, cache_dir, tmp_path):
    from tests_support import write_user_task

    path = write_user_task(tmp_path)
    result = run_cli("base", "--task", f"{path}:my_task", "--cache-dir", cache_dir, "--json", "--no-progress")
    assert result.code == 0, result.err
    assert result.json()["metrics"]["test"]["rmse"] < 1.0


def test_cli_errors_are_one_line(run_cli, cache_dir, tmp_path):
    cases = [
        ("base", "--task", "nope"),
        ("base", "--epochs", "x"),
        ("base", "--epochs", "0"),
        ("base", "--task", "digits", "--config", tmp_path / "missing.toml"),
        ("base", "--device", "warp-drive"),
    ]
    unreadable = tmp_path / "bad.toml"
    unreadable.write_text("[base]\nepochs = 'ten'\n")
    cases.append(("base", "--task", "digits", "--config", unreadable))
    for args in cases:
        result = run_cli(*args, "--cache-dir", cache_dir)
        assert result.code != 0, args
        lines = result.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.err)
        assert "Traceback" not in result.err
    assert not (cache_dir / "base").exists()


def test_unwritable_cache_dir(run_cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_cli("base", "--task", "digits", "--cache-dir", blocker / "cache")
    assert result.code == 1 and "not writable" in result.err


def test_help_explains_itself(run_cli):
    top = run_cli("--help")
    assert top.code == 0 and "base" in top.out
    base = run_cli("base", "--help")
    assert base.code == 0 and "--task" in base.out and "--cache-dir" in base.out
