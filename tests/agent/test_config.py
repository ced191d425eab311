"""Settings and job configs: YAML, environment, overrides, and errors that name the field."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config import Settings, load_dataclass, load_settings
from agent.errors import ConfigError


def test_defaults_live_under_dot_rlchat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RLCHAT_DATABASE_URL", raising=False)
    monkeypatch.delenv("RLCHAT_DATA_DIR", raising=False)
    monkeypatch.delenv("RLCHAT_CONFIG", raising=False)
    s = load_settings()
    assert s.data_dir == Path(".rlchat")
    assert s.database_url == "sqlite:///.rlchat/rlchat.db"
    assert s.max_text_chars == 32_000


def test_yaml_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "rlchat.yaml"
    cfg.write_text("data_dir: /from/yaml\nmax_text_chars: 100\nlikert_criteria: [a, b, c]\n")
    monkeypatch.setenv("RLCHAT_DATABASE_URL", "postgresql+psycopg://u@h/db")
    s = load_settings(cfg)
    assert (s.data_dir, s.max_text_chars, s.likert_criteria) == (
        Path("/from/yaml"),
        100,
        ["a", "b", "c"],
    )
    assert s.database_url == "postgresql+psycopg://u@h/db"
    monkeypatch.setenv("RLCHAT_DATA_DIR", "/from/env")
    assert load_settings(cfg).data_dir == Path("/from/env")
    assert load_settings(cfg, data_dir="/from/flag").data_dir == Path("/from/flag")


@pytest.mark.parametrize(
    ("yaml_text", "match"),
    [
        ("max_text_chars: lots\n", "Settings.max_text_chars"),
        ("max_text_chars: 0\n", "max_text_chars: must be >= 1"),
        ("colour: blue\n", "unknown field.*colour"),
        ("database_url: rlchat.db\n", "database_url.*not a URL"),
        ("- a list\n", "must hold a mapping"),
        ("a: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_settings_fail_fast_naming_the_field(
    tmp_path: Path, yaml_text: str, match: str
) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match):
        load_settings(cfg)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings("/nonexistent/rlchat.yaml")


@dataclass
class JobConfig:
    learning_rate: float = 1e-4
    """Step size."""
    epochs: int = 1
    """Passes over the data."""
    target_modules: list[str] | None = None
    """LoRA targets."""

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate: must be > 0, got {self.learning_rate}")


def test_job_config_from_yaml_and_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text("learning_rate: 0.001\nepochs: 2\n")
    job = load_dataclass(JobConfig, cfg, ["epochs=3", "target_modules=[q_proj, v_proj]"])
    assert job == JobConfig(learning_rate=0.001, epochs=3, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match="JobConfig.epochs"):
        load_dataclass(JobConfig, None, ["epochs=2.5"])
    with pytest.raises(ConfigError, match="learning_rate: must be > 0"):
        load_dataclass(JobConfig, None, ["learning_rate=-1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_dataclass(JobConfig, None, ["epochs"])


def test_settings_object_validates_directly() -> None:
    with pytest.raises(ConfigError, match="annotation_overlap"):
        Settings(annotation_overlap=0)
