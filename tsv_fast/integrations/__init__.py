"""Bridges from other merging tools to tsv_fast's engine.

Nothing here is imported by ``import tsv_fast``: each bridge needs its tool, which is an optional
extra, and loads only when asked for.

* ``tsv_fast.integrations.mergekit``: TSV-M, Iso-C and Iso-CTS (and a TSV-C task rebuild) as mergekit
  merge methods (``pip install "tsv_fast[mergekit]"``); ``tsv-fast mergekit CONFIG OUT`` runs them.
"""
