"""Ray job entrypoint: `python -m jobs.prepare_data [...]` is `gptdist prepare [...]`."""

import sys

from gptdist.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
