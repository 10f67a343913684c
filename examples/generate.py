"""Main job: generate with and without T-GATE and print the speed-up (same as `tgate-fx generate`)."""

import sys

from tgate_fx.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
