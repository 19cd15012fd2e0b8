"""``python -m llave_ds.bench ...`` (also what ``--ranks N`` re-launches under torchrun)."""
import sys

from llave_ds.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
