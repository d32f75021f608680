"""Ray job: train an LSUN 256×256 model (default preset lsun_bedroom256); see pipelines/train.py."""

import sys

from pipelines.train import main

LSUN_PRESETS = ("lsun_bedroom256", "lsun_church256", "lsun_cat256", "lsun_bedroom256_large", "tiny", "demo")

if __name__ == "__main__":
    sys.exit(main(default_preset="lsun_bedroom256", presets=LSUN_PRESETS))
