"""The engine: task sources -> plan -> per-group chunks -> method -> sink.

=============  =====================================================================================
``sources``    ``TaskSource`` and ``DenseTasks`` (full checkpoints): layout, elementwise task vectors,
               memory-budgeted chunks with read-ahead, each task's top-k factors and the task sum
``adapters``   ``AdapterTasks``: the same for PEFT LoRA adapters, from their low-rank factors
``tsvc``       ``LibraryTasks``: stored tasks of a TSV-C library, from their factors
``plan``       which keys a method factors (same-shape groups), combines elementwise or passes through
``run``        the driver (``run``), the backend choice, the run metadata
``report``     ``Report`` / ``LayerReport``: ranks, κ of the stacks, STI, key lists
=============  =====================================================================================
"""
