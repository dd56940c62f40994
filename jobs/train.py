"""Ray job entrypoint: `python -m jobs.train [...]` is `gptdist train [...]`."""

import sys

from gptdist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
