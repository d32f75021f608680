"""Ray job: shard a CelebA-HQ folder or zip (1024² or 256², BOX to 256) into WebDataset tars; see pipelines/shard.py."""

import sys

from pipelines.shard import main

if __name__ == "__main__":
    sys.exit(main(source="celebahq"))
