"""Ray jobs of ddpm-ray: thin wrappers that build Ray programs from ddpm_core pieces and talk to MLflow."""

import os

# Ray 2.60's token authentication stays on for every job, client and local cluster of ours. Set here,
# before any job imports Ray: Ray reads the mode once, at import. RAY_AUTH_MODE=disabled opts out.
os.environ.setdefault("RAY_AUTH_MODE", "token")
