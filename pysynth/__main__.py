"""``python -m pysynth`` runs the command line."""

from pysynth.cli import main

if __name__ == "__main__":
    main()
