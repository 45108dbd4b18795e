"""Everything that touches files: where task vectors come from and where results go.

=================  ===================================================================================
``checkpoint``     the engine's view of inputs and outputs: ``Checkpoint`` (named tensors read one key at
                   a time), ``Sink`` (outputs written one key at a time), their in-memory versions
``safetensors``    the safetensors format by hand: lazy reader with a strict header parser, shard writer
``sources``        ``open_checkpoint``: safetensors files, HF folders (sharded), torch .pt/.bin files
``sink``           ``SafetensorsSink``: streamed, sharded, atomic outputs; ``save_checkpoint``, ``convert``
``tsvc``           TSV-C task libraries (``CompressedTasks``, ``save_compressed``, ``load_compressed``)
``peft``           PEFT LoRA adapters (``load_adapter``): factors and their exact SVDs
=================  ===================================================================================

Nothing here imports the engine, the methods or the command line.
"""
from .checkpoint import Checkpoint, DictCheckpoint, DictSink, Sink, as_checkpoint
from .safetensors import SafetensorsCheckpoint
from .sink import SafetensorsSink, convert, save_checkpoint
from .sources import INDEX_NAME, TORCH_INDEX_NAME, checkpoint_files, checkpoint_nbytes, open_checkpoint
from .tsvc import CompressedTasks, load_compressed, read_compressed_header, save_compressed

__all__ = ["Checkpoint", "DictCheckpoint", "DictSink", "Sink", "as_checkpoint", "SafetensorsCheckpoint",
           "SafetensorsSink", "convert", "save_checkpoint", "INDEX_NAME", "TORCH_INDEX_NAME", "checkpoint_files",
           "checkpoint_nbytes", "open_checkpoint", "CompressedTasks", "load_compressed", "read_compressed_header",
           "save_compressed"]
