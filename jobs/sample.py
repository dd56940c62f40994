"""Ray job entrypoint: `python -m jobs.sample [...]` is `gptdist sample [...]`."""

import sys

from gptdist.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
