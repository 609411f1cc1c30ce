"""`python -m studio <command>`: the command line (studio.cli)."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from studio.cli import main

    sys.exit(main())
