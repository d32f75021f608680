"""Ray jobs of ddpm-ray: thin wrappers that build Ray programs from ddpm_core pieces and talk to MLflow."""
