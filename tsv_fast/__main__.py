"""`python -m tsv_fast` runs the tsv-fast command line."""
from tsv_fast.cli import main

main()
