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
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="TOML file with \\[base], \\[overfit], \\[train], \\[evaluate] tables.")
]
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
    overrides = {"ensemble": ensemble, "steps": steps, "eta": eta, "bootstrap": bootstrap, "seed": seed}
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
    workers: WorkersOpt = None,
    threads_per_worker: ThreadsOpt = 1,
    scheduler: SchedulerOpt = None,
    as_json: JsonOpt = False,
    no_progress: NoProgressOpt = False,
) -> None:
    """Every stage on a task (base, overfit, train, evaluate), each only if its cache is missing."""
    _positive("--ensemble", ensemble)
    ctx = _context(task, cache_dir, device, no_progress)
    cfgs = _configs(ctx, config, train={"profile": profile}, evaluate={"ensemble": ensemble})
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


def _stage_evaluate(ctx, cfgs, cluster, force: bool = False):
    from .stages.base import run_base
    from .stages.evaluate import run_evaluate

    overfit, train = _stage_train(ctx, cfgs, cluster)
    base = run_base(ctx, cfgs["base"])
    result = run_evaluate(ctx, base, overfit, train, cfgs["evaluate"], force=force)
    if result.cached:
        ctx.say(f"[green]cache hit[/green]: evaluation {result.key}")
    return result


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
    from .stages.overfit import run_overfit

    base = _stage_base(ctx, cfgs)
    result = run_overfit(ctx, base, cfgs["overfit"], cluster, force=force)
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
