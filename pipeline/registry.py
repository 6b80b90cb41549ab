"""Every MLflow Model Registry call of the project: versions, their tags, the champion alias.

MLflow keeps no history of which version held an alias, so each version registered by
`pipeline retrain` carries its own decision as tags (`retrain.*`); the history of champions
is read back from those tags.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import PipelineError

CHAMPION = "champion"
DECISION = "retrain.decision"  # pending -> promote | keep; or abandoned after a crash
PENDING, PROMOTE, KEEP, ABANDONED = "pending", "promote", "keep", "abandoned"


@dataclass(frozen=True)
class Version:
    """A registered model version and its tags, as plain values."""

    version: str
    run_id: str
    created_ms: int
    tags: dict[str, str]

    @property
    def decision(self) -> str | None:
        return self.tags.get(DECISION)


def _version(mv: ModelVersion) -> Version:
    return Version(str(mv.version), mv.run_id or "", int(mv.creation_timestamp or 0), mv.tags)


def champion(name: str) -> Version | None:
    """The version the `champion` alias points to; None when there is none (or no model)."""
    client = MlflowClient()
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = model.aliases.get(CHAMPION)
    return None if version is None else _version(client.get_model_version(name, version))


def require_model(name: str) -> None:
    """Raise a one-line error naming the registered models there are, if `name` is not one."""
    try:
        MlflowClient().get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        names = sorted(m.name for m in MlflowClient().search_registered_models(max_results=100))
        raise PipelineError(
            f"registered model {name!r} does not exist; "
            f"registered models: {', '.join(names) or 'none'}"
        ) from None


def versions(name: str) -> list[Version]:
    """All versions of `name`, oldest first (every page of the search)."""
    client, found, token = MlflowClient(), [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return sorted((_version(mv) for mv in found), key=lambda v: int(v.version))


def load_model(name: str, version: str):
    """The native PyTorch module of one version (pt2 models load as an exported graph)."""
    return load_logged_model(f"models:/{name}/{version}")


def load_logged_model(model_uri: str):
    """The native PyTorch module of a logged model (e.g. models:/m-... from training).

    Downloaded into a folder removed once loaded: without `dst_path`, MLflow downloads into
    a new temporary folder it never removes, and a scheduled retrain (two loads a run)
    would leave two copies of the model in /tmp at every run.
    """
    with tempfile.TemporaryDirectory(prefix="pipeline-model-") as folder:
        return mlflow.pytorch.load_model(model_uri, dst_path=folder)


def register(name: str, model_uri: str, tags: dict[str, str]) -> Version:
    """A new version of `name` (created if needed) from a logged model, tagged, and READY."""
    mv = mlflow.register_model(model_uri, name, tags=tags)
    return _version(MlflowClient().get_model_version(name, mv.version))


def tag_version(name: str, version: str, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def record_decision(name: str, version: str, word: str, tags: dict[str, str]) -> None:
    """Write a decision's tags, the decision word itself last: until it is written the
    version reads `pending`, so a decision cut short is never taken for a whole one."""
    tag_version(name, version, {k: v for k, v in tags.items() if k != DECISION})
    tag_version(name, version, {DECISION: word})


def move_champion(name: str, version: str) -> None:
    """Point the `champion` alias at `version`: the one write that changes what is served."""
    MlflowClient().set_registered_model_alias(name, CHAMPION, version)
