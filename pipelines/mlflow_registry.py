"""The MLflow model registry for the jobs: registering the EMA model, opening the model a job samples from
(a registered version, models:/name@alias or /version, a checkpoint, or a model folder: config.json +
ema.safetensors + ema.safetensors.sha256, as `ddpm convert import --out` writes), and every alias and
version-tag convention: `candidate`, `champion`, the scores, the scheduler's per-spec namespaces."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities.model_registry import ModelVersion
from mlflow.models.signature import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

import ddpm_core
from ddpm_core.checkpoint import (
    CONFIG,
    EMA_WEIGHTS,
    STATE,
    copy_model_folder,
    load_ema_unet,
    read_state,
    verify_model_folder,
)
from ddpm_core.config import Config
from ddpm_core.errors import UserError, first_line
from ddpm_core.sampling import SamplesError
from ddpm_core.storage import sha256_file
from pipelines import mlflow_model
from pipelines.mlflow_tracking import connect, redact, resolve_tracking_uri

# The registered model's data, inside the logged model: what sampling reads, and the version tags
# holding each file's sha256 as registered.
MODEL_FOLDER = "artifacts/model"
WEIGHTS_SHA_TAG = "ddpm.weights_sha256"
RECORDED_SHA256 = {CONFIG: "ddpm.config_sha256", EMA_WEIGHTS: WEIGHTS_SHA_TAG}
# A resolved model folder carries the sha256 of its weights and config.json (`<weights>+<config>`), so an actor
# elsewhere loads exactly that model.
FOLDER_SHA256 = "@sha256:"
CANDIDATE, CHAMPION = "candidate", "champion"  # every new version; the best verified FID of the owning spec
CHAMPION_SPEC = "ddpm.champion_spec"  # registered-model tag: the spec whose scheduler moves `champion`
EVAL = "ddpm.eval."  # + <digest>. + status, job, attempts, out, error, result_sha256, its score
PROMOTION = "ddpm.promotion."  # + <digest>. + decision, champion and the score: fid, champion_fid (or spec_fid, ...)


def registered_name(preset: str) -> str:
    return f"ddpm-{preset}"


def model_uri(name: str, version: int | str) -> str:
    return f"models:/{name}/{version}"


def resolve_model(reference: str, client) -> tuple[str, object | None]:
    """(a reference that cannot move, its ModelVersion or None): aliases become version numbers."""
    if reference.startswith("models:/"):
        name, _, selector = reference[len("models:/"):].partition("@")
        try:
            if selector:
                version = client.get_model_version_by_alias(name, selector)
            else:
                name, _, number = reference[len("models:/"):].partition("/")
                version = client.get_model_version(name, number)
        except Exception as error:  # noqa: BLE001 - MLflow raises several kinds for "not found"
            raise SamplesError(f"model {reference} does not exist: {first_line(error)}") from None
        return model_uri(version.name, version.version), version
    path = Path(reference).expanduser().resolve()
    if not path.is_dir():
        raise SamplesError(f"model {reference} is neither a models:/ URI, a checkpoint directory nor a model folder")
    if (path / CONFIG).is_file() and not (path / STATE).is_file():
        return f"{path}{FOLDER_SHA256}{folder_pin(path)}", None
    return f"{path}@step{read_state(path).step}", None


def folder_pin(path: str | Path) -> str:
    """`<weights sha256>+<config.json sha256>` of a model folder, both checked against its seal."""
    return f"{verify_model_folder(path)}+{sha256_file(Path(path) / CONFIG)}"


def load_model(resolved: str, tracking_uri: str):
    """(EMA U-Net in eval mode, its Config) for a reference from `resolve_model`.

    A registered version is read as data: its config.json and safetensors weights are downloaded and
    checked against the sha256 recorded when it was registered. The pyfunc code stored with it is
    never imported or run (anyone who can write to the registry could have put code there).
    """
    if resolved.startswith("models:/"):
        return _load_registered(resolved, tracking_uri)
    if FOLDER_SHA256 in resolved:
        path, digest = resolved.rsplit(FOLDER_SHA256, 1)
        if folder_pin(path) != digest:
            raise SamplesError(f"model folder {path}: its weights or config.json changed since the job resolved it "
                               f"(sha256 {digest[:16]})")
        return load_ema_unet(path)
    return load_ema_unet(resolved.rsplit("@step", 1)[0])


def _load_registered(resolved: str, tracking_uri: str):
    name, number = resolved[len("models:/"):].rsplit("/", 1)
    client = MlflowClient(tracking_uri)  # actors run elsewhere: they must be told where the registry is
    recorded = client.get_model_version(name, number).tags
    missing = [tag for tag in RECORDED_SHA256.values() if not recorded.get(tag)]
    if missing:
        raise SamplesError(f"{resolved} has no recorded sha256 ({', '.join(missing)}): it was not registered by "
                           "this version of ddpm-ray; register it again (`ddpm convert import --register` or a "
                           "training run) to sample from it")
    source = client.get_model_version_download_uri(name, number).rstrip("/")
    with tempfile.TemporaryDirectory(prefix="ddpm-registered-") as scratch:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/{MODEL_FOLDER}", dst_path=scratch,
                                                          tracking_uri=tracking_uri))
        for file, tag in RECORDED_SHA256.items():
            found = sha256_file(folder / file) if (folder / file).is_file() else "missing"
            if found != recorded[tag]:
                raise SamplesError(f"{resolved}: {file} does not match the sha256 recorded at registration "
                                   f"({found[:16]} found, {recorded[tag][:16]} recorded): the artifact was "
                                   "changed after registration; refusing to use it")
        return load_ema_unet(folder)


def weights_sha256(resolved: str, version) -> str:
    """The sha256 of the EMA weights a resolved model samples with (as registered, or of the checkpoint)."""
    if version is not None:
        return version.tags[WEIGHTS_SHA_TAG]
    if FOLDER_SHA256 in resolved:
        return resolved.rsplit(FOLDER_SHA256, 1)[1].split("+")[0]
    return sha256_file(Path(resolved.rsplit("@step", 1)[0]) / EMA_WEIGHTS)


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ddpm-ray")
    except PackageNotFoundError:
        return "unknown"


def register(client, run: str | Callable[[], str], checkpoint_dir: Path, config: Config, tags: dict) -> str:
    """Log the EMA model of a checkpoint or model folder in the run, register it as ddpm-<preset> with its
    files' sha256, alias `candidate`. Again for the same run and files (a re-run), the version it registered.
    `run` is a run id, or a function making the run (an import): then a version of any run with the same
    weights and config is reused, and no run is made.

    It is logged as a pyfunc (for users of `mlflow.pyfunc`); our jobs read only its data (`load_model`).
    """
    name = registered_name(config.preset)
    with tempfile.TemporaryDirectory(prefix="ddpm-model-") as scratch:
        model_dir = copy_model_folder(checkpoint_dir, Path(scratch) / "model", config)  # the registered data
        recorded = {tag: sha256_file(model_dir / file) for file, tag in RECORDED_SHA256.items()}
        version = registered_version(client, name, None if callable(run) else run, recorded)
        if version is None:
            info = _log_model(run() if callable(run) else run, model_dir, config, int(tags.get("steps", 0)))
            version = mlflow.register_model(info.model_uri, name,
                                            tags={**{k: str(v) for k, v in tags.items()}, **recorded}).version
    client.set_registered_model_alias(name, CANDIDATE, version)
    return version


def registered_version(client, name: str, run_id: str | None, recorded: dict[str, str]) -> str | None:
    """The version of `name` that run `run_id` (None: any run) registered with files of these sha256
    (RECORDED_SHA256 tags), or None."""
    query = f"name = '{name}'" + (f" and run_id = '{run_id}'" if run_id else "")
    for version in client.search_model_versions(query):
        if all(version.tags.get(tag) == digest for tag, digest in recorded.items()):
            return version.version
    return None


def _log_model(run_id: str, model_dir: Path, config: Config, step: int):
    """The model folder logged in the run as a pyfunc model (its code: pipelines/mlflow_model.py), at training
    step `step`: MLflow links the run's metrics of that step to the logged model (the final loss and quality,
    not the system metrics of step 0)."""
    r = config.model.resolution
    signature = ModelSignature(
        inputs=Schema([ColSpec("long", "index")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, r, r, 3))]),
        params=ParamSchema([ParamSpec("seed", "long", 0), ParamSpec("sampler", "string", "ddim"),
                            ParamSpec("steps", "long", 50), ParamSpec("eta", "double", 0.0)]),
    )
    with mlflow.start_run(run_id=run_id):
        return mlflow.pyfunc.log_model(
            name="model", python_model=mlflow_model.__file__, artifacts={"model": str(model_dir)},
            code_paths=[str(Path(ddpm_core.__file__).parent)], signature=signature, step=step,
            pip_requirements=["torch", "numpy", "safetensors", "pillow"])


@dataclass
class OpenedModel:
    """A model a job samples from, resolved so that it cannot move: what every job opens."""

    resolved: str  # models:/<name>/<version>, <folder>@sha256:<weights>+<config> or <checkpoint>@step<n>
    version: ModelVersion | None  # the registered version, if it is one
    tracking_uri: str
    client: MlflowClient | None  # None when no registry was needed

    def load(self):
        """(EMA U-Net in eval mode, its Config), verified against the recorded sha256."""
        return load_model(self.resolved, self.tracking_uri)

    @property
    def weights_sha256(self) -> str:
        return weights_sha256(self.resolved, self.version)

    @property
    def training_run_id(self) -> str | None:
        return self.version.run_id if self.version is not None and self.version.run_id else None


def open_model(reference: str, tracking_flag: str | None) -> OpenedModel:
    """Resolve `reference` (connecting to the registry only for a models:/ URI); `load()` then reads it."""
    tracking_uri = resolve_tracking_uri(tracking_flag)
    client = connect(tracking_uri) if reference.startswith("models:/") else None
    resolved, version = resolve_model(reference, client)
    return OpenedModel(resolved, version, tracking_uri, client)


def score_tag(result: dict, label: str) -> str:
    """The version tag of one kind of sample set's score, e.g. `fid/ddim-50-trailing/n50000/seed0/fp32`.

    One tag per kind of sample set, so that sets never overwrite each other; a pseudo-FID is never written
    under the name FID. Settings at the values the first tags were written with add nothing, so those tags
    keep their names.
    """
    options = "".join([f"-{result['spacing']}" if result["spacing"] != "linspace" else "",
                       f"-eta{result['eta']:g}" if result["eta"] else "", "" if result["clip"] else "-noclip"])
    kind = (f"{result['sampler']}-{result['steps']}{options}/n{result['num']}/seed{result['seed']}/"
            f"{'bf16' if result['bf16'] else 'fp32'}")
    return f"{label}/{kind}"


def tag_score(client: MlflowClient, version: ModelVersion, result: dict, label: str) -> None:
    """For people reading the registry: the score as a tag of the version it scores, and as a line of its
    description (the scheduler adds its promotion decision to that line)."""
    client.set_model_version_tag(version.name, version.version, score_tag(result, label), f"{result[label]:.4f}")
    describe_score(client, version.name, version.version, result, label, "by `ddpm fid`; the scheduler decides "
                                                                          "promotion")


SCORE_NAMES = {"fid": "FID", "spec_fid": "spec-FID", "pseudo_fid": "pseudo-FID (random-init network, not an FID)",
               "pixel_fd": "pixel FD (8x8 pixel features, a toy metric, not an FID)"}
DESCRIPTION_HEADER = "Scores of this version (lower is better), one line per kind of sample set:"


def describe_score(client: MlflowClient, name: str, version: int | str, result: dict, label: str, note: str) -> None:
    """Set the version description's line of this kind of sample set (`score_tag`): the score, sampler, N and
    `note` (who scored it, the promotion decision). Lines of other kinds are kept; the tags stay the record."""
    key = f"- `{score_tag(result, '').lstrip('/')}`:"
    line = f"{key} {SCORE_NAMES[label]} **{float(result[label]):.4f}**, N={result['num']}; {note}"
    current = client.get_model_version(name, str(version)).description or ""
    kept = [row for row in current.splitlines() if row.strip() and not row.startswith(key)]
    client.update_model_version(name, str(version), description="\n".join([*(kept or [DESCRIPTION_HEADER]), line]))


def spec_tags(tags: dict[str, str], namespace: str, digest: str) -> dict[str, str]:
    """A version's tags of one spec's namespace (EVAL or PROMOTION), the prefix removed."""
    prefix = f"{namespace}{digest}."
    return {key[len(prefix):]: value for key, value in tags.items() if key.startswith(prefix)}


def evaluations(client: MlflowClient, name: str, alias: str = CANDIDATE) -> dict[str, dict[str, str]]:
    """The scheduler's records for the version holding `alias`, by spec digest: its EVAL tags (status, out,
    scores) with the PROMOTION decision of the same spec."""
    version = client.get_model_version_by_alias(name, alias)
    digests = {key[len(EVAL):].split(".", 1)[0] for key in version.tags if key.startswith(EVAL)}
    return {digest: {**spec_tags(version.tags, EVAL, digest),
                     "decision": spec_tags(version.tags, PROMOTION, digest).get("decision", ""),
                     "version": version.version}
            for digest in digests}


def spec_key(namespace: str, digest: str, key: str) -> str:
    """The name of one version tag of a spec's namespace (EVAL or PROMOTION), e.g. `ddpm.eval.<digest>.status`."""
    return f"{namespace}{digest}.{key}"


class RegistryError(UserError):
    """A registered model the registry does not have, naming the store."""


def _once(what: str, call, done=None, permanent=None):
    return call()


def _not_found(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_DOES_NOT_EXIST" in text or "not found" in text.lower() or "INVALID_PARAMETER_VALUE" in text


class EvaluationRecords:
    """One registered model as the scheduler reads and writes it under one evaluation spec: its versions, the
    spec's `ddpm.eval.<digest>.*` and `ddpm.promotion.<digest>.*` version tags, `champion` and the spec owning it.

    Every call goes through `retry(what, call, done=None, permanent=None)`, the scheduler's backoff through
    transient errors. Writes are idempotent (a tag already holding the value is success): schedulers may race.
    """

    def __init__(self, client: MlflowClient, name: str, digest: str, tracking_uri: str, retry=_once):
        self.client, self.name, self.digest, self.tracking_uri, self.retry = client, name, digest, tracking_uri, retry

    def uri(self, version: int) -> str:
        return model_uri(self.name, version)

    def eval_key(self, key: str) -> str:
        return spec_key(EVAL, self.digest, key)

    def evals(self, version: ModelVersion) -> dict[str, str]:
        """The version's eval tags of this spec, the prefix removed."""
        return spec_tags(version.tags, EVAL, self.digest)

    def _registered_model(self):
        try:
            return self.client.get_registered_model(self.name)
        except Exception as error:  # noqa: BLE001 - MLflow raises several kinds for "not found"
            if "RESOURCE_DOES_NOT_EXIST" not in str(error) and "not found" not in str(error).lower():
                raise  # an outage, not an answer: retried
            raise RegistryError(f"registered model {self.name!r} does not exist in the MLflow registry at "
                                f"{redact(self.tracking_uri)}: {first_line(error)}") from None

    def versions(self) -> list[ModelVersion]:
        """Every version, oldest first; RegistryError if the registered model does not exist."""
        answer = {"permanent": lambda error: isinstance(error, RegistryError)}
        self.retry(f"reading the registered model {self.name}", self._registered_model, **answer)
        found = self.retry(f"listing the versions of {self.name}",
                           lambda: self.client.search_model_versions(f"name = '{self.name}'"))
        return sorted(found, key=lambda v: int(v.version))

    def champion_spec(self) -> str | None:
        """The spec whose scheduler moves `champion` (claimed with --owns-champion or --take-over-champion), or None."""
        return self.retry(f"reading the registered model {self.name}", self._registered_model,
                          permanent=lambda error: isinstance(error, RegistryError)).tags.get(CHAMPION_SPEC)

    def weights_sha256(self, version: int) -> str | None:
        """The sha256 of the version's EMA weights, as registered."""
        found = self.retry(f"reading {self.uri(version)}", lambda: self.client.get_model_version(self.name,
                                                                                                 str(version)))
        return found.tags.get(WEIGHTS_SHA_TAG)

    def alias_holder(self, alias: str) -> int | None:
        """The version holding `alias`, or None; an unreachable registry is an error, not "no holder"."""
        def read():
            try:
                return int(self.client.get_model_version_by_alias(self.name, alias).version)
            except Exception as error:  # noqa: BLE001 - MLflow answers a missing alias with an error
                if _not_found(error):
                    return None
                raise

        return self.retry(f"reading the alias {alias} of {self.name}", read)

    def champion(self) -> int | None:
        """The version holding `champion`, or None."""
        return self.alias_holder(CHAMPION)

    def record_evaluation(self, version: int, values: dict[str, object]) -> None:
        """Eval tags of this spec, written in order (callers put the deciding one, `status`, last)."""
        for key, value in values.items():
            self.set_tag(version, self.eval_key(key), str(value))

    def record_decision(self, version: int, values: dict[str, object], result=None) -> None:
        """Promotion tags of this spec, written in order (`decision` last); with the scored EvaluationResult, the
        decision also goes into the line of that score in the version's description."""
        for key, value in values.items():
            self.set_tag(version, spec_key(PROMOTION, self.digest, key), str(value))
        if result is not None and result.fids():
            self.retry(f"describing {self.name} v{version}", lambda: describe_score(
                self.client, self.name, version, result.to_json(), result.label,
                f"scheduler spec {self.digest}: {values['decision']}"))

    def set_tag(self, version: int, key: str, value: str) -> None:
        """Write one version tag idempotently: a tag that already holds `value` is success.

        Schedulers that race write the same new tag at once; MLflow's SQL store answers one of them
        with a unique-key conflict (HTTP 400) that its client does not retry. Read back and compare.
        """
        def holds_value() -> bool:
            return self.client.get_model_version(self.name, str(version)).tags.get(key) == value

        self.retry(f"setting tag {key} of {self.name} v{version}",
                   lambda: self.client.set_model_version_tag(self.name, str(version), key, value), holds_value)

    def claim_champion(self) -> None:
        """Record this spec as the one whose scheduler moves `champion` (the scheduler checks who may)."""
        self.retry(f"recording the champion spec of {self.name}",
                   lambda: self.client.set_registered_model_tag(self.name, CHAMPION_SPEC, self.digest))

    def move_champion(self, version: int) -> None:
        """`champion` to `version`."""
        self.retry(f"moving {CHAMPION} of {self.name} to v{version}",
                   lambda: self.client.set_registered_model_alias(self.name, CHAMPION, str(version)),
                   lambda: self.alias_holder(CHAMPION) == version)
