"""Configs, cache keys and the cache directory."""
from __future__ import annotations

import dataclasses

import pytest

from ocd.pipeline.cache import Cache
from ocd.pipeline.config import BaseConfig, OverfitConfig, build_config, key_fields, read_config_file
from ocd.pipeline.errors import OcdError
from ocd.pipeline.fingerprint import cache_key


def test_same_inputs_same_key_and_every_field_matters():
    cfg = BaseConfig()
    parts = dict(task="digits", data="abc", config=key_fields(cfg))
    assert cache_key("base", **parts) == cache_key("base", **parts)
    seen = {cache_key("base", **parts)}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        changed = dataclasses.replace(cfg, **{f.name: value + 1})
        seen.add(cache_key("base", **{**parts, "config": key_fields(changed)}))
    seen.add(cache_key("base", **{**parts, "task": "mnist"}))
    seen.add(cache_key("base", **{**parts, "data": "abd"}))
    seen.add(cache_key("overfit", **parts))
    assert len(seen) == len(dataclasses.fields(cfg)) + 4


def test_runtime_fields_stay_out_of_keys():
    a, b = OverfitConfig(block_size=64), OverfitConfig(block_size=512)
    assert key_fields(a) == key_fields(b)
    assert key_fields(OverfitConfig(steps=3)) != key_fields(OverfitConfig(steps=4))


def test_build_config_layers_and_errors():
    cfg = build_config(BaseConfig, {"epochs": 3}, {"lr": 1}, {"epochs": 5, "seed": None})
    assert cfg.epochs == 5 and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    with pytest.raises(OcdError, match="unknown BaseConfig field 'epoch'"):
        build_config(BaseConfig, {"epoch": 3})
    with pytest.raises(OcdError, match="expected int"):
        build_config(BaseConfig, {"epochs": "three"})
    with pytest.raises(OcdError, match="expected int"):
        build_config(BaseConfig, {"epochs": True})


def test_config_file(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text("[base]\nepochs = 2\n[overfit]\nsteps = 5\n")
    assert read_config_file(good)["overfit"]["steps"] == 5
    bad_table = tmp_path / "bad.toml"
    bad_table.write_text("[bse]\nepochs = 2\n")
    with pytest.raises(OcdError, match=r"unknown table \[bse\]"):
        read_config_file(bad_table)
    broken = tmp_path / "broken.toml"
    broken.write_text("[base\n")
    with pytest.raises(OcdError, match="not valid TOML"):
        read_config_file(broken)


def test_publish_is_atomic_and_lock_refuses(tmp_path):
    cache = Cache(tmp_path)
    partial = cache.begin("base", "k1")
    (partial / "x.txt").write_text("1")
    assert cache.lookup("base", "k1") is None  # unfinished work is invisible
    entry = cache.publish("base", "k1", {"task": "t"})
    assert entry.path == tmp_path / "base" / "k1" and (entry.path / "x.txt").read_text() == "1"
    assert cache.lookup("base", "k1").meta["task"] == "t"
    with cache.lock("base", "k1"):
        other = Cache(tmp_path)
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ctx.Pool(1) as pool:
            message = pool.apply(_try_lock, (str(tmp_path),))
        assert "lock held" in message
        del other


def _try_lock(root: str) -> str:
    try:
        with Cache(root).lock("base", "k1"):
            return "acquired"
    except OcdError as exc:
        return str(exc)


def test_train_key_follows_the_denoiser_architecture(monkeypatch):
    import dataclasses

    from ocd import diffusion
    from ocd.pipeline.config import TrainConfig
    from ocd.stages import train

    cfg = TrainConfig(profile="quick")
    before = train.train_key("store", cfg)
    assert train.train_key("store", cfg) == before
    assert train.train_key("store", TrainConfig(profile="tiny")) != before
    patched = dict(diffusion.PROFILES, quick=dataclasses.replace(diffusion.PROFILES["quick"], channels=48))
    monkeypatch.setattr(train, "PROFILES", patched)
    assert train.train_key("store", cfg) != before
