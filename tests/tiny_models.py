"""The tiny-vit checkpoints several test modules save to disk: the base and T fine-tunes of
``synthetic.checkpoints("tiny-vit", T)`` as pre.safetensors and ft<i>.safetensors in one folder."""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from tsv_fast import synthetic


def save_tiny(folder: Path, num_tasks: int):
    """(base state dict, fine-tune state dicts, fine-tune paths); the base is folder/pre.safetensors."""
    pre, fts = synthetic.checkpoints("tiny-vit", num_tasks)
    save_file(pre, str(folder / "pre.safetensors"))
    paths = []
    for i, ft in enumerate(fts):
        paths.append(folder / f"ft{i}.safetensors")
        save_file(ft, str(paths[-1]))
    return pre, fts, paths
