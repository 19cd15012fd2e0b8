"""``python -m llave_ds.eval``: the same as ``llave-ds eval``."""
import sys

from llave_ds.eval.cli import main

sys.exit(main())
