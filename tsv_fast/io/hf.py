"""Hugging Face conventions: model ids through the hub's cache, the files that make an output folder
loadable with ``from_pretrained``, and the keys transformers ignores when it loads a model.

* ``resolve_model("org/name@rev")``: a path that exists is itself (a path always wins); otherwise a
  model id is snapshotted by ``huggingface_hub`` (safetensors weights, their index, configs and
  tokenizer files only), which honours its cache (``HF_HUB_CACHE``, ``HF_HOME``) and offline mode
  (``HF_HUB_OFFLINE=1``).
* ``loadable_files(folder, dtype)``: the configs and tokenizer files of a model folder to put beside
  merged weights (mergekit copies the tokenizer too), config.json's dtype set to the weights'.
* ``ignorable_patterns(folder)``: regexes of keys transformers drops on load for this model.

Nothing here imports torch; huggingface_hub and transformers load only when they are needed.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

#: Beside the weights of a model folder: what `merge` and `reconstruct` copy into a folder output.
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
               "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
               "chat_template.json", "preprocessor_config.json", "processor_config.json", "open_clip_config.json")
#: What a model id fetches: weights as safetensors (never pickles), their index, configs, tokenizer.
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "adapter_config.json", *MODEL_FILES]
#: Buffers older checkpoints saved and transformers drops for every model that has them.
ALWAYS_IGNORED = (r"(^|\.)position_ids$", r"rotary_emb\.inv_freq$")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")
_FILE_SUFFIXES = (".safetensors", ".tsvc", ".json", ".bin", ".pt", ".pth", ".yaml", ".yml", ".npy", ".png", ".csv")


def is_hub_id(text: str | os.PathLike) -> bool:
    """``org/name`` or ``org/name@revision`` that does not look like a file name."""
    text = os.fspath(text)
    return bool(_HUB_ID.match(text)) and not text.split("@", 1)[0].lower().endswith(_FILE_SUFFIXES)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def broken_import(exc: ImportError, name: str) -> str | None:
    """None when ``import name`` failed because the module is not installed; else why an installed
    module failed (seen: a Python whose ssl extension does not load breaks huggingface_hub, and with
    it transformers, peft and mergekit)."""
    if isinstance(exc, ModuleNotFoundError) and exc.name == name.split(".")[0]:
        return None
    return f"{type(exc).__name__}: {_first_line(exc)}"


def resolve_model(spec: str | os.PathLike) -> str:
    """A local path for ``spec``: itself when it exists or is no model id, else the hub snapshot of
    the id (downloaded once, then read from the cache; offline with ``HF_HUB_OFFLINE=1``)."""
    text = os.fspath(spec)
    if Path(text).exists() or not is_hub_id(text):
        return text
    repo, _, revision = text.partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        broken = broken_import(exc, "huggingface_hub")
        why = (f"needs huggingface_hub, which cannot be imported in this Python: {broken}" if broken
               else "needs huggingface_hub: pip install huggingface_hub")
        raise FileNotFoundError(f"{text}: no such file or folder (as a Hugging Face model id it {why})") from None
    try:
        folder = snapshot_download(repo, revision=revision or None, allow_patterns=HUB_PATTERNS,
                                   library_name="tsv_fast")
    except Exception as exc:  # offline and not cached, unknown repo or revision, network, gated: one line
        reason = _first_line(exc)
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") else ""
        raise FileNotFoundError(f"{text}: no such file or folder, and the Hugging Face model {text} could not be "
                                f"fetched{offline}: {reason}") from None
    if not any(Path(folder).glob("*.safetensors")):
        raise ValueError(f"{text}: the Hugging Face snapshot {folder} has no .safetensors weights (tsv_fast "
                         "fetches only those); download the model yourself and pass its folder")
    return folder


def loadable_files(folder: str | os.PathLike, dtype: str | None = None) -> dict[str, Path | bytes]:
    """{name: file to copy, or the content to write} for the ``MODEL_FILES`` of ``folder``; a
    transformers config.json gets ``dtype`` (e.g. "bfloat16") as its weights' dtype."""
    files: dict[str, Path | bytes] = {name: Path(folder) / name for name in MODEL_FILES
                                      if (Path(folder) / name).is_file()}
    config = files.get("config.json")
    if dtype is not None and config is not None:
        files["config.json"] = config_with_dtype(config, dtype)
    return files


def config_with_dtype(path: Path, dtype: str) -> bytes | Path:
    """config.json with its dtype set (``dtype`` and/or ``torch_dtype``, whichever it has; a
    transformers config without either gets ``torch_dtype``, which every version reads); other
    configs (timm's, unreadable ones) unchanged."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return path
    if not isinstance(config, dict) or not ({"dtype", "torch_dtype", "model_type"} & set(config)):
        return path
    present = [key for key in ("dtype", "torch_dtype") if key in config] or ["torch_dtype"]
    for key in present:
        config[key] = dtype
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def ignorable_patterns(folder: str | os.PathLike | None) -> list[str]:
    """Regexes of keys that transformers ignores when it loads the model of ``folder``: the
    ``_keys_to_ignore_on_load_unexpected`` / ``_missing`` of the classes its config.json names, and
    the buffers it drops for every model (``ALWAYS_IGNORED``); just the latter without transformers."""
    patterns = list(ALWAYS_IGNORED)
    try:
        config = json.loads((Path(folder) / "config.json").read_text()) if folder is not None else {}
        architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    except (OSError, ValueError, AttributeError):
        architectures = []
    if not architectures:
        return patterns
    try:
        import transformers
    except ImportError as exc:
        broken = broken_import(exc, "transformers")
        if broken:
            warnings.warn(f"transformers cannot be imported in this Python ({broken}): the keys it ignores "
                          f"when it loads {', '.join(architectures)} are unknown", stacklevel=2)
        return patterns
    for name in architectures:
        try:
            cls = getattr(transformers, name, None)
        except Exception:  # a model module whose optional dependency is missing: its patterns are unknown
            cls = None
        for attribute in ("_keys_to_ignore_on_load_unexpected", "_keys_to_ignore_on_load_missing"):
            patterns += [p for p in getattr(cls, attribute, None) or [] if isinstance(p, str)]
    return patterns
