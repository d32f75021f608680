"""`ddpm convert`: diffusers folders in (optionally registered in MLflow) and out.

    ddpm convert import --folder /models/ddpm-cifar10-32 --register          # → ddpm-cifar10, alias candidate
    ddpm convert export --model models:/ddpm-cifar10@champion --out /models/ours-diffusers
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from ddpm_core.checkpoint import EMA_WEIGHTS, CheckpointError
from ddpm_core.diffusers_bridge import BridgeError, export_folder, import_folder
from ddpm_core.sampling import SamplesError

log = logging.getLogger("ddpm.convert")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    direction = parser.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    imports = direction.add_parser("import", help="a diffusers folder → our model (and the MLflow registry)")
    imports.add_argument("--folder", required=True, help="DDPMPipeline folder (unet/, scheduler/) or UNet2DModel")
    imports.add_argument("--register", action="store_true", help="register as ddpm-<preset>, alias candidate")
    imports.add_argument("--out", default=None, help="also write our safetensors + config.json here")
    imports.add_argument("--tracking-uri", default=None)
    exports = direction.add_parser("export", help="our checkpoint or registered version → a diffusers folder")
    exports.add_argument("--model", required=True, help="models:/... or a checkpoint directory")
    exports.add_argument("--out", required=True, help="folder for DDPMPipeline.from_pretrained")
    exports.add_argument("--tracking-uri", default=None)


def run(args: argparse.Namespace) -> int:
    from pipelines.ray_runtime import configure_logging
    from pipelines.tracking import TrackingError

    configure_logging()
    try:
        (import_model if args.direction == "import" else export_model)(args)
    except (BridgeError, CheckpointError, SamplesError, TrackingError, OSError) as error:
        log.error("%s", error)
        return 2
    return 0


def import_model(args: argparse.Namespace) -> None:
    from pipelines.tracking import connect, experiment_id, resolve_tracking_uri
    from pipelines.registry import register

    model, config = import_folder(args.folder)
    log.info("imported %s as preset %s (%s)", args.folder, config.preset, config.diffusion.variance)
    with tempfile.TemporaryDirectory(prefix="ddpm-import-") as scratch:
        folder = Path(args.out) if args.out else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / EMA_WEIGHTS))
        (folder / "config.json").write_text(config.to_json())
        if args.register:
            uri = resolve_tracking_uri(args.tracking_uri)
            client = connect(uri)
            run = client.create_run(experiment_id(client, "ddpm-imports", uri), run_name=f"import-{config.preset}",
                                    tags={"source": str(args.folder)})
            version = register(client, run.info.run_id, folder, config, {"source": "diffusers", "folder": args.folder})
            client.set_terminated(run.info.run_id)
            log.info("registered ddpm-%s version %s (alias candidate)", config.preset, version)


def export_model(args: argparse.Namespace) -> None:
    from pipelines.registry import load_model, resolve_model
    from pipelines.tracking import connect, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    resolved, _ = resolve_model(args.model, connect(uri) if args.model.startswith("models:/") else None)
    model, config = load_model(resolved, uri)
    log.info("wrote %s (DDPMPipeline.from_pretrained loads it)", export_folder(model, config, args.out))
