"""Everything that touches files: where task vectors come from and where results go.

=================  ===================================================================================
``checkpoint``     the engine's view of inputs and outputs: ``Checkpoint`` (named tensors read one key at
                   a time), ``Sink`` (outputs written one key at a time), their in-memory versions
``safetensors``    the safetensors format by hand: lazy reader with a strict header parser, shard writer
``sources``        ``open_checkpoint``: safetensors files, HF folders (sharded), torch .pt/.bin files
``outputs``        the one guard and transaction of every output (never over an input, whole, locked)
``sink``           ``SafetensorsSink``: streamed, sharded, finite-checked outputs; ``save_checkpoint``, ``convert``
``tsvc``           TSV-C task libraries (``CompressedTasks``, ``save_compressed``, ``load_compressed``), read
                   lazily as task sources (``TsvcLibrary``) and extended in place (``append_compressed``)
``peft``           PEFT LoRA adapters in (``load_adapter``): factors and their exact SVDs
``peft_out``       merged LoRA adapters out (``AdapterSink``, ``MergedAdapter``): PEFT's saved format
``hf``             Hugging Face: model ids through the hub cache, configs and tokenizer files for outputs,
                   the keys transformers ignores on load
=================  ===================================================================================

Nothing here imports the engine, the methods or the command line.
"""
import importlib

_EXPORTS = {
    "checkpoint": ["Checkpoint", "DictCheckpoint", "DictSink", "Sink", "as_checkpoint"],
    "safetensors": ["SafetensorsCheckpoint"],
    "outputs": ["Output", "OutputLocked", "check_output", "write_file"],
    "sink": ["SafetensorsSink", "convert", "save_checkpoint"],
    "sources": ["INDEX_NAME", "TORCH_INDEX_NAME", "checkpoint_nbytes", "open_checkpoint"],
    "tsvc": ["CompressedTasks", "TsvcLibrary", "append_compressed", "load_compressed", "read_compressed_header",
             "save_compressed"],
    "peft_out": ["AdapterSink", "MergedAdapter"],
    "hf": ["is_hub_id", "loadable_files", "resolve_model"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    # lazy, so that `tsv_fast.io.outputs` (the output guard) loads without torch: the command line
    # checks paths before its heavy imports
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
