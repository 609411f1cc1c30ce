"""`python -m studio <command>`: the command line (studio.cli)."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from studio import quiet_libraries
    from studio.cli import main

    quiet_libraries()

    sys.exit(main())
