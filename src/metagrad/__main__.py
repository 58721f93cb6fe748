"""``python -m metagrad`` (and ``torchrun ... -m metagrad run ...``): the ``metagrad`` command line."""
import sys

from .cli import main

if __name__ == "__main__":  # not when a spawned worker process (run(jobs=N)) imports it as __mp_main__
    sys.exit(main())
