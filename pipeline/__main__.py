"""``python -m pipeline``: see ``pipeline.cli``."""

import sys

from pipeline.cli import main

if __name__ == "__main__":  # worker processes (prepare/infer --workers) import this module without running it
    sys.exit(main())
