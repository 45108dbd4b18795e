"""Outputs written in parts by independent jobs (``tsv-fast merge --shard i/N``) and put together by
``tsv-fast finalize``: a merge over SLURM arrays, Kubernetes indexed jobs or ``xargs -P``, no rendezvous.

Part i of N of the output ``T`` is the folder ``T.parts/part-0000i-of-0000N/``: this part's shard files
and a manifest (``tsv-fast-part.json``): the plan it belongs to (the inputs with their sizes and
modification times, the options that change the result, the files' metadata with the package version,
N, and a digest of the whole key -> part assignment), its shards' keys and sizes; part 0 also keeps the
output's extra files (configs, tokenizer files), copied when it runs. A part is an output
of its own (io.outputs: guarded, locked, committed whole), so a rerun replaces it and a failed one
leaves nothing. ``finalize(T)`` checks that all N parts exist and belong to one plan, then commits the
model at ``T`` whole (the shards hard-linked, or copied, into its staging folder, named and indexed as
one process would) and removes the parts folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from .checkpoint import Sink
from .outputs import PART_MANIFEST, Output, check_output, resolve_inputs
from .sink import SafetensorsSink, Staged, commit_shards, output_layout

PART_FORMAT = "tsv-fast-part"
PART_VERSION = 1
EXTRA_PREFIX = "extra-"  # part 0 keeps the output's extra files (configs, tokenizer) under this prefix


def parts_folder(target: str | os.PathLike) -> Path:
    """Where the parts of output ``target`` are written: ``<target>.parts`` beside it."""
    target = Path(target)
    return target.parent / f"{target.name}.parts"


def part_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


def describe_inputs(inputs: Iterable[object]) -> list[dict]:
    """Every file a run reads (io.outputs.resolve_inputs) with its size and modification time."""
    files, _ = resolve_inputs(inputs)
    out = []
    for file in sorted(files):
        stat = file.stat()
        out.append({"path": str(file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return out


class PartSink(Sink):
    """Part ``part.index`` of ``part.count`` of the model output ``target``.

    ``part`` is the engine's ``Part`` (its ``assignment``, key -> part, is known once the run has
    planned); ``options`` are the settings that change the result (they enter the plan's identity);
    the other keywords are SafetensorsSink's, for the final output.
    """

    def __init__(self, target: str | os.PathLike, part, *, inputs: Iterable[object] = (),
                 options: Mapping[str, object] | None = None, max_shard_bytes: int | None = None,
                 out_dtype=None, extra_metadata: Mapping[str, str] | None = None,
                 extra_files: Mapping[str, str | os.PathLike | bytes] | None = None,
                 expected_bytes: int | None = None):
        inputs = list(inputs)
        self.target = check_output(target, inputs)  # the finished model must be allowed there too
        self.part, self.folder = part, parts_folder(self.target) / part_name(part.index, part.count)
        self.is_folder, self.stem = output_layout(target)
        if extra_files and not self.is_folder:
            raise ValueError(f"output {target} is a file; configs and tokenizer files need a folder output")
        self.extra_files = dict(extra_files or {})
        self.files = SafetensorsSink(self.folder, inputs=inputs, max_shard_bytes=max_shard_bytes, out_dtype=out_dtype,
                                     extra_metadata=extra_metadata, tag="part",
                                     expected_bytes=None if expected_bytes is None else expected_bytes // part.count)
        self.plan = {"count": part.count, "inputs": describe_inputs(inputs), "options": dict(options or {})}

    def write(self, key: str, tensor) -> None:
        self.files.write(key, tensor)

    def close(self, metadata: Mapping[str, str]) -> Path:
        try:
            staged = self.files.finish(metadata)
            written = {key for shard in staged for key in shard.keys}
            mine = {key for key, index in self.part.assignment.items() if index == self.part.index}
            if written != mine:  # the engine wrote another part's keys (or missed some): never commit that
                raise RuntimeError(f"part {self.part.index} of {self.part.count} wrote {len(written)} keys, "
                                   f"its plan assigns {len(mine)}")
            files = []
            for number, shard in enumerate(staged):
                name = f"shard-{number + 1:05d}.safetensors"
                os.rename(self.files.output.member(shard.name), self.files.output.member(name))
                files.append({"name": name, "keys": shard.keys, "size": shard.size,
                              "bytes": self.files.output.member(name).stat().st_size})
            if self.part.index == 0:  # the configs and tokenizer files travel with part 0, copied now
                for name, source in self.extra_files.items():
                    member = self.files.output.member(EXTRA_PREFIX + name)
                    member.write_bytes(source) if isinstance(source, bytes) else shutil.copyfile(source, member)
            meta = self.files.file_metadata(metadata)
            assignment = json.dumps(sorted(self.part.assignment.items()), separators=(",", ":"))
            plan = {**self.plan, "metadata": meta, "assignment": hashlib.sha256(assignment.encode()).hexdigest()}
            manifest = {"format": PART_FORMAT, "version": PART_VERSION, "part": self.part.index,
                        "count": self.part.count, "plan": plan, "plan_id": _digest(plan),
                        "output": {"stem": self.stem, "folder": self.is_folder, "extra_files": sorted(self.extra_files)},
                        "num_keys": len(self.part.assignment), "files": files,
                        "metadata": {"tsv_fast_version": meta["tsv_fast_version"]}}
            self.files.output.member(PART_MANIFEST).write_text(json.dumps(manifest, indent=1))
            self.files.output.commit()
        except BaseException:
            self.abort()
            raise
        return self.folder

    def abort(self) -> None:
        self.files.abort()


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_parts(target: str | os.PathLike) -> list[dict]:
    """The manifests of every part of ``target``, checked to form one complete plan (else ValueError)."""
    parts = parts_folder(target)
    how = f"write them with `tsv-fast merge ... -o {target} --shard I/N` (I = 0 .. N-1)"
    folders = sorted(parts.glob("part-*")) if parts.is_dir() else []
    if not folders:
        raise ValueError(f"no parts to finalize for {target}: {parts} holds none; {how}")
    manifests = []
    for folder in folders:
        file = folder / PART_MANIFEST
        try:
            manifest = json.loads(file.read_text())
            if manifest.get("format") != PART_FORMAT or manifest.get("version", 0) > PART_VERSION:
                raise ValueError("not a tsv-fast part manifest")
            int(manifest["part"]), int(manifest["count"]), dict(manifest["plan"]), list(manifest["files"])
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"{file}: not a readable part manifest ({exc}); remove {folder} and rerun that part") \
                from None
        manifests.append(manifest)
    first = manifests[0]
    for manifest in manifests[1:]:
        if manifest["plan_id"] != first["plan_id"]:
            raise ValueError(f"part {manifest['part']} of {manifest['count']} and part {first['part']} of "
                             f"{first['count']} come from different plans ({_difference(first['plan'], manifest['plan'])}); "
                             f"rerun the parts that are wrong with the inputs and options of the others, then finalize again")
    count = first["count"]
    have = {m["part"] for m in manifests}
    missing = [i for i in range(count) if i not in have]
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"{len(missing)} of {count} parts of {target} are missing (part {shown}); run "
                         f"`tsv-fast merge ... --shard I/{count}` for them, then finalize again (nothing was written)")
    seen: set[str] = set()
    for manifest in manifests:
        folder = parts / part_name(manifest["part"], count)
        for entry in manifest["files"]:
            file = folder / entry["name"]
            if not file.is_file() or file.stat().st_size != entry["bytes"]:
                raise ValueError(f"{file} is missing or changed since part {manifest['part']} was written; "
                                 "rerun that part")
            if seen & set(entry["keys"]):
                raise ValueError(f"{file}: key {sorted(seen & set(entry['keys']))[0]!r} is also in another part")
            seen |= set(entry["keys"])
    if len(seen) != first["num_keys"]:
        raise ValueError(f"the parts of {target} hold {len(seen)} keys, the plan has {first['num_keys']}")
    for name in first["output"]["extra_files"]:
        file = parts / part_name(0, count) / (EXTRA_PREFIX + name)
        if not file.is_file():
            raise ValueError(f"{file} is missing since part 0 was written; rerun part 0")
    return manifests


def _difference(a: Mapping, b: Mapping) -> str:
    """The first thing that differs between two part plans, in words."""
    if a["count"] != b["count"]:
        return f"N = {a['count']} vs {b['count']}"
    if a["inputs"] != b["inputs"]:
        paths = {entry["path"]: entry for entry in b["inputs"]}
        for entry in a["inputs"]:
            other = paths.get(entry["path"])
            if other != entry:
                return f"input {entry['path']} " + ("is not an input of the other" if other is None else
                                                   "has another size or modification time")
        return "they read different input files"
    for field in ("options", "metadata"):
        for key in sorted(set(a[field]) | set(b[field])):
            if a[field].get(key) != b[field].get(key):
                return f"{key}: {a[field].get(key)!r} vs {b[field].get(key)!r}"
    return "their key -> part assignments differ"


def finalize(target: str | os.PathLike, *, keep_parts: bool = False) -> Path:
    """Put the parts of ``target`` together into the model output, committed whole; see the module
    docstring. Returns the output's path (the index for a sharded file output)."""
    target = Path(target)
    manifests = sorted(read_parts(target), key=lambda m: m["part"])
    first = manifests[0]
    parts, out = parts_folder(target), first["output"]
    inputs = [entry["path"] for entry in first["plan"]["inputs"]]
    output = Output(target, inputs=inputs, folder=out["folder"])
    staged = []
    try:
        for manifest in manifests:
            folder = parts / part_name(manifest["part"], first["count"])
            for entry in manifest["files"]:
                name = f".part{manifest['part']:05d}-{entry['name']}.staged"
                _link_or_copy(folder / entry["name"], output.member(name))
                staged.append(Staged(name, entry["keys"], entry["size"]))
        extras = {name: parts / part_name(0, first["count"]) / (EXTRA_PREFIX + name) for name in out["extra_files"]}
        names = commit_shards(output, out["stem"], staged, first["plan"]["metadata"], extras)
    except BaseException:
        output.abort()
        raise
    if not keep_parts:
        shutil.rmtree(parts, ignore_errors=True)
    if len(names) > 1 and not out["folder"]:
        return target.parent / (out["stem"] + ".safetensors.index.json")
    return target


def _link_or_copy(source: Path, member: Path) -> None:
    """A hard link costs nothing and leaves the part intact until the commit; across filesystems, a copy."""
    try:
        os.link(source, member)
    except OSError:
        shutil.copyfile(source, member)
