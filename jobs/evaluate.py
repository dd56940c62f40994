"""Ray job entrypoint: `python -m jobs.evaluate [...]` is `gptdist eval [...]`."""

import sys

from gptdist.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
