"""``python -m featx``: the ``featx`` command; also what ``torchrun -m featx`` runs per rank."""
from featx.cli import main

if __name__ == "__main__":
    main(prog_name="featx")
