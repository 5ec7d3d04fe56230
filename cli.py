"""The ``ocd`` command line: one command per stage, plus store and cache management.

Conventions shared by every stage command: ``--task``, ``--config FILE`` (TOML, a table per
stage) with command-line overrides on top, ``--cache-dir``, ``--json`` (one JSON object on
stdout), ``--force``; progress bars go to stderr; bad input is one ``error:`` line on stderr.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .pipeline.errors import OcdError

app = typer.Typer(
    name="ocd",
    help="OCD: learn to overfit with conditional diffusion models. A cached, two-stage data pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

TaskOpt = Annotated[str, typer.Option("--task", "-t", help="Task name (see `ocd tasks`) or path/to/file.py:function.")]
CONFIG_HELP = "TOML file with \\[select], \\[base], \\[overfit], \\[train], \\[evaluate] tables."
ConfigOpt = Annotated[Path | None, typer.Option("--config", help=CONFIG_HELP)]
CacheOpt = Annotated[Path, typer.Option("--cache-dir", help="Cache root.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="torch device: cpu, cuda, cuda:1, mps or auto.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Recompute this stage even if it is cached.")]
NoProgressOpt = Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")]


def _context(task: str, cache_dir: Path, device: str, no_progress: bool):
    from .pipeline.cache import Cache
    from .pipeline.context import Context, resolve_device

    ctx = Context(task, Cache(cache_dir), resolve_device(device), show_progress=not no_progress)
    _ = ctx.task  # fail early on an unknown task
    return ctx


def _configs(ctx, config: Path | None, **overrides: dict[str, Any]):
    """Stage configs from defaults < task defaults < file < command-line overrides."""
    from .pipeline.config import STAGE_CONFIGS, build_config, read_config_file

    file_tables = read_config_file(config)
    return {
        stage: build_config(cls, ctx.task.defaults.get(stage), file_tables.get(stage), overrides.get(stage))
        for stage, cls in STAGE_CONFIGS.items()
    }


def _positive(name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise OcdError(f"{name} must be positive, got {value}")


@app.command("tasks")
def tasks_command(as_json: JsonOpt = False) -> None:
    """List the registered tasks."""
    import json

    from .tasks import REGISTRY, task_names

    if as_json:
        print(json.dumps({name: REGISTRY[name] for name in task_names()}))
        return
    for name in task_names():
        print(f"{name:28s} {REGISTRY[name]}")


@app.command("base")
def base_command(
    task: TaskOpt = "mnist",
    config: ConfigOpt = None,
    cache_dir: CacheOpt = Path("data"),
    device: DeviceOpt = "cpu",
    epochs: Annotated[int | None, typer.Option(help="Training epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Minibatch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    no_progress: NoProgressOpt = False,
) -> None:
    """Stage zero: train the base model (cached by task, data, model and config)."""
    from .pipeline.report import emit

    for name, value in (("--epochs", epochs), ("--batch-size", batch_size), ("--lr", lr)):
        _positive(name, value)
    ctx = _context(task, cache_dir, device, no_progress)
    cfgs = _configs(ctx, config, base={"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed})
    ctx.cache.ensure_writable()
    emit(_stage_base(ctx, cfgs, force), as_json)


WorkersOpt = Annotated[
    int | None, typer.Option("--workers", help="Local Dask worker processes (default: one per core; 0 = in-process).")
]
ThreadsOpt = Annotated[int, typer.Option("--threads-per-worker", help="Threads (and torch threads) per worker.")]
SchedulerOpt = Annotated[
    str | None, typer.Option("--scheduler", help="Address of an existing Dask scheduler (e.g. tcp://host:8786).")
]


@app.command("overfit")
def overfit_command(
    task: TaskOpt = "mnist",
    config: ConfigOpt = None,
    cache_dir: CacheOpt = Path("data"),
    device: DeviceOpt = "cpu",
    steps: Annotated[int | None, typer.Option(help="Adam steps per sample.")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate.")] = None,
    layer: Annotated[str | None, typer.Option(help="Layer to overfit (default: the task's).")] = None,
    block_size: Annotated[int | None, typer.Option(help="Samples per block (Dask task and Zarr chunk).")] = None,
    codec: Annotated[str | None, typer.Option(help="Store compression: none, blosc-lz4, zstd.")] = None,
    workers: WorkersOpt = None,
    threads_per_worker: ThreadsOpt = 1,
    scheduler: SchedulerOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    no_progress: NoProgressOpt = False,
) -> None:
    """Stage one: overfit the layer on every train and test sample into a Zarr record store."""
    from .pipeline.report import emit

    for name, value in (("--steps", steps), ("--lr", lr), ("--block-size", block_size)):
        _positive(name, value)
    if workers is not None and workers < 0:
        raise OcdError(f"--workers must be >= 0, got {workers}")
    _positive("--threads-per-worker", threads_per_worker)
    ctx = _context(task, cache_dir, device, no_progress)
    overrides = {"steps": steps, "lr": lr, "layer": layer, "block_size": block_size, "codec": codec}
    cfgs = _configs(ctx, config, overfit=overrides)
    ctx.cache.ensure_writable()
    result = _stage_overfit(ctx, cfgs, _cluster(workers, threads_per_worker, scheduler), force)
    emit(result, as_json)


ProfileOpt = Annotated[str | None, typer.Option("--profile", help="Denoiser profile: quick, paper or tiny.")]
EnsembleOpt = Annotated[int | None, typer.Option("--ensemble", help="OCD ensemble size K.")]
DdimStepsOpt = Annotated[int | None, typer.Option("--steps", help="DDIM sampling steps.")]


@app.command("train")
def train_command(
    task: TaskOpt = "mnist",
    config: ConfigOpt = None,
    cache_dir: CacheOpt = Path("data"),
    device: DeviceOpt = "cpu",
    profile: ProfileOpt = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the store's train split.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Minibatch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Denoiser learning rate.")] = None,
    num_workers: Annotated[int | None, typer.Option(help="DataLoader worker processes.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    workers: WorkersOpt = None,
    threads_per_worker: ThreadsOpt = 1,
    scheduler: SchedulerOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    no_progress: NoProgressOpt = False,
) -> None:
    """Stage two: train the conditional diffusion model on the record store (streamed)."""
    from .pipeline.report import emit

    for name, value in (("--epochs", epochs), ("--batch-size", batch_size), ("--lr", lr)):
        _positive(name, value)
    ctx = _context(task, cache_dir, device, no_progress)
    overrides = {"profile": profile, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                 "num_workers": num_workers, "seed": seed}
    cfgs = _configs(ctx, config, train=overrides)
    ctx.cache.ensure_writable()
    emit(_stage_train(ctx, cfgs, _cluster(workers, threads_per_worker, scheduler), force)[1], as_json)


@app.command("evaluate")
def evaluate_command(
    task: TaskOpt = "mnist",
    config: ConfigOpt = None,
    cache_dir: CacheOpt = Path("data"),
    device: DeviceOpt = "cpu",
    profile: ProfileOpt = None,
    ensemble: EnsembleOpt = None,
    steps: DdimStepsOpt = None,
    eta: Annotated[float | None, typer.Option(help="DDIM eta (0 = deterministic).")] = None,
    bootstrap: Annotated[int | None, typer.Option(help="Bootstrap resamples for intervals.")] = None,
    seed: Annotated[int | None, typer.Option(help="Noise and bootstrap seed.")] = None,
    alternative_layer: Annotated[
        bool | None, typer.Option("--alternative-layer", help="Add OCD on the next-ranked layer (trains a 2nd model).")
    ] = None,
    workers: WorkersOpt = None,
    threads_per_worker: ThreadsOpt = 1,
    scheduler: SchedulerOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    no_progress: NoProgressOpt = False,
) -> None:
    """Evaluate base, OCD, OCD ensemble, oracle and ablations on the test split."""
    for name, value in (("--ensemble", ensemble), ("--steps", steps), ("--bootstrap", bootstrap)):
        _positive(name, value)
    ctx = _context(task, cache_dir, device, no_progress)
    overrides = {"ensemble": ensemble, "steps": steps, "eta": eta, "bootstrap": bootstrap, "seed": seed,
                 "alternative_layer": alternative_layer}
    cfgs = _configs(ctx, config, train={"profile": profile}, evaluate=overrides)
    ctx.cache.ensure_writable()
    result = _stage_evaluate(ctx, cfgs, _cluster(workers, threads_per_worker, scheduler), force)
    _emit_evaluation(ctx, result, as_json)


@app.command("run")
def run_command(
    task: TaskOpt = "mnist",
    config: ConfigOpt = None,
    cache_dir: CacheOpt = Path("data"),
    device: DeviceOpt = "cpu",
    profile: ProfileOpt = None,
    ensemble: EnsembleOpt = None,
    layer: Annotated[str | None, typer.Option(help="Layer to overfit (default: the task's; auto: top-ranked).")] = None,
    workers: WorkersOpt = None,
    threads_per_worker: ThreadsOpt = 1,
    scheduler: SchedulerOpt = None,
    as_json: JsonOpt = False,
    no_progress: NoProgressOpt = False,
) -> None:
    """Every stage on a task (base, overfit, train, evaluate), each only if its cache is missing."""
    _positive("--ensemble", ensemble)
    ctx = _context(task, cache_dir, device, no_progress)
    cfgs = _configs(ctx, config, overfit={"layer": layer}, train={"profile": profile}, evaluate={"ensemble": ensemble})
    ctx.cache.ensure_writable()
    result = _stage_evaluate(ctx, cfgs, _cluster(workers, threads_per_worker, scheduler))
    _emit_evaluation(ctx, result, as_json)


def _emit_evaluation(ctx, result, as_json: bool) -> None:
    from .pipeline.report import emit, evaluation_table

    if as_json:
        emit(result, True)
        return
    evaluation_table(result)
    ctx.say(f"report: {result.summary['report']}")
    ctx.say(f"plots:  {', '.join(result.summary['plots'])}")


def _stage_train(ctx, cfgs, cluster, force: bool = False):
    from .stages.train import run_train

    overfit = _stage_overfit(ctx, cfgs, cluster)
    result = run_train(ctx, overfit, cfgs["train"], force=force)
    if result.cached:
        ctx.say(f"[green]cache hit[/green]: diffusion model {result.key}")
    return overfit, result


def _alternative_layer(ctx, cfgs, cluster, base, overfit):
    """Store and diffusion model of the best-ranked layer other than the one OCD uses."""
    import dataclasses

    from .stages.overfit import run_overfit
    from .stages.select_layer import select_layer
    from .stages.train import run_train

    used = overfit.summary["layer"]
    other = next((s.name for s in select_layer(ctx, base, cfgs["select"]) if s.name != used), None)
    if other is None:
        raise OcdError(f"task {ctx.task.name}: no layer other than {used!r} for the alternative-layer ablation")
    ctx.say(f"alternative-layer ablation: {other}")
    alt_store = run_overfit(ctx, base, dataclasses.replace(cfgs["overfit"], layer=other), cluster)
    return alt_store, run_train(ctx, alt_store, cfgs["train"])


def _stage_evaluate(ctx, cfgs, cluster, force: bool = False):
    from .stages.base import run_base
    from .stages.evaluate import run_evaluate

    overfit, train = _stage_train(ctx, cfgs, cluster)
    base = run_base(ctx, cfgs["base"])
    alternative = _alternative_layer(ctx, cfgs, cluster, base, overfit) if cfgs["evaluate"].alternative_layer else None
    result = run_evaluate(ctx, base, overfit, train, cfgs["evaluate"], force=force, alternative=alternative)
    if result.cached:
        ctx.say(f"[green]cache hit[/green]: evaluation {result.key}")
    return result


store_app = typer.Typer(help="Record stores: verify, export, import.", no_args_is_help=True)
app.add_typer(store_app, name="store")


@store_app.command("verify")
def store_verify_command(
    path: Annotated[str, typer.Argument(help="Path or fsspec URL of a store.zarr.")],
    as_json: JsonOpt = False,
) -> None:
    """Check a store's schema, done mask, block checksums and values; names the bad block."""
    import json

    from .pipeline.store import RecordStore
    from .pipeline.verify import verify_store

    store = RecordStore.open(path)
    problems = verify_store(store, check_values=True)
    if as_json:
        print(json.dumps({"path": path, "ok": not problems, "problems": problems}))
    elif problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
    else:
        sizes = ", ".join(f"{split} {store.size(split):,}" for split in ("train", "test"))
        print(f"ok: {path} ({store.attrs.get('task')}, layer {store.attrs.get('layer')}, {sizes} samples)")
    if problems:
        raise typer.Exit(1)


@app.command("select-layer")
def select_layer_command(
    task: TaskOpt = "mnist",
    config: ConfigOpt = None,
    cache_dir: CacheOpt = Path("data"),
    device: DeviceOpt = "cpu",
    draws: Annotated[int | None, typer.Option(help="Perturbation draws per layer (paper: ~10,000).")] = None,
    scale: Annotated[float | None, typer.Option(help="Noise std relative to the std of the layer's weight.")] = None,
    samples: Annotated[int | None, typer.Option(help="Training samples in the loss.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the draws and of the sample choice.")] = None,
    as_json: JsonOpt = False,
    no_progress: NoProgressOpt = False,
) -> None:
    """Rank the base model's Linear/Conv2d layers by the entropy of the training loss under weight noise."""
    import json

    from rich.console import Console

    from .stages.select_layer import ranking_json, ranking_table, select_layer

    for name, value in (("--draws", draws), ("--scale", scale), ("--samples", samples)):
        _positive(name, value)
    ctx = _context(task, cache_dir, device, no_progress)
    cfgs = _configs(ctx, config, select={"draws": draws, "scale": scale, "samples": samples, "seed": seed})
    ctx.cache.ensure_writable()
    base = _stage_base(ctx, cfgs)
    scores = select_layer(ctx, base, cfgs["select"])
    if as_json:
        print(json.dumps(ranking_json(scores, cfgs["select"], default_layer=ctx.task.layer)))
    else:
        Console().print(ranking_table(scores, default_layer=ctx.task.layer))


@store_app.command("export")
def store_export_command(
    store: Annotated[str, typer.Argument(help="Store: overfit key, unique key prefix or path.")],
    dest: Annotated[Path, typer.Argument(help="Package directory to create.")],
    zip_store: Annotated[bool, typer.Option("--zip", help="Pack the store as one zip file.")] = False,
    cache_dir: CacheOpt = Path("data"),
    as_json: JsonOpt = False,
) -> None:
    """Package a store with its base model, dataset card and checksum manifest for a collaborator."""
    import json

    from .pipeline.cache import Cache, dir_size
    from .pipeline.share import export_store

    path = export_store(Cache(cache_dir), store, dest, zip=zip_store)
    if as_json:
        print(json.dumps({"path": str(path), "bytes": dir_size(path)}))
    else:
        print(f"exported {path} ({dir_size(path):,} bytes)")


@store_app.command("import")
def store_import_command(
    src: Annotated[Path, typer.Argument(help="Package directory made by `ocd store export`.")],
    cache_dir: CacheOpt = Path("data"),
    as_json: JsonOpt = False,
) -> None:
    """Verify a package (checksums, schema, store) and register it in the cache."""
    import json

    from .pipeline.cache import Cache
    from .pipeline.share import import_store

    cache = Cache(cache_dir)
    cache.ensure_writable()
    result = import_store(src, cache)
    overfit_key, base_key = result
    if as_json:
        print(json.dumps({"overfit_key": overfit_key, "base_key": base_key, "already": result.already}))
    else:
        print(result.message)


@store_app.command("parquet")
def store_parquet_command(
    store: Annotated[str, typer.Argument(help="Store: overfit key, prefix, path, .zip or fsspec URL.")],
    dest: Annotated[Path, typer.Argument(help="Directory for train.parquet and test.parquet.")],
    cache_dir: CacheOpt = Path("data"),
) -> None:
    """Export a store to Parquet (one file per split) for Hugging Face `datasets` users."""
    from .pipeline.cache import Cache
    from .pipeline.share import export_parquet, find_store

    source = store if ("://" in store or store.endswith(".zip")) else str(find_store(Cache(cache_dir), store))
    for path in export_parquet(source, dest):
        print(path)


cache_app = typer.Typer(help="Browse and clean the cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("ls")
def cache_ls_command(cache_dir: CacheOpt = Path("data"), as_json: JsonOpt = False) -> None:
    """List cached entries: stage, key, task, size, created, complete or not."""
    import dataclasses
    import json

    from rich.console import Console

    from .pipeline.cache import Cache
    from .pipeline.share import entries_table, list_entries

    entries = list_entries(Cache(cache_dir))
    if as_json:
        print(json.dumps([dataclasses.asdict(e) for e in entries], default=str))
    else:
        Console().print(entries_table(entries))


@cache_app.command("rm")
def cache_rm_command(
    key: Annotated[str, typer.Argument(help="Key, unique key prefix, or stage/key.")],
    cache_dir: CacheOpt = Path("data"),
) -> None:
    """Remove one cache entry."""
    from .pipeline.cache import Cache
    from .pipeline.share import remove_entry

    for entry in remove_entry(Cache(cache_dir), key):
        print(f"removed {entry.stage}/{entry.key} ({entry.path})")


@cache_app.command("gc")
def cache_gc_command(
    cache_dir: CacheOpt = Path("data"),
    yes: Annotated[bool, typer.Option("--yes", help="Delete without asking.")] = False,
) -> None:
    """Remove unfinished entries (including resumable partial stores), stale locks and orphans."""
    from .pipeline.cache import Cache
    from .pipeline.share import garbage, remove_garbage

    cache = Cache(cache_dir)
    paths = garbage(cache)
    if not paths:
        print("nothing to collect")
        return
    for path in paths:
        print(path)
    if not yes and not typer.confirm(f"delete these {len(paths)} paths (partial stores lose their progress)?"):
        raise typer.Exit(1)
    remove_garbage(cache, paths)
    print(f"removed {len(paths)} paths")


def _cluster(workers, threads_per_worker, scheduler):
    from .pipeline.cluster import ClusterConfig

    return ClusterConfig(workers=workers, threads_per_worker=threads_per_worker, scheduler=scheduler)


def _stage_base(ctx, cfgs, force: bool = False):
    from .stages.base import run_base

    result = run_base(ctx, cfgs["base"], force=force)
    if result.cached:
        ctx.say(f"[green]cache hit[/green]: base model {result.key}")
    return result


def _stage_overfit(ctx, cfgs, cluster, force: bool = False):
    import dataclasses

    from .stages.overfit import run_overfit, validate_overfit_config
    from .stages.select_layer import resolve_layer

    validate_overfit_config(ctx, cfgs["overfit"])
    base = _stage_base(ctx, cfgs)
    layer = resolve_layer(ctx, base, cfgs["overfit"].layer, cfgs["select"])
    result = run_overfit(ctx, base, dataclasses.replace(cfgs["overfit"], layer=layer), cluster, force=force)
    if result.cached:
        ctx.say(f"[green]cache hit[/green]: record store {result.key}")
    return result


def main() -> None:
    """Entry point: runs the Typer app, turning every user error into one line on stderr."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=sys.argv[1:], prog_name="ocd", standalone_mode=False)
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        code = 130
    except OcdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    except Exception as exc:
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise
        # A usage error from Typer's command-line parser (bad option value, unknown option).
        if type(exc).__name__ == "NoArgsIsHelpError":
            print(exc.format_message(), file=sys.stderr)
        else:
            print(f"error: {exc.format_message()}", file=sys.stderr)
        code = exc.exit_code
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
