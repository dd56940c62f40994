"""Ray job entrypoint: `python -m jobs.tune [...]` is `gptdist tune [...]`."""

import sys

from gptdist.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
