"""`python cli.py ...` from a checkout: the same command group as the `explicam` console script.

The commands live in explicam/cli.py, inside the one installed import root (explicam),
so that installing explicam puts no module named `cli` into site-packages.
"""
from explicam.cli import main

if __name__ == "__main__":
    main()
