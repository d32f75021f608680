"""The jobs of ddpm-ray, their faces and the owners of the outside systems (docs/architecture.md).

Rules (tests/test_layers.py): a job is a page and imports no other job; only the faces (cli, demo, the
dataset alias scripts) import jobs; what two jobs share lives in ddpm_core or in an I/O-free shared module
here. Only pipelines/mlflow_* import mlflow and only pipelines/ray_* import ray. Every error a user can fix
is a ddpm_core.errors.UserError, turned into one line and exit status 2 by job_runner.run_job alone.
"""

import os

# Ray 2.60's token authentication stays on for every job, client and local cluster of ours. Set here,
# before any job imports Ray: Ray reads the mode once, at import. RAY_AUTH_MODE=disabled opts out.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# A Ray this machine starts for itself (a job without --address, the demo, the tests) listens on 127.0.0.1 only:
# in Ray's single-machine mode (its default on macOS and Windows) a node of 127.0.0.1 keeps that address and
# every server of it binds there; otherwise Ray 2.60 on Linux swaps in the machine's address and listens on
# all interfaces. Joining a cluster at its address is unaffected; docs/roles.md, "Local Ray".
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
