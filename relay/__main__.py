"""``python -m relay``: the same command line as the ``relay`` script."""
from relay.cli import main

if __name__ == "__main__":
    main(prog_name="relay")
