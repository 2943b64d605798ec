"""tc: the command line. Thin: each command is generated from its stage's config dataclass.

Option names are the dataclass field names with dashes; help text and help panels come from the
fields' metadata; `--config FILE.toml` supplies any of them (keys are option names); options
given on the command line win over the file, the file over the defaults. Every value is checked
against its field's type (pipeline/config.py); a bad one, like any usage error, is one line, exit 2.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer

try:   # typer 0.2x ships its own copy of click, whose exceptions are the ones raised
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors

from pipeline.config import checked, checked_values, field_type
from pipeline.util import UserError, is_disk_full, resume_hint

app = typer.Typer(help="Train sparse transcoders on an LLM's MLP and see what each feature means.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
samples_app = typer.Typer(help="Top-activating samples of each feature: collect, export, show.",
                          no_args_is_help=True)
app.add_typer(samples_app, name="samples")
export_app = typer.Typer(help="Write trained transcoders in other tools' formats (circuit-tracer, SAELens).",
                         no_args_is_help=True)
app.add_typer(export_app, name="export")


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg="red")
    return typer.Exit(code)


RESUME = "re-run the same command to continue where it stopped"


def guarded(fn: Callable[[], Any], resume: str = RESUME) -> Any:
    """Run a stage: a UserError becomes one line and exit 2; Ctrl-C says how to resume (the stage's
    own words when it set them, util.resume_hint); a full disk says so."""
    resume_hint.clear()
    try:
        return fn()
    except UserError as e:
        raise fail(str(e)) from None
    except KeyboardInterrupt:
        raise fail(f"interrupted: {resume_hint.get() or resume}", 130) from None
    except Exception as e:
        if not is_disk_full(e):
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise fail(f"the disk is full{where}: free some space, then {resume_hint.get() or resume}; what was "
                   "written before is kept") from None


def config_params(cfg_cls: type) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(cfg_cls)
    params = []
    for f in dataclasses.fields(cfg_cls):
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        base, nullable = field_type(hints[f.name])
        if meta.get("parse") or base is list or typing.get_origin(base) is list:
            base = str   # parsed after merging with the config file
            default = ",".join(map(str, default)) if isinstance(default, list) else default
        annotation = Optional[base] if nullable or default is None else base
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        decls = [f"{flag}/--no-{flag[2:]}"] if base is bool else [flag]
        option = typer.Option(default, *decls, help=meta.get("help"), rich_help_panel=meta.get("panel"),
                              show_default=default is not None and default != "")
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                    default=typer.Option(None, "--config", help="TOML file whose keys are option names.",
                                                         rich_help_panel="Config file")))
    return params


def build_config(cfg_cls: type, values: dict[str, Any], ctx: typer.Context) -> tuple[Any, set[str]]:
    """Command line > config file > defaults, each value checked against its field's type.
    Returns the config and the names of the options the user gave (on the line or in the file)."""
    config_file = values.pop("config", None)
    given = {name for name in values if _from_command_line(ctx, name)}
    if config_file is not None:
        file_values = checked_values(cfg_cls, read_toml(config_file, cfg_cls), f"config file {config_file}: ")
        for name, value in file_values.items():
            if name not in given:
                values[name] = value
        given |= set(file_values)
    return checked(cfg_cls(**values)), given


def _from_command_line(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)   # typer may vendor its own click: compare by name
    return getattr(source, "name", None) == "COMMANDLINE"


def read_toml(path: Path, cfg_cls: type) -> dict[str, Any]:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    values = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"config file {path} has unknown keys {unknown}: use option names such as "
                        f"{sorted(names)[:4]}")
    return values


def register(typer_app: typer.Typer, name: str, cfg_cls: type, run: Callable[[Any], Any], help: str,
             resume: str = RESUME) -> None:
    """Add a command whose options are the fields of `cfg_cls` and which calls `run(config)`."""
    takes_given = "given" in inspect.signature(run).parameters

    def command(ctx: typer.Context, **values: Any) -> None:
        def stage() -> Any:
            cfg, given = build_config(cfg_cls, values, ctx)
            return run(cfg, given=given) if takes_given else run(cfg)
        guarded(stage, resume)

    ctx_param = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    command.__signature__ = inspect.Signature([ctx_param, *config_params(cfg_cls)])
    command.__doc__ = help
    typer_app.command(name, help=help, no_args_is_help=False)(command)


def _register_all() -> None:
    from pipeline import cache, collect, demo, evaluate, export, interop, train

    register(app, "demo", demo.DemoConfig, demo.run_demo,
             "The whole pipeline on the packaged Gemma 3 270M and CPython's docs, in about five minutes on a 2-core laptop CPU.")

    register(app, "cache", cache.CacheConfig, cache.run_cache,
             "Stage one: run the model once and write source/target activations and token ids to a Zarr store.")
    register(app, "train", train.TrainConfig, train.run_train,
             "Stage two: train a Matryoshka BatchTopK transcoder from a store.")
    register(app, "eval", evaluate.EvalConfig, evaluate.run_eval,
             "Measure a trained transcoder (or a set: every layer, and all spliced in at once): FVU per prefix, L0, "
             "dead features, and the model's loss with it spliced in.")
    register(samples_app, "collect", collect.CollectConfig, collect.run_collect,
             "Exact top activations, interval samples, histograms and density of every feature over the store.")
    register(samples_app, "export", export.ExportConfig, export.run_export,
             "Write feature samples as JSON or as an offline HTML feature browser.")
    register(export_app, "circuit-tracer", interop.CircuitTracerConfig, interop.run_circuit_tracer,
             "One run per layer as circuit-tracer's transcoder set (layer_{i}.safetensors, config.yaml), "
             "normalisation folded in.")
    register(export_app, "saelens", interop.SAELensConfig, interop.run_saelens,
             "One run as a SAELens JumpReLU (skip) transcoder (cfg.json, sae_weights.safetensors), normalisation "
             "folded in.")


@samples_app.command("show")
def samples_show(run: Path = typer.Argument(..., help="Run folder made by tc train."),
                 feature: int = typer.Argument(..., help="Feature index."),
                 n: int = typer.Option(10, "--n", help="Samples to print."),
                 context: int = typer.Option(20, "--context", help="Tokens of context per sample.")) -> None:
    """Print one feature's strongest samples in the terminal, the activating token highlighted."""
    from pipeline.export import show_feature

    typer.echo(guarded(lambda: show_feature(run, feature, n=n, context=context)))


_register_all()


@app.command("info")
def info(path: str = typer.Argument(..., help="A store (tc cache; a path or an s3://, gs:// URL) or a run folder "
                                    "(tc train)."),
         verify: bool = typer.Option(False, "--verify", help="Also check every chunk (store) or checkpoint and "
                                     "transcoder (run) against its checksum; exit 2 naming what is damaged.")) -> None:
    """Describe a store or a run folder: what made it, its size, its state, its metrics at a glance."""
    from pipeline.info import describe, verify_report

    typer.echo(guarded(lambda: describe(path)))
    if verify:
        typer.echo(guarded(lambda: verify_report(path)))


def main() -> int:
    """The `tc` entry point: click's usage errors (a bad option value, an unknown option) become
    one line and exit 2, as tc's own errors do."""
    try:
        return app(standalone_mode=False) or 0
    except click_errors.NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help())
        return 0
    except click_errors.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        typer.secho(f"error: {' '.join(e.format_message().split())}{hint}", err=True, fg="red")
        return 2
    except (KeyboardInterrupt, typer.Abort):
        typer.secho("error: interrupted", err=True, fg="red")
        return 130


if __name__ == "__main__":
    sys.exit(main())
