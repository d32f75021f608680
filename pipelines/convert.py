"""`ddpm convert`: diffusers folders in (optionally registered in MLflow) and out.

    ddpm convert import --hub google/ddpm-cifar10-32 --out models/cifar10 --register   # → ddpm-cifar10, candidate
    ddpm convert import --folder /models/ddpm-bedroom-256 --dataset bedroom --out models/bedroom
    ddpm convert register --model models/bedroom                                       # a model folder or checkpoint
    ddpm convert export --model models:/ddpm-cifar10@champion --out /models/ours-diffusers

`--out` writes a model folder (config.json, ema.safetensors, ema.safetensors.sha256), which sample,
fid, export and register take wherever they take a checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from ddpm_core.checkpoint import save_model_folder
from ddpm_core.diffusers_bridge import DATASET_PRESETS, BridgeError, download_hub, export_folder, import_folder
from ddpm_core.presets import PRESETS
from pipelines.arguments import add_tracking_argument
from pipelines.job_runner import command_line, run_job

log = logging.getLogger("ddpm.convert")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    direction = parser.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    imports = direction.add_parser("import", formatter_class=parser.formatter_class,
                                    help="a diffusers folder or Hub repo → our model (and the registry)")
    source = imports.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", help="DDPMPipeline folder (unet/, scheduler/) or UNet2DModel")
    source.add_argument("--hub", metavar="REPO", help="a Hub repo, e.g. google/ddpm-cifar10-32 (huggingface_hub's "
                                                      "cache; HF_ENDPOINT and HF_HUB_OFFLINE apply)")
    imports.add_argument("--revision", default=None, help="with --hub: a branch, tag or commit to pin (default main)")
    preset = imports.add_mutually_exclusive_group()
    preset.add_argument("--preset", choices=sorted(PRESETS), help="register under this preset, with its variance "
                                                                  "(default: read from the folder)")
    preset.add_argument("--dataset", choices=sorted(DATASET_PRESETS), help="the same, by dataset")
    imports.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                         help="override a training setting of the preset, e.g. --set model.dropout=0.2 (repeatable; "
                              "default: the preset's, e.g. cifar10's 0.1); the architecture is the folder's")
    imports.add_argument("--register", action="store_true", help="register as ddpm-<preset>, alias candidate")
    imports.add_argument("--out", default=None, help="also write a model folder (config.json, ema.safetensors) here "
                                                     "(default: none)")
    add_tracking_argument(imports)
    registers = direction.add_parser("register", formatter_class=parser.formatter_class,
                                      help="a model folder or checkpoint → ddpm-<preset>, alias candidate")
    registers.add_argument("--model", required=True, help="a model folder or a checkpoint directory")
    add_tracking_argument(registers)
    exports = direction.add_parser("export", formatter_class=parser.formatter_class,
                                    help="our checkpoint, model folder or registered version → diffusers")
    exports.add_argument("--model", required=True, help="models:/..., a checkpoint directory or a model folder")
    exports.add_argument("--out", required=True, help="the diffusers folder to write, for "
                                                      "DDPMPipeline.from_pretrained")
    add_tracking_argument(exports)


def run(args: argparse.Namespace) -> int:
    return run_job({"import": import_model, "register": register_model, "export": export_model}[args.direction], args)


def import_model(args: argparse.Namespace) -> None:
    preset = DATASET_PRESETS[args.dataset] if args.dataset else args.preset
    if args.hub:
        folder = download_hub(args.hub, args.revision)
        source = {"source": "huggingface", "repo": args.hub, "revision": folder.name}  # the commit it resolved to
        model, config = import_folder(folder, preset, name=args.hub, overrides=args.set)
    else:
        if args.revision:
            raise BridgeError("--revision goes with --hub; a --folder has no revisions")
        source = {"source": "diffusers", "folder": args.folder}
        model, config = import_folder(args.folder, preset, overrides=args.set)
    log.info("imported %s as preset %s (%s)", args.hub or args.folder, config.preset, config.diffusion.variance)
    with tempfile.TemporaryDirectory(prefix="ddpm-import-") as scratch:
        folder = save_model_folder(Path(args.out) if args.out else Path(scratch), model, config)
        if args.register:
            _register(folder, config, source, args.tracking_uri)


def register_model(args: argparse.Namespace) -> None:
    from pipelines.mlflow_registry import open_model

    if args.model.startswith("models:/"):
        raise BridgeError(f"--model {args.model} is registered already; register takes a model folder or checkpoint")
    opened = open_model(args.model, args.tracking_uri)
    _register(Path(opened.resolved.split("@")[0]), opened.load()[1], {"source": opened.resolved}, args.tracking_uri)


def _register(folder: Path, config, tags: dict, tracking_uri: str | None) -> None:
    from pipelines.mlflow_registry import register, registered_name
    from pipelines.mlflow_tracking import connect, import_run, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    client = connect(uri)
    made = []  # the import's run, made only if no version has these weights and config yet

    def new_run() -> str:
        made.append(import_run(client, uri, config.preset, tags))
        return made[0]

    version = register(client, new_run, folder, config, tags)
    name = registered_name(config.preset)
    if made:
        client.set_terminated(made[0])
        log.info("registered %s version %s (alias candidate)", name, version)
    else:
        log.info("%s version %s has these weights and config already: reused it (alias candidate)", name, version)


def export_model(args: argparse.Namespace) -> None:
    from pipelines.mlflow_registry import open_model

    model, config = open_model(args.model, args.tracking_uri).load()
    log.info("wrote %s (DDPMPipeline.from_pretrained loads it)", export_folder(model, config, args.out))


def main(argv: list[str] | None = None) -> int:
    return command_line(__doc__.splitlines()[0], add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
