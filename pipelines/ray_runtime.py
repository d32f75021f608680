"""Connecting a job to Ray: the cluster it was submitted to, or a local Ray bound to 127.0.0.1."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` / RAY_ADDRESS (as under `ray job submit`), else start a local Ray.

    `--address auto` joins a cluster that `ray start` runs on this machine; without an address the
    job never attaches to one by accident.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Loopback only: a laptop run must not open ports on the network.
        ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
                 log_to_driver=True)
    log.info("Ray resources: %s", ray.cluster_resources())


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
