"""Ray job: shard an LSUN LMDB (`--lmdb /data/bedroom_train_lmdb`) into WebDataset tars; see pipelines/shard.py."""

import sys

from pipelines.shard import main

if __name__ == "__main__":
    sys.exit(main(source="lsun"))
