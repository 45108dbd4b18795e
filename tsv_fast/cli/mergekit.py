"""``tsv-fast mergekit``: mergekit's own merge (``mergekit-yaml``) with tsv_fast's methods registered.

mergekit has no plugin entry point, so its console script cannot see methods added by another
package; this command registers them in-process (``tsv_fast.integrations.mergekit``) and runs
mergekit's ``mergekit-yaml`` command with every argument it was given. mergekit is imported here,
inside the command, so ``tsv-fast`` works without it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from .app import app
from .common import CliError, run_command, summary

INSTALL_HINT = 'mergekit is not installed: pip install "tsv_fast[mergekit]"'


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "allow_interspersed_args": True})
def mergekit(
    args: Optional[list[str]] = typer.Argument(None, metavar="CONFIG.yml OUT_DIR [MERGEKIT-YAML OPTIONS]",
                                               help="A mergekit config and output folder, then any mergekit-yaml option."),
):
    """Run a mergekit YAML with merge_method tsv, iso_c, iso_cts or tsv_c_task (or any of mergekit's).

    Example:  tsv-fast mergekit merge.yml merged/ --cuda --lazy-unpickle --out-shard-size 5B

    Every mergekit-yaml option works (`mergekit-yaml --help` lists them); mergekit's install is not
    touched. The tsv_fast methods take alpha, rank_fraction, min_rank, exclude ('a,b'),
    common_space_fraction (iso_cts) and a per-model weight (scales that task vector before
    factorisation); see the README, section "mergekit".
    """
    def body():
        try:
            import click
            from mergekit.scripts import run_yaml

            from ..integrations import mergekit as bridge
        except ImportError as exc:  # mergekit missing, or one of its own imports broken
            if (exc.name or "").split(".")[0] != "mergekit":
                raise CliError(f"mergekit cannot be imported: {exc}") from None
            raise CliError(INSTALL_HINT) from None
        argv = list(args or [])
        started = time.perf_counter()
        try:
            with run_yaml.main.make_context("tsv-fast mergekit", list(argv), resilient_parsing=False) as ctx:
                config_path, out_path = Path(ctx.params["config_file"]), Path(ctx.params["out_path"])
        except click.ClickException as exc:
            raise CliError(exc.format_message()) from None
        except click.exceptions.Exit as exc:  # mergekit's own --help (when typer did not take it)
            raise typer.Exit(exc.exit_code) from None
        config = read_config(config_path)
        try:
            bridge.check_config(config)
        except ValueError as exc:
            raise CliError(f"{config_path}: {exc}") from None
        refuse_overlap(config, out_path)
        try:
            run_yaml.main.main(argv, prog_name="tsv-fast mergekit", standalone_mode=False)
        except click.ClickException as exc:
            raise CliError(exc.format_message()) from None
        except (KeyboardInterrupt, click.exceptions.Abort):
            typer.secho(f"interrupted: {out_path} may hold a partial merge (mergekit writes as it goes)", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:  # mergekit's errors: pydantic reports, RuntimeError, ValueError
            raise CliError(one_line(exc) + network_hint(exc)) from exc
        summary(started, out_path)

    run_command(body)


def read_config(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise CliError(f"config not found: {path}")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CliError(f"{path}: not valid YAML: {one_line(exc)}") from None
    if not isinstance(config, dict):
        raise CliError(f"{path}: expected a mergekit config (a mapping with merge_method and models), "
                       f"got {type(config).__name__}")
    return config


def refuse_overlap(config: dict, out_path: Path) -> None:
    """mergekit writes into OUT_DIR as it goes: never let that be, or sit inside, an input folder."""
    out = out_path.resolve()
    for model in _model_paths(config):
        path = Path(model)
        if not path.exists():
            continue  # a hub id, or mergekit's error to report
        src = path.resolve()
        if out == src or src in out.parents:
            raise CliError(f"output {out_path} overlaps the input model {model}; choose another OUT_DIR")


def _model_paths(config: dict):
    """Local model paths named in a config (base_model, models, slices' and modules' sources)."""
    def of(entry):
        model = entry.get("model") if isinstance(entry, dict) else entry
        if isinstance(model, str):
            yield model.split("+")[0]  # "path+lora" names a model with a LoRA applied

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("base_model", "model"):
                    yield from of(value)
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    yield from walk(config)


def network_hint(exc: BaseException) -> str:
    """mergekit's model card asks the Hugging Face Hub about model paths that are relative and hold at
    most one '/', even when they exist locally; offline that fails after the tensors were written."""
    chain = [exc, exc.__cause__, exc.__context__]
    if any(type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3")
           for e in chain if e is not None):
        return (" (a network request failed: mergekit's model card looks relative model paths up on the Hugging "
                "Face Hub; offline, give absolute paths or pass --no-write-model-card)")
    return ""


def one_line(exc: BaseException) -> str:
    """A one-line message: a pydantic report as 'location: message' items, else the first line."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            items = errors()
            return "; ".join(f"{'.'.join(map(str, e.get('loc', ()))) or 'value'}: {e.get('msg')}"
                             + (f" (got {e['input']!r})" if not isinstance(e.get("input"), (dict, list)) else "")
                             for e in items[:3])
        except Exception:  # not a pydantic error after all
            pass
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
