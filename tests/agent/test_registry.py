"""ModelRegistry: files under <data_dir>/models/<id>/, crash-safe add, resolve, deploy, rollback,
and the `rlchat models` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import event

from agent.config import Settings
from agent.errors import NotFoundError, ValidationError
from agent.registry import ModelRegistry, PolicySpec
from agent.store.api import Store
from rlchat.cli import main as cli_main


def fake_base(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (directory / "model.safetensors").write_bytes(b"weights")
    return directory


def fake_adapter(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (directory / "adapter_model.safetensors").write_bytes(b"lora")
    return directory


@pytest.fixture
def registry(store: Store, settings: Settings) -> ModelRegistry:
    return ModelRegistry(store, settings)


def model_dirs(settings: Settings) -> list[str]:
    return (
        sorted(p.name for p in settings.models_dir.iterdir())
        if settings.models_dir.exists()
        else []
    )


def test_add_copies_files_under_the_version_id(registry, settings, tmp_path):
    src = fake_base(tmp_path / "src")
    version_id = registry.add("base", src, name="tiny", metrics={"params": 3})
    mv = registry.get(version_id)
    assert Path(mv.path) == (settings.models_dir / str(version_id)).resolve()
    assert (Path(mv.path) / "model.safetensors").read_bytes() == b"weights"
    assert (mv.kind, mv.name, mv.status, mv.metrics) == ("base", "tiny", "candidate", {"params": 3})
    assert model_dirs(settings) == [str(version_id)]  # no temp directory left behind


def test_hub_id_base_is_registered_without_copy(registry, settings):
    version_id = registry.add("base", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert registry.resolve(version_id) == PolicySpec("HuggingFaceTB/SmolLM2-135M-Instruct", [])
    assert model_dirs(settings) == []


@pytest.mark.parametrize(
    ("kind", "make", "parent", "error", "match"),
    [
        ("base", None, False, NotFoundError, "looked for a model directory at"),
        ("sft", fake_adapter, False, ValidationError, "parent_id"),
        ("sft", fake_base, True, ValidationError, "adapter_config.json"),
        ("base", fake_adapter, False, ValidationError, "config.json"),
        ("policy", fake_base, False, ValidationError, "kind"),
    ],
)
def test_bad_add_stores_nothing(
    registry, store, settings, tmp_path, kind, make, parent, error, match
):
    base_id = registry.add("base", fake_base(tmp_path / "base")) if parent else None
    src = make(tmp_path / "src") if make else tmp_path / "no" / "such" / "dir"
    before = store.counts()["model_versions"]
    with pytest.raises(error, match=match) as info:
        registry.add(kind, src, parent_id=base_id)
    if make is None:
        assert str(src) in str(info.value)  # the message lists what was looked for
    assert store.counts()["model_versions"] == before
    assert model_dirs(settings) == ([str(base_id)] if parent else [])


def test_failed_commit_leaves_no_row_and_no_files(registry, store, settings, tmp_path):
    def fail(_session):
        raise RuntimeError("crash at commit")

    event.listen(store.sessions, "before_commit", fail)
    try:
        with pytest.raises(RuntimeError, match="crash at commit"):
            registry.add("base", fake_base(tmp_path / "src"))
    finally:
        event.remove(store.sessions, "before_commit", fail)
    assert store.counts()["model_versions"] == 0
    assert model_dirs(settings) == []


def test_orphan_directory_from_a_crash_is_replaced(registry, settings, tmp_path):
    orphan = settings.models_dir / "1"
    orphan.mkdir(parents=True)
    (orphan / "stale.bin").write_bytes(b"half written")
    version_id = registry.add("base", fake_base(tmp_path / "src"))
    assert version_id == 1
    files = sorted(p.name for p in Path(registry.get(version_id).path).iterdir())
    assert files == ["config.json", "model.safetensors"]


def test_resolve_walks_parents_bottom_up(registry, tmp_path):
    base = registry.add("base", fake_base(tmp_path / "base"))
    sft = registry.add("sft", fake_adapter(tmp_path / "sft"), parent_id=base)
    ppo = registry.add("ppo", fake_adapter(tmp_path / "ppo"), parent_id=sft)
    reward = registry.add("reward", fake_base(tmp_path / "rm"), parent_id=sft)
    paths = {v: registry.get(v).path for v in (base, sft, ppo)}
    assert registry.resolve(base) == PolicySpec(paths[base], [])
    assert registry.resolve(sft) == PolicySpec(paths[base], [paths[sft]])
    assert registry.resolve(ppo) == PolicySpec(paths[base], [paths[sft], paths[ppo]])
    with pytest.raises(ValidationError, match="reward model, not a policy"):
        registry.resolve(reward)
    with pytest.raises(ValidationError, match="sits on a policy"):
        registry.add("ppo", fake_adapter(tmp_path / "ppo2"), parent_id=reward)
    with pytest.raises(NotFoundError, match="no model version with id 999"):
        registry.resolve(999)


def test_deploy_keeps_exactly_one_and_rollback_returns(registry, store, tmp_path):
    base = registry.add("base", fake_base(tmp_path / "base"))
    sft = registry.add("sft", fake_adapter(tmp_path / "sft"), parent_id=base)
    assert registry.deployed() is None
    registry.deploy(base)
    registry.deploy(sft)
    statuses = {mv.id: mv.status for mv in registry.versions()}
    assert statuses == {base: "retired", sft: "deployed"}
    assert registry.rollback().id == base
    assert {mv.id: mv.status for mv in registry.versions()} == {
        base: "deployed",
        sft: "rolled_back",
    }


def test_deploy_with_missing_files_does_not_move_the_pointer(registry, tmp_path):
    import shutil

    base = registry.add("base", fake_base(tmp_path / "base"))
    sft = registry.add("sft", fake_adapter(tmp_path / "sft"), parent_id=base)
    registry.deploy(base)
    shutil.rmtree(registry.get(sft).path)
    with pytest.raises(NotFoundError, match="adapter_config.json"):
        registry.deploy(sft)
    assert registry.deployed().id == base


def test_rollback_to_a_version_whose_files_are_gone_is_refused(registry, tmp_path):
    import shutil

    base = registry.add("base", fake_base(tmp_path / "base"))
    sft = registry.add("sft", fake_adapter(tmp_path / "sft"), parent_id=base)
    registry.deploy(base)
    registry.deploy(sft)
    shutil.rmtree(registry.get(base).path)
    with pytest.raises(NotFoundError, match="model files missing.*config.json"):
        registry.rollback()
    assert registry.deployed().id == sft


def test_models_cli_list_show_deploy_rollback(sqlite_settings, tmp_path, capsys):
    data = ["--data-dir", str(sqlite_settings.data_dir)]
    assert cli_main([*data, "models", "list"]) == 0
    assert "rlchat starter build" in capsys.readouterr().out
    assert (
        cli_main([*data, "models", "add", "base", str(fake_base(tmp_path / "b")), "--name", "b"])
        == 0
    )
    src = str(fake_adapter(tmp_path / "a"))
    assert cli_main([*data, "models", "add", "sft", src, "--parent", "1"]) == 0
    assert cli_main([*data, "models", "deploy", "1"]) == 0
    assert cli_main([*data, "models", "deploy", "2"]) == 0
    capsys.readouterr()
    assert cli_main([*data, "models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["id", "kind", "status", "parent", "name", "created", "path"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["1", "base", "retired"],
        ["2", "sft", "deployed"],
    ]
    assert cli_main([*data, "models", "show", "2"]) == 0
    out = capsys.readouterr().out
    assert "+ adapter" in out and "status    deployed" in out
    assert cli_main([*data, "models", "rollback"]) == 0
    assert "model version 1" in capsys.readouterr().out
    assert cli_main([*data, "models", "show", "7"]) == 2
    assert "no model version with id 7" in capsys.readouterr().err
