"""``tsv-fast interference``: STI per layer and block, its table, JSON/CSV and plots."""
from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Optional

import typer

from .app import app
from .common import CliError, guard_outputs, open_all, run_command, summary


@app.command()
def interference(
    models: list[Path] = typer.Argument(..., help="Fine-tuned checkpoints."),
    base: Path = typer.Option(..., "--base", "-b", help="The pretrained checkpoint."),
    output: Path = typer.Option(Path("sti.json"), "--output", "-o", help="Per-layer STI as .json or .csv."),
    plot: Optional[Path] = typer.Option(None, help="PNG of STI across layers (paper Fig. 6)."),
    heatmap: Optional[Path] = typer.Option(None, help="PNG of task-block similarity |U_i^T U_j| of one layer (paper Fig. 3)."),
    layer: Optional[str] = typer.Option(None, help="Layer key for --heatmap. Default: the middle merged matrix."),
    rank_fraction: Optional[float] = typer.Option(None, help="Per-task rank. Default: 1/T."),
    exclude: Optional[list[str]] = typer.Option(None, help="Keys left out (as in merge). Default: text_projection."),
    orthogonalized: bool = typer.Option(False, help="STI after TSV-M's orthogonalisation (~0 unless rank-deficient)."),
    device: Optional[str] = typer.Option(None, help="Where to compute. Default: cpu."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickled torch files (trusted files only)."),
    exact: bool = typer.Option(False, "--exact", help="Factors from float64 full SVDs (the authors' route)."),
):
    """Singular Task Interference per layer: STI = ||(U^T U - I) S (V^T V - I)||_1 (paper Eq. 7)."""
    def body():
        from ..api import interference as sti_of
        from ..engine.distributed import launched
        from ..methods.sti import per_block
        from . import ranks

        started = time.perf_counter()
        inputs = [base, *models]
        guard_outputs(inputs, output, plot, heatmap)  # before any work, not after it
        pre, fts = open_all(base, list(models), allow_pickle)
        if heatmap is not None and layer is not None and layer not in pre.keys():
            raise CliError(f"layer {layer!r} not found in {pre.name}")
        excl = tuple(exclude) if exclude else ("text_projection",)
        with launched(device) as (dist, rank_device):  # torchrun: the layers split over the ranks
            settings = dict(rank_fraction=rank_fraction, exclude=excl, orthogonalized=orthogonalized,
                            device=rank_device, progress=True, exact=exact)
            per_layer = sti_of(pre, fts, **settings) if dist is None else ranks.interference(dist, pre, fts, **settings)
        if per_layer is None:  # another rank than 0: rank 0 writes the gathered scores
            return
        blocks = per_block(per_layer)
        similarity = None
        if heatmap is not None:
            key = layer or (list(per_layer)[len(per_layer) // 2] if per_layer else None)
            if key is None:
                raise CliError("no merged matrix to draw a heatmap of")
            similarity = block_similarity(pre, fts, key, rank_fraction, device)
            plot_heatmap(heatmap, key, similarity, inputs)
        write_sti(output, per_layer, blocks, similarity, inputs)
        if plot is not None:
            plot_sti(plot, per_layer, blocks, inputs)
        print_sti_table(per_layer)
        summary(started, output)

    run_command(body)


def write_sti(path: Path, per_layer: dict, blocks: dict, similarity: dict | None = None, inputs=()) -> None:
    from ..io.outputs import write_file

    if path.suffix.lower() == ".csv":
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["layer", "sti"])
        writer.writerows(per_layer.items())
        write_file(path, text.getvalue(), inputs=inputs, what="STI table")
        return
    data = {"per_layer": per_layer, "per_block": blocks}
    if similarity is not None:
        data["block_similarity"] = similarity
    write_file(path, json.dumps(data, indent=2), inputs=inputs, what="STI table")


def print_sti_table(per_layer: dict, limit: int | None = None) -> None:
    from ..methods.sti import per_block

    width = max([len(k) for k in per_layer] + [5])
    typer.echo(f"{'layer'.ljust(width)}  STI")
    items = list(per_layer.items())
    for key, value in items[:limit] if limit else items:
        typer.echo(f"{key.ljust(width)}  {value:.4g}")
    if limit and len(items) > limit:
        typer.echo(f"... {len(items) - limit} more layers")
    blocks = per_block(per_layer)
    typer.echo(f"total STI {sum(per_layer.values()):.4g} over {len(per_layer)} layers, {len(blocks)} blocks")


def block_similarity(pre, fts, key: str, rank_fraction, device) -> dict:
    """‖U_iᵀU_j‖_F / k for one layer (1 on the diagonal) and the full |UᵀU| of the stacked U."""
    import torch

    from ..backends import resolve_backend
    from ..reference import rank_per_task

    if key not in pre.keys():
        raise CliError(f"layer {key!r} not found in {pre.name}")
    shape = pre.shape(key)
    if len(shape) != 2:
        raise CliError(f"layer {key!r} has shape {shape}, not a matrix")
    k = rank_per_task(shape, len(fts), rank_fraction)
    if k == 0:
        raise CliError(f"layer {key!r}: rank per task is 0 for {len(fts)} tasks")
    dev = torch.device(device or "cpu")
    ft = torch.stack([c.load(key).to(dev) for c in fts]).unsqueeze(0)
    u = resolve_backend(None, dev).task_factors(ft, pre.load(key).to(dev).unsqueeze(0), k)[0][0]  # [T, m, k]
    stacked = u.permute(1, 0, 2).reshape(u.shape[1], -1)
    gram = (stacked.mT @ stacked).abs().cpu()
    blocks = torch.linalg.matrix_norm(u.mT.unsqueeze(1) @ u.unsqueeze(0)) / math.sqrt(k)
    return {"layer": key, "k": k, "blocks": blocks.cpu().tolist(), "gram_abs": gram.tolist()}


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise CliError("plots need matplotlib: pip install 'tsv_fast[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, inputs) -> None:
    from ..io.outputs import Output

    with Output(path, inputs=inputs, folder=False, what="plot") as out:
        fig.savefig(out.member(path.name), dpi=120)
        out.commit()


def plot_sti(path: Path, per_layer: dict, blocks: dict, inputs=()) -> None:
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    ax1.plot(range(len(per_layer)), list(per_layer.values()), marker="o", ms=3)
    ax1.set(xlabel="layer (checkpoint order)", ylabel="STI", title="STI per layer", yscale="log")
    names = [name.rsplit(".", 1)[-1] if name[-1].isdigit() else name for name in blocks]
    ax2.bar(range(len(blocks)), list(blocks.values()))
    ax2.set_xticks(range(len(blocks)), names, rotation=90, fontsize=7)
    ax2.set(xlabel="block", ylabel="STI (sum over the block)", title="STI per block")
    fig.tight_layout()
    save_figure(fig, path, inputs)
    plt.close(fig)


def plot_heatmap(path: Path, key: str, similarity: dict, inputs=()) -> None:
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 5))
    image = ax1.imshow(similarity["gram_abs"], cmap="viridis", vmin=0, vmax=1)
    ax1.set_title(f"|UᵀU|, k = {similarity['k']} per task")
    fig.colorbar(image, ax=ax1, fraction=0.046)
    blocks = similarity["blocks"]
    image = ax2.imshow(blocks, cmap="magma", vmin=0, vmax=1)
    ax2.set(title="‖U_iᵀU_j‖_F / √k", xlabel="task j", ylabel="task i")
    for i, row in enumerate(blocks):
        for j, value in enumerate(row):
            ax2.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                     color="black" if value > 0.5 else "white")
    fig.colorbar(image, ax=ax2, fraction=0.046)
    fig.suptitle(key)
    fig.tight_layout()
    save_figure(fig, path, inputs)
    plt.close(fig)


