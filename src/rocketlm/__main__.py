"""``python -m rocketlm ...`` (and ``torchrun --nproc-per-node N -m rocketlm compress ...``)."""
import sys

from rocketlm.cli import main

if __name__ == "__main__":
    sys.exit(main())
