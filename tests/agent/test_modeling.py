"""Model loading, tokenizer preparation, chat encoding and the adapter-stacking Policy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from agent.errors import ConfigError, NotFoundError, ValidationError
from agent.modeling import (
    DEFAULT_CHAT_TEMPLATE,
    Policy,
    default_dtype,
    encode_chat,
    end_of_turn_ids,
    load_base,
    load_tokenizer,
    pick_device,
)
from agent.tiny import build_tiny_adapter

CHAT = [
    {"role": "system", "content": "Be nice."},
    {"role": "user", "content": "hi how are you"},
    {"role": "assistant", "content": "good thanks, you?"},
    {"role": "user", "content": "fine"},
]


def make_adapter(
    model: torch.nn.Module, out_dir: Path, seed: int, targets=("q_proj", "v_proj")
) -> str:
    return str(build_tiny_adapter(model, out_dir, seed=seed, targets=targets, alpha=8))


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    fresh = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # noqa: E731
    wide = LlamaConfig(
        vocab_size=512, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=6,
    )  # fmt: skip
    return {
        "a": make_adapter(fresh(), root / "a", seed=1),
        "b": make_adapter(fresh(), root / "b", seed=2, targets=("q_proj", "o_proj")),
        "c": make_adapter(fresh(), root / "c", seed=4),
        "wide": make_adapter(LlamaForCausalLM(wide), root / "wide", seed=3),
    }


def last_logits(policy: Policy) -> torch.Tensor:
    ids = torch.tensor([encode_chat(policy.tokenizer, CHAT)], device=policy.device)
    with torch.no_grad():
        return policy.model(ids).logits[0, -1].float().cpu()


def test_tiny_model_loads_with_distinct_pad_and_left_padding(tiny_model_dir: Path) -> None:
    model, tokenizer = load_base(tiny_model_dir, device="cpu")
    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert not model.training
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert end_of_turn_ids(tokenizer) == [tokenizer.eos_token_id]


def test_device_and_dtype_choice() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device(None).type == expected and pick_device("auto").type == expected
    assert default_dtype(torch.device("cpu")) == torch.float32
    assert default_dtype(torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ConfigError, match="device"):
        pick_device("warp-drive")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            pick_device("cuda")


def test_default_template_and_pad_added_when_missing(tiny_model_dir: Path, tmp_path: Path) -> None:
    bare = AutoTokenizer.from_pretrained(tiny_model_dir)
    bare.chat_template = None
    bare.pad_token = bare.eos_token  # a tokenizer that pads with EOS must get its own PAD
    bare.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template is None

    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_encode_chat_ends_with_assistant_prompt(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    ids = encode_chat(tokenizer, CHAT)
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert tokenizer.decode(ids) == (
        "<|system|>Be nice.<|end|><|user|>hi how are you<|end|>"
        "<|assistant|>good thanks, you?<|end|><|user|>fine<|end|><|assistant|>"
    )
    closed = encode_chat(tokenizer, CHAT[:3], add_generation_prompt=False)
    assert closed[-1] == tokenizer.eos_token_id


def test_assistant_mask_covers_reply_and_eos(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    out = tokenizer.apply_chat_template(
        CHAT[:3], return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked) == "good thanks, you?<|end|>"


def test_generation_reproducible_under_seed(tiny_model_dir: Path) -> None:
    model, tokenizer = load_base(tiny_model_dir, device="cpu")
    prompt = torch.tensor([encode_chat(tokenizer, CHAT)])

    def sample(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return model.generate(prompt, do_sample=True, max_new_tokens=20, min_new_tokens=20)

    first = sample(0)
    assert first.shape[1] == prompt.shape[1] + 20
    assert torch.equal(first, sample(0))
    assert not torch.equal(first, sample(1))


@pytest.mark.parametrize("name", ["/no/such/model/dir", "no-such-org/no-such-model"])
def test_unknown_model_lists_what_was_looked_for(name: str, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NotFoundError) as info:
        load_base(name)
    message = str(info.value)
    assert "local directory" in message and "hub id" in message and name in message


def test_directory_without_model_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no config.json"):
        load_tokenizer(tmp_path)


def test_set_adapters_swaps_without_reloading_base(tiny_model_dir: Path, adapters) -> None:
    policy = Policy(tiny_model_dir, device="cpu")
    base_params = {n: (p, p.data_ptr()) for n, p in policy.base_model.named_parameters()}
    base_out = last_logits(policy)

    policy.set_adapters([adapters["a"]])
    out_a = last_logits(policy)
    policy.set_adapters([adapters["a"], adapters["b"]])
    out_ab = last_logits(policy)
    policy.set_adapters([adapters["b"]])
    out_b = last_logits(policy)
    assert policy.adapters == [str(Path(adapters["b"]).resolve())]
    assert len(policy.model.peft_config) == 1  # "a" was dropped
    for x, y in [(base_out, out_a), (out_a, out_ab), (out_ab, out_b), (out_a, out_b)]:
        assert not torch.allclose(x, y, atol=1e-4)
    policy.set_adapters([adapters["a"]])
    assert torch.allclose(last_logits(policy), out_a, atol=1e-5)

    policy.set_adapters([])
    assert policy.model is policy.base_model
    assert torch.allclose(last_logits(policy), base_out, atol=1e-5)
    for name, param in policy.base_model.named_parameters():
        original, ptr = base_params[name]
        assert param is original and param.data_ptr() == ptr


def test_a_stack_that_drops_the_first_loaded_adapter_still_generates(
    tiny_model_dir: Path, adapters
) -> None:
    """The flywheel's evaluation after a deploy: the serving stack [sft, ppo], then the
    candidate's. peft names one active adapter for its lookups and left it naming the deleted
    one when two stayed active, so forward and generate raised KeyError: 'adapter_0'."""
    from agent.sampling import Sampling, generation_config, sample

    policy = Policy(tiny_model_dir, device="cpu")
    policy.set_adapters([adapters["a"], adapters["b"]])
    policy.set_adapters([adapters["b"], adapters["c"]])  # deletes "a", the first one loaded
    fresh = Policy(tiny_model_dir, device="cpu")
    fresh.set_adapters([adapters["b"], adapters["c"]])
    assert torch.allclose(last_logits(policy), last_logits(fresh), atol=1e-5)
    ids = torch.tensor([encode_chat(policy.tokenizer, CHAT)])
    config = generation_config(
        Sampling(max_new_tokens=4), end_of_turn_ids(policy.tokenizer), policy.tokenizer.pad_token_id
    )
    samples = []
    for model in (policy.model, fresh.model):
        torch.manual_seed(0)
        samples.append(sample(model, ids, torch.ones_like(ids), config))
    assert torch.equal(samples[0], samples[1])


def test_adapter_that_does_not_fit_is_rejected(tiny_model_dir: Path, adapters, tmp_path) -> None:
    policy = Policy(tiny_model_dir, device="cpu")
    policy.set_adapters([adapters["a"]])
    before = last_logits(policy)
    with pytest.raises(ValidationError, match="does not fit") as info:
        policy.set_adapters([adapters["wide"]])
    assert adapters["wide"] in str(info.value)

    renamed = tmp_path / "renamed"
    shutil.copytree(adapters["a"], renamed)
    weights = load_file(renamed / "adapter_model.safetensors")
    save_file({k.replace("q_proj", "c_attn"): v for k, v in weights.items()},
              str(renamed / "adapter_model.safetensors"))  # fmt: skip
    with pytest.raises(ValidationError, match="c_attn"):
        policy.set_adapters([str(renamed)])
    with pytest.raises(NotFoundError, match="adapter_config.json"):
        policy.set_adapters([str(tmp_path)])

    # A rejected adapter leaves the policy as it was.
    assert policy.adapters == [str(Path(adapters["a"]).resolve())]
    assert torch.allclose(last_logits(policy), before, atol=1e-6)
