"""tc: the command line. Thin: each command is generated from its stage's config dataclass.

Option names are the dataclass field names with dashes; help text and help panels come from the
fields' metadata; `--config FILE.toml` supplies any of them (keys are option names); options
given on the command line win over the file, the file over the defaults.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from pipeline.util import UserError

app = typer.Typer(help="Train sparse transcoders on an LLM's MLP and see what each feature means.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
samples_app = typer.Typer(help="Top-activating samples of each feature: collect, export, show.",
                          no_args_is_help=True)
app.add_typer(samples_app, name="samples")


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg="red")
    return typer.Exit(code)


RESUME = "re-run the same command to continue where it stopped"


def guarded(fn: Callable[[], Any], resume: str = RESUME) -> Any:
    """Run a stage: a UserError becomes one line and exit 2; Ctrl-C says how to resume."""
    try:
        return fn()
    except UserError as e:
        raise fail(str(e)) from None
    except KeyboardInterrupt:
        raise fail(f"interrupted: {resume}", 130) from None


def option_type(field_type: Any) -> tuple[Any, bool]:
    """The CLI type of a config field and whether it may be None."""
    args = typing.get_args(field_type)
    if typing.get_origin(field_type) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return field_type, False


def config_params(cfg_cls: type) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(cfg_cls)
    params = []
    for f in dataclasses.fields(cfg_cls):
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        base, nullable = option_type(hints[f.name])
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


def build_config(cfg_cls: type, values: dict[str, Any], ctx: typer.Context) -> Any:
    """Command line > config file > defaults; then each field's parser."""
    config_file = values.pop("config", None)
    if config_file is not None:
        file_values = read_toml(config_file, cfg_cls)
        for name, value in file_values.items():
            source = ctx.get_parameter_source(name)   # typer may vendor its own click: compare by name
            if getattr(source, "name", None) != "COMMANDLINE":
                values[name] = value
    for f in dataclasses.fields(cfg_cls):
        parse = f.metadata.get("parse")
        if parse and values.get(f.name) is not None:
            values[f.name] = parse(values[f.name])
    return cfg_cls(**values)


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
    def command(ctx: typer.Context, **values: Any) -> None:
        guarded(lambda: run(build_config(cfg_cls, values, ctx)), resume)

    ctx_param = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    command.__signature__ = inspect.Signature([ctx_param, *config_params(cfg_cls)])
    command.__doc__ = help
    typer_app.command(name, help=help, no_args_is_help=False)(command)


def _register_all() -> None:
    from pipeline import cache, demo, evaluate, export, samples, train

    register(app, "demo", demo.DemoConfig, demo.run_demo,
             "The whole pipeline on the packaged Gemma 3 270M and CPython's docs, in about ten minutes on a laptop CPU.")

    register(app, "cache", cache.CacheConfig, cache.run_cache,
             "Stage one: run the model once and write source/target activations and token ids to a Zarr store.")
    register(app, "train", train.TrainConfig, train.run_train,
             "Stage two: train a Matryoshka BatchTopK transcoder from a store.",
             resume="continue from the last checkpoint with `tc train --resume RUN` (RUN: the run folder)")
    register(app, "eval", evaluate.EvalConfig, evaluate.run_eval,
             "Measure a trained transcoder: FVU per prefix, L0, dead features, and the model's loss with it spliced in.")
    register(samples_app, "collect", samples.CollectConfig, samples.run_collect,
             "Exact top activations, interval samples, histograms and density of every feature over the store.")
    register(samples_app, "export", export.ExportConfig, export.run_export,
             "Write feature samples as JSON or as an offline HTML feature browser.")


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
def info(path: Path = typer.Argument(..., help="A store (tc cache) or a run folder (tc train).")) -> None:
    """Describe a store or a run folder: what made it, its size, its state, its metrics at a glance."""
    from pipeline.info import describe

    typer.echo(guarded(lambda: describe(path)))


if __name__ == "__main__":
    sys.exit(app())
