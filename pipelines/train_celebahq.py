"""Ray job: train the CelebA-HQ 256×256 model (preset celebahq256); see pipelines/train.py."""

import sys

from pipelines.train import main

if __name__ == "__main__":
    sys.exit(main(default_preset="celebahq256", presets=("celebahq256", "tiny", "demo")))
