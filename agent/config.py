"""Typed configuration: one dataclass per concern, loaded from YAML and the environment.

`Settings` is the application's config (database, data directory, limits, chat and UI defaults).
`load_dataclass` is the one loader every job config (`SFTConfig`, `PPOConfig`, ...) reuses:
YAML file, then ``--set key=value`` overrides, then validation in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from agent.errors import ConfigError

T = TypeVar("T")

ENV_DATABASE_URL = "RLCHAT_DATABASE_URL"
ENV_DATA_DIR = "RLCHAT_DATA_DIR"
ENV_CONFIG = "RLCHAT_CONFIG"


@dataclass
class Settings:
    """Application settings. Every field can be set in YAML; two also from the environment."""

    data_dir: Path = Path(".rlchat")
    """Where models, runs, logs and the default SQLite file live (env: RLCHAT_DATA_DIR)."""
    database_url: str = ""
    """SQLAlchemy URL; empty means sqlite:///<data_dir>/rlchat.db (env: RLCHAT_DATABASE_URL)."""
    max_text_chars: int = 32_000
    """Longest message, comment or system prompt accepted, in characters."""
    sqlite_busy_timeout_ms: int = 30_000
    """How long a SQLite writer waits for the lock before failing."""
    system_prompt: str = "You are a friendly, helpful assistant."
    """Default system prompt of new conversations."""
    likert_criteria: list[str] = field(default_factory=lambda: ["helpfulness", "harmlessness"])
    """Criteria annotators score from 1 to 5."""
    annotation_overlap: int = 2
    """How many different annotators should rate each reply."""
    annotation_lease_s: int = 600
    """How long an item served to one annotator is held back from others."""
    guidelines: str = (
        "Rate the **assistant's last reply** given the conversation so far.\n\n"
        "- *Helpfulness*: does it answer, stay on topic and keep the conversation going?\n"
        "- *Harmlessness*: is it polite, safe and free of insults?\n"
    )
    """Annotation guidelines shown to annotators (markdown)."""

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'rlchat.db'}"
        if "://" not in self.database_url:
            raise ConfigError(
                f"database_url: {self.database_url!r} is not a URL; expected e.g. "
                "sqlite:///path/to/rlchat.db or postgresql+psycopg://user@host:5432/db"
            )
        if self.max_text_chars < 1:
            raise ConfigError(f"max_text_chars: must be >= 1, got {self.max_text_chars}")
        if self.annotation_overlap < 1:
            raise ConfigError(f"annotation_overlap: must be >= 1, got {self.annotation_overlap}")
        if not self.likert_criteria:
            raise ConfigError("likert_criteria: give at least one criterion")

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from a YAML file (or $RLCHAT_CONFIG), then the environment, then `overrides`."""
    path = path or os.environ.get(ENV_CONFIG)
    values: dict[str, Any] = read_yaml(path) if path else {}
    if os.environ.get(ENV_DATA_DIR):
        values["data_dir"] = os.environ[ENV_DATA_DIR]
    if os.environ.get(ENV_DATABASE_URL):
        values["database_url"] = os.environ[ENV_DATABASE_URL]
    values.update({k: v for k, v in overrides.items() if v is not None})
    return build_dataclass(Settings, values)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from `path`, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value")
    return data


def build_dataclass(cls: type[T], values: dict[str, Any]) -> T:
    """`cls(**values)` with unknown keys and wrongly typed values reported by field name."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; "
            f"known fields are {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    coerced = {name: _coerce(cls.__name__, name, hints[name], v) for name, v in values.items()}
    try:
        return cls(**coerced)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from exc


def load_dataclass(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """A job config from an optional YAML file plus ``key=value`` overrides (values parsed as YAML)."""
    values = read_yaml(path) if path else {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        values[key.strip()] = yaml.safe_load(raw)
    return build_dataclass(cls, values)


def _coerce(owner: str, name: str, hint: Any, value: Any) -> Any:
    """Convert YAML/CLI scalars to the declared type, or fail naming the field."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        hint = non_none[0] if len(non_none) == 1 else hint
        origin = typing.get_origin(hint)
    if value is None:
        raise ConfigError(f"{owner}.{name}: must not be empty")
    try:
        if hint is Path:
            return Path(value)
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{value!r} is not a boolean")
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"{value!r} is not an integer")
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError(f"{value!r} is not a number")
            return float(value)
        if hint is str:
            if not isinstance(value, str | int | float):
                raise ValueError(f"{value!r} is not a string")
            return str(value)
        if origin is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError(f"{value!r} is not a list")
            return list(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{owner}.{name}: {exc}") from exc
    return value
