"""``tsv-fast interference``: STI per layer and block, its table, JSON/CSV and plots."""
from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from pathlib import Path
from typing import Optional

import typer

from .app import app
from .common import (CliError, check_device, guard_outputs, local_inputs, open_tasks, parse_overrides, run_command,
                     summary)


@app.command()
def interference(
    models: list[Path] = typer.Argument(..., help="Fine-tuned checkpoints, or PEFT LoRA adapter folders of the base."),
    base: Path = typer.Option(..., "--base", "-b", help="The pretrained checkpoint."),
    output: Path = typer.Option(Path("sti.json"), "--output", "-o", help="Per-layer STI as .json or .csv."),
    plot: Optional[Path] = typer.Option(None, help="PNG of STI per layer, grouped by block (paper Fig. 6)."),
    heatmap: Optional[Path] = typer.Option(None, help="PNG of task-block similarity |U_i^T U_j| of one layer (paper Fig. 3); the full |U^T U| goes to OUTPUT's stem + .gram_abs.npy."),
    layer: Optional[str] = typer.Option(None, help="Layer key for --heatmap. Default: the middle merged matrix."),
    rank_fraction: Optional[float] = typer.Option(None, help="Per-task rank. Default: 1/T."),
    min_rank: int = typer.Option(0, help="At least this many triplets per task (1 keeps layers with min(m,n) < T)."),
    rank_override: Optional[list[str]] = typer.Option(None, help="PATTERN=K (a rank) or PATTERN=0.25 (a fraction) for keys matching the glob PATTERN (repeatable)."),
    exclude: Optional[list[str]] = typer.Option(None, help="Keys left out (as in merge). Default: text_projection."),
    orthogonalized: bool = typer.Option(False, help="STI after TSV-M's orthogonalisation (~0 unless rank-deficient)."),
    device: Optional[str] = typer.Option(None, help="Where to compute. Default: cpu."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickled torch files (trusted files only)."),
    exact: bool = typer.Option(False, "--exact", help="Factors from float64 full SVDs (the authors' route)."),
    missing_keys: str = typer.Option("base", help="Keys some checkpoints lack: base, zero or error (as in merge)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
):
    """Singular Task Interference per layer: STI = ||(U^T U - I) S (V^T V - I)||_1 (paper Eq. 7)."""
    def body():
        started = time.perf_counter()
        inputs = local_inputs([base, *models])  # paths and model ids, then the outputs, before any work
        gram_file = output.with_name(output.stem + ".gram_abs.npy") if heatmap is not None else None
        guard_outputs(inputs, output, plot, heatmap, gram_file)
        check_device(device)
        options = {"rank_fraction": rank_fraction, "min_rank": min_rank, "exclude": tuple(exclude or ["text_projection"]),
                   "rank_overrides": parse_overrides(rank_override) if rank_override else None,
                   "device": device, "missing_keys": missing_keys}

        from ..api import interference as sti_of
        from ..methods.sti import per_block
        from . import ranks

        pre, fts = open_tasks(Path(inputs[0]), [Path(m) for m in inputs[1:]], allow_pickle)
        if heatmap is not None and layer is not None and layer not in pre.keys():
            raise CliError(f"layer {layer!r} not found in {pre.name}")
        with ranks.launched(device) as (dist, rank_device):  # torchrun: the layers split over the ranks
            settings = dict(options, device=rank_device, orthogonalized=orthogonalized, progress=progress, exact=exact)
            per_layer = sti_of(pre, fts, **settings) if dist is None else ranks.interference(dist, pre, fts, **settings)
        if per_layer is None:  # another rank than 0: rank 0 writes the gathered scores
            return
        blocks = per_block(per_layer)
        names = task_names([str(m) for m in models])
        similarity = None
        if heatmap is not None:
            key = layer or (list(per_layer)[len(per_layer) // 2] if per_layer else None)
            if key is None:
                raise CliError("no merged matrix to draw a heatmap of")
            similarity, gram = block_similarity(pre, fts, key, options)
            similarity["gram_abs"] = gram_file.name
            write_array(gram_file, gram, inputs)
            plot_heatmap(heatmap, key, similarity, gram, names, inputs)
        write_sti(output, per_layer, blocks, similarity, inputs, names)
        if plot is not None:
            plot_sti(plot, per_layer, blocks, inputs)
        print_sti_table(per_layer)
        summary(started, output)

    run_command(body)


def task_names(models: list[str]) -> list[str]:
    """Short, distinct names of the inputs: file stems, folder names (model.safetensors in a folder
    is named by its folder), the name of a model id."""
    names = []
    for model in models:
        path = Path(model.split("@", 1)[0])
        stem = path.name.removesuffix(".safetensors").removesuffix(".index.json").removesuffix(".safetensors")
        stem = Path(stem).stem if path.suffix in (".pt", ".bin", ".pth") else stem
        names.append(path.parent.name if stem in ("model", "pytorch_model", "adapter_model") and path.parent.name
                     else stem)
    return [f"{n} ({i})" if names.count(n) > 1 else n for i, n in enumerate(names)]


def write_sti(path: Path, per_layer: dict, blocks: dict, similarity: dict | None = None, inputs=(),
              tasks: list[str] | None = None) -> None:
    from ..io.outputs import write_file

    if path.suffix.lower() == ".csv":
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["layer", "sti"])
        writer.writerows(per_layer.items())
        write_file(path, text.getvalue(), inputs=inputs, what="STI table")
        return
    data = {"per_layer": per_layer, "per_block": blocks, **({"tasks": tasks} if tasks else {})}
    if similarity is not None:
        data["block_similarity"] = similarity
    write_file(path, json.dumps(data, indent=2), inputs=inputs, what="STI table")


def write_array(path: Path, array, inputs=()) -> None:
    """A matrix as .npy (float32), through io.outputs like every output."""
    import numpy as np

    from ..io.outputs import write_file

    buffer = io.BytesIO()
    np.save(buffer, array.float().numpy())
    write_file(path, buffer.getvalue(), inputs=inputs, what="matrix file")


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


def block_similarity(pre, fts, key: str, options: dict):
    """({layer, k, blocks: ‖U_iᵀU_j‖_F / √k per task pair (1 on the diagonal)}, |UᵀU| of the stacked U)."""
    import torch

    from ..backends import resolve_backend
    from ..options import Options

    if key not in pre.keys():
        raise CliError(f"layer {key!r} not found in {pre.name}")
    shape = pre.shape(key)
    if len(shape) != 2:
        raise CliError(f"layer {key!r} has shape {shape}, not a matrix")
    lacking = [c.name for c in fts if key not in c.keys() and not hasattr(c, "factor")]  # (adapters: a zero Δ)
    if lacking:
        raise CliError(f"layer {key!r} is missing from {lacking[0]}; choose another --layer")
    k = Options(**options).rank(key, shape, len(fts))
    if k == 0:
        raise CliError(f"layer {key!r}: rank per task is 0 for {len(fts)} tasks")
    dev = torch.device(options.get("device") or "cpu")
    backend = resolve_backend(None, dev)
    if hasattr(fts[0], "factor"):  # LoRA adapters: each Uₜ from its factors, zero columns where it has fewer
        base = pre.load(key).to(dev)
        us = []
        for task in fts:
            factor, delta = task.factor(key), task.delta(key, base, torch.float64)
            u = (factor.svd(k, dev)[0] if factor is not None else torch.zeros(shape[0], 0, dtype=torch.float64)
                 if delta is None else backend.task_factors(delta[None, None], None, k)[0][0, 0])
            us.append(torch.nn.functional.pad(u, (0, k - u.shape[1])))
        u = torch.stack(us)
    else:
        ft = torch.stack([c.load(key).to(dev) for c in fts]).unsqueeze(0)
        u = backend.task_factors(ft, pre.load(key).to(dev).unsqueeze(0), k)[0][0]  # [T, m, k]
    stacked = u.permute(1, 0, 2).reshape(u.shape[1], -1)
    gram = (stacked.mT @ stacked).abs().cpu()
    blocks = torch.linalg.matrix_norm(u.mT.unsqueeze(1) @ u.unsqueeze(0)) / math.sqrt(k)
    return {"layer": key, "k": k, "blocks": blocks.cpu().tolist()}, gram


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


_NUMBERED = re.compile(r"^(.*?)\.(\d+)$")


def block_labels(blocks: list[str]) -> tuple[list[str], str]:
    """Tick labels of blocks and the axis title: numbered blocks that share one prefix are labelled
    by their number (``visual.transformer.resblocks.`` named once, in the title)."""
    prefixes = {m.group(1) for m in map(_NUMBERED.match, blocks) if m}
    if len(prefixes) == 1:
        prefix = prefixes.pop()
        return [b.rsplit(".", 1)[1] if b.startswith(prefix + ".") and _NUMBERED.match(b) else b for b in blocks], \
            f"block ({prefix}.N)"
    return list(blocks), "block"


def layer_groups(keys: list[str]) -> list[tuple[str, str]]:
    """(block, member) of each key: the block as ``methods.sti.per_block`` names it and the rest of
    the key (``attn.in_proj_weight``, ``self_attn.q_proj``), ``.weight`` dropped."""
    from ..methods.sti import _BLOCK

    out = []
    for key in keys:
        match = _BLOCK.match(key)
        block = match.group(1) if match else key.rsplit(".", 1)[0]
        member = key[len(block) + 1:] if match else key
        out.append((block, member.removesuffix(".weight")))
    return out


def plot_sti(path: Path, per_layer: dict, blocks: dict, inputs=()) -> None:
    """Top: STI of every matrix in checkpoint order, coloured by its kind (q/k/v, MLP, ..., or the key
    itself outside the blocks; named in the legend), blocks shaded alternately and labelled; bottom:
    the sum per block. Readable from 10 to ~400 matrices (labels thinned to ~40 and ~60)."""
    plt = _pyplot()
    keys, values = list(per_layer), list(per_layer.values())
    groups = layer_groups(keys)
    kinds = [member for _, member in groups]  # a key outside the numbered blocks is a kind of its own
    legend = list(dict.fromkeys(kinds))
    palette = plt.get_cmap("tab10" if len(legend) <= 10 else "tab20")
    colour = {kind: palette(i % palette.N) if i < 20 else "0.45" for i, kind in enumerate(legend)}
    width = min(max(10.0, 6 + 0.045 * len(keys)), 26.0)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(width, 8), gridspec_kw={"height_ratios": [3, 2]})
    log = any(v > 0 for v in values)
    ax1.bar(range(len(keys)), [v if v > 0 or not log else float("nan") for v in values], width=0.85,
            color=[colour[kind] for kind in kinds])
    # runs of consecutive keys of one numbered block: alternate shading, its number in the middle
    runs: list[list] = []
    for i, (block, _) in enumerate(groups):
        if not _NUMBERED.match(block):
            continue
        if runs and runs[-1][0] == block and runs[-1][2] == i - 1:
            runs[-1][2] = i
        else:
            runs.append([block, i, i])
    names, title = block_labels([block for block, _, _ in runs])
    step = max(1, math.ceil(len(runs) / 40))
    ticks, labels = [], []
    for j, (block, first, last) in enumerate(runs):
        if j % 2:
            ax1.axvspan(first - 0.5, last + 0.5, color="0.93", zorder=0)
        if j % step == 0 or j == len(runs) - 1:
            ticks.append((first + last) / 2)
            labels.append(names[j])
    _ticks(ax1, ticks, labels)
    ax1.set_xlim(-0.5, len(keys) - 0.5)
    ax1.set(ylabel="STI", title=f"STI per matrix ({len(keys)} matrices), grouped by block", xlabel=title)
    if log:
        ax1.set_yscale("log")
    shown = legend[:20]
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[kind]) for kind in shown]
    ax1.legend(handles, shown + (["..."] if len(legend) > 20 else []), fontsize=8, loc="upper left",
               bbox_to_anchor=(1.005, 1), frameon=False, title="matrix", title_fontsize=8)
    block_names, block_title = block_labels(list(blocks))
    ax2.bar(range(len(blocks)), list(blocks.values()), color="tab:blue")
    step = max(1, math.ceil(len(blocks) / 60))
    shown = [i for i in range(len(blocks)) if i % step == 0 or i == len(blocks) - 1]
    _ticks(ax2, shown, [block_names[i] for i in shown])
    ax2.set_xlim(-0.5, len(blocks) - 0.5)
    ax2.set(xlabel=block_title, ylabel="STI (sum over the block)", title="STI per block")
    fig.tight_layout()
    save_figure(fig, path, inputs)
    plt.close(fig)


def _ticks(ax, positions, labels) -> None:
    """Short labels upright, longer ones turned (a block number stays level beside a key name)."""
    ax.set_xticks(positions, labels, fontsize=8)
    for label in ax.get_xticklabels():
        label.set_rotation(90 if len(label.get_text()) > 3 else 0)


def plot_heatmap(path: Path, key: str, similarity: dict, gram_abs, tasks: list[str], inputs=()) -> None:
    """Left: |UᵀU| of the stacked singular vectors, task blocks outlined and named; right: the
    per-pair similarity ‖U_iᵀU_j‖_F / √k with the task names on both axes."""
    import numpy as np

    plt = _pyplot()
    blocks = np.asarray(similarity["blocks"])
    count, k = len(blocks), similarity["k"]
    side = min(max(5.0, 0.35 * count + 3), 11.0)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(2 * side + 1.5, side + 0.8))
    image = ax1.imshow(gram_abs, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    for edge in range(1, count):
        ax1.axhline(edge * k - 0.5, color="white", lw=0.6)
        ax1.axvline(edge * k - 0.5, color="white", lw=0.6)
    centres = [(i + 0.5) * k - 0.5 for i in range(count)]
    ax1.set_xticks(centres, tasks, rotation=90, fontsize=8)
    ax1.set_yticks(centres, tasks, fontsize=8)
    ax1.set_title(f"|UᵀU| of the stacked U, k = {k} per task")
    fig.colorbar(image, ax=ax1, fraction=0.046)
    image = ax2.imshow(blocks, cmap="magma", vmin=0, vmax=1)
    ax2.set_xticks(range(count), tasks, rotation=90, fontsize=8)
    ax2.set_yticks(range(count), tasks, fontsize=8)
    ax2.set_title("‖U_iᵀU_j‖_F / √k")
    if count <= 12:
        for i, row in enumerate(blocks):
            for j, value in enumerate(row):
                ax2.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                         color="black" if value > 0.5 else "white")
    fig.colorbar(image, ax=ax2, fraction=0.046)
    fig.suptitle(key)
    fig.tight_layout()
    save_figure(fig, path, inputs)
    plt.close(fig)
