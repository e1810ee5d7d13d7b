"""``python -m featx`` (and ``torchrun -m featx``) is the ``featx`` command."""
from featx.cli import main

main(prog_name="featx")
