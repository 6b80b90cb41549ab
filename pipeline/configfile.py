"""YAML config files (experiment sweeps, retrain): read with `yaml.safe_load`, and their values
typed into PrepConfig and TrainConfig fields, each problem a one-line error naming file and key.
"""

from __future__ import annotations

import typing
from dataclasses import fields
from pathlib import Path

import yaml

from pipeline.config import DEVICES, LOSSES, MODELS, OPTIMIZERS, PrepConfig, TrainConfig
from pipeline.errors import PipelineError
from pipeline.steps import validate_prep

CHOICES = {"optimizer": OPTIMIZERS, "loss": LOSSES, "model": MODELS, "device": DEVICES}
TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name != "data")
PREP_KEYS = tuple(f.name for f in fields(PrepConfig))


class FileErrors:
    """Builds the one-line errors, each starting with the file name."""

    def __init__(self, path: Path | str) -> None:
        self.path = path

    def __call__(self, message: str) -> PipelineError:
        return PipelineError(f"{self.path}: {message}")

    def unknown_keys(self, mapping: dict, valid: tuple[str, ...], where: str) -> None:
        for key in mapping:
            if key not in valid:
                raise self(f"unknown key {key!r} in {where}; valid keys: {', '.join(valid)}")


def read_yaml(path: Path, what: str) -> tuple[str, object]:
    """The text of `path` and what it parses to; `what` names the file in errors."""
    if not path.is_file():
        raise PipelineError(f"{what} {str(path)!r} does not exist")
    text = path.read_text()
    try:
        return text, yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise PipelineError(f"{path}: not valid YAML{where}: {problem}") from None


def mapping(err: FileErrors, value: object, where: str) -> dict:
    """A section that must be a mapping; absent or empty is `{}`."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise err(f"key {where!r} must be a mapping of parameter: value")
    return value


def prep_config(err: FileErrors, value: object, where: str) -> PrepConfig:
    """A PrepConfig from the section `where`, defaults for missing keys."""
    section = mapping(err, value, where)
    err.unknown_keys(section, PREP_KEYS, where)
    hints = typing.get_type_hints(PrepConfig)
    cfg = PrepConfig(**{k: convert(err, f"{where}.{k}", v, hints[k]) for k, v in section.items()})
    try:
        validate_prep(cfg)
    except PipelineError as exc:
        raise err(f"{where}.{exc}") from None
    return cfg


def train_values(err: FileErrors, section: dict, where: str) -> dict[str, object]:
    """TrainConfig values from one mapping, each checked for name, type and choice."""
    err.unknown_keys(section, TRAIN_KEYS, where)
    return {k: train_value(err, f"{where}.{k}", k, v) for k, v in section.items()}


def train_value(err: FileErrors, where: str, key: str, value: object) -> object:
    value = convert(err, where, value, typing.get_type_hints(TrainConfig)[key])
    if key in CHOICES and value not in CHOICES[key]:
        raise err(f"{where} {value!r} is invalid; valid choices: {', '.join(CHOICES[key])}")
    return value


def convert(err: FileErrors, where: str, value: object, kind: object) -> object:
    """`value` as the dataclass field type `kind`; YAML's text-looking numbers are accepted."""
    optional = kind == (float | None)
    if optional and (value is None or (isinstance(value, str) and value.lower() == "auto")):
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise err(f"{where} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise err(f"{where} must be an integer, got {value!r}")
    if kind is float or optional:
        # PyYAML reads `1e-3` (no dot) as text, so numeric text is taken as the number it is.
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                pass
        extra = " or 'auto'" if optional else ""
        raise err(f"{where} must be a number{extra}, got {value!r}")
    if isinstance(value, str):
        return value
    raise err(f"{where} must be a string, got {value!r}")
