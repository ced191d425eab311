"""Model loading: a base causal LM with its tokenizer, and the policy (that base + LoRA adapters).

Any Hugging Face causal LM loads by hub id or local directory. Tokenizers always come back
ready for chat and batched generation: a chat template (the model's own, else
`DEFAULT_CHAT_TEMPLATE`), a PAD token distinct from EOS, and left padding. The device is picked
automatically (CUDA in bf16, else CPU in fp32) unless given.

`Policy` keeps one copy of the base weights in memory and stacks LoRA adapters on it
(bottom-up: the SFT adapter, then a PPO adapter); switching adapters never reloads the base.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from agent.errors import ConfigError, NotFoundError, ValidationError

log = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"
"""The PAD token added to tokenizers that have none (or whose PAD is their EOS)."""
EOS_TOKEN = "<|end|>"
"""The EOS token added to tokenizers that have none; it also ends every turn of our template."""
END_OF_TURN_TOKENS = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>")
"""Tokens known to end an assistant turn in common chat templates (used when in the vocab)."""

# Roles as markers, each turn closed by EOS. Assistant turns sit in {% generation %} blocks so
# `apply_chat_template(..., return_assistant_tokens_mask=True)` (and TRL's assistant_only_loss)
# can tell which tokens the model should learn to produce: the reply and its closing EOS.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + eos_token -}}{% endgeneration %}"
    "{%- else -%}"
    "{{- message['content'] + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as a torch.device; None or "auto": CUDA when available, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device: {device!r} is not a device; use auto, cpu or cuda[:N]") from exc
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device: {device!r} asked for CUDA but none is available; use cpu or auto"
        )
    return chosen


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """A torch dtype from a dtype, a name ("bf16", "float32", ...) or None (the device default)."""
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _not_found(name_or_path: str, hub_error: str) -> NotFoundError:
    local = Path(name_or_path).expanduser().resolve()
    return NotFoundError(
        f"model {name_or_path!r} not found. Looked for: the local directory {local} "
        f"({'exists but has no config.json' if local.is_dir() else 'does not exist'}); "
        f"the Hugging Face hub id {name_or_path!r} ({hub_error}). Give a directory holding a "
        "saved model, a hub id that is cached or reachable, or fetch the offline default model "
        "with `rlchat starter ensure`."
    )


def _local_dir(name_or_path: str) -> Path | None:
    """The local model directory `name_or_path` names, or None when it should be a hub id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir() or name_or_path.startswith(("/", ".", "~")):
        raise _not_found(name_or_path, "not tried: this names a local path")
    return None


def _from_pretrained(loader, name_or_path: str, **kwargs):
    """`loader.from_pretrained` on a local dir or hub id; a NotFoundError when neither has it."""
    local = _local_dir(str(name_or_path))
    if local is not None:
        return loader.from_pretrained(str(local), **kwargs)
    try:
        return loader.from_pretrained(str(name_or_path), **kwargs)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise _not_found(str(name_or_path), reason) from exc


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make `tokenizer` chat- and batch-ready in place: template, EOS, distinct PAD, left padding."""
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a local model directory or hub id, prepared by `prepare_tokenizer`."""
    return prepare_tokenizer(_from_pretrained(AutoTokenizer, str(name_or_path)))


def load_base(
    name_or_path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM in eval mode on `device` (auto) in `dtype` (bf16 on CUDA, fp32 on CPU).

    The embeddings grow when `prepare_tokenizer` added tokens; the generation config gets the
    PAD id and every end-of-turn id as EOS.
    """
    tokenizer = load_tokenizer(name_or_path)
    device = pick_device(device)
    dtype = resolve_dtype(dtype, device)
    model = _from_pretrained(AutoModelForCausalLM, str(name_or_path), dtype=dtype)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
    model.to(device).eval()
    log.info("loaded %s on %s (%s)", name_or_path, device, dtype)
    return model, tokenizer


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of `messages` in the chat template, by default ending with the assistant prompt.

    Message contents stay text: a content holding a special-token string such as `<|im_end|>`
    or `<|system|>` is tokenised as ordinary characters, so users cannot forge turns. The
    template is rendered with a placeholder per content; the template's own text (role
    markers, EOS, BOS where the template writes it) is tokenised with special tokens
    recognised, each content with `split_special_tokens=True`.
    """
    tag = uuid.uuid4().hex
    masked = [{**m, "content": f"[{tag}:{i}]"} for i, m in enumerate(messages)]
    text = tokenizer.apply_chat_template(
        masked, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    pieces: list[tuple[bool, str]] = []  # (is a content, text), in order
    pos = 0
    for match in re.finditer(rf"\[{tag}:(\d+)\]", text):
        pieces.append((False, text[pos : match.start()]))
        pieces.append((True, messages[int(match.group(1))]["content"]))
        pos = match.end()
    pieces.append((False, text[pos:]))
    markup = _token_ids(tokenizer, [t for is_content, t in pieces if not is_content], False)
    contents = _token_ids(tokenizer, [t for is_content, t in pieces if is_content], True)
    ids: list[int] = []
    for is_content, _ in pieces:
        ids += next(contents) if is_content else next(markup)
    return ids


_ENCODING = threading.Lock()
"""Held around every `_token_ids` call. A fast tokenizer applies `split_special_tokens` by setting
a flag on its Rust tokenizer, which the users of one base share, and then encodes with the GIL
released: two chats encoded at once could each take the other's setting (the template's markers
split into characters, or a message's special-token strings read as real ones)."""


def _token_ids(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], split_special: bool
) -> Iterator[list[int]]:
    """Ids of each text, without added BOS/EOS; special-token strings split when asked."""
    if not texts:
        return iter([])
    with _ENCODING:
        encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=split_special)
    return iter([list(ids) for ids in encoded["input_ids"]])


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that end an assistant turn: EOS, plus known end-of-turn tokens in the vocabulary."""
    ids = [tokenizer.eos_token_id]
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    return list(dict.fromkeys(i for i in ids if i is not None and i != tokenizer.pad_token_id))


def check_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> None:
    """Raise unless `adapter_dir` holds a LoRA adapter whose shapes fit `model`'s modules.

    Checked before loading so that a bad adapter leaves the model untouched.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import load_peft_weights

    path = Path(adapter_dir)
    if not (path / "adapter_config.json").is_file():
        raise NotFoundError(
            f"adapter {path}: no adapter_config.json there; is this a LoRA adapter?"
        )
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise ValidationError(f"adapter {path}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, tensor in load_peft_weights(str(path), device="cpu").items():
        if ".lora_" not in key:
            continue
        module_name = key.removeprefix("base_model.model.").split(".lora_")[0]
        try:
            module = model.get_submodule(module_name)
        except AttributeError as exc:
            raise ValidationError(
                f"adapter {path} does not fit the base model: it adapts {module_name}, which the "
                "base model does not have (trained on another architecture?)"
            ) from exc
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        _check_lora_shape(path, key, tuple(tensor.shape), module)


def _check_lora_shape(
    path: Path, key: str, shape: tuple[int, ...], module: torch.nn.Module
) -> None:
    if isinstance(module, torch.nn.Linear):
        size_in, size_out = module.in_features, module.out_features
    elif isinstance(module, torch.nn.Embedding):
        size_in, size_out = module.num_embeddings, module.embedding_dim
    else:
        return
    if ("lora_A" in key or "lora_embedding_A" in key) and shape[-1] != size_in:
        got, want = shape[-1], size_in
    elif ("lora_B" in key or "lora_embedding_B" in key) and shape[0] != size_out:
        got, want = shape[0], size_out
    else:
        return
    raise ValidationError(
        f"adapter {path} does not fit the base model: {key} has size {got} where the base "
        f"module has {want} (the adapter was trained on a different base model)"
    )


class Policy:
    """The served or trained policy: one base model in memory plus stacked LoRA adapters."""

    def __init__(
        self,
        base: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        self.base = str(base)
        self.base_model, self.tokenizer = load_base(base, device=device, dtype=dtype)
        self.model: torch.nn.Module = self.base_model
        self.device = self.base_model.device
        self.dtype = self.base_model.dtype
        self._names: dict[str, str] = {}  # resolved adapter dir -> peft adapter name
        self._active: list[str] = []
        self._counter = 0

    @property
    def adapters(self) -> list[str]:
        """The active adapter directories, bottom-up."""
        return list(self._active)

    def set_adapters(self, adapter_dirs: Sequence[str | Path]) -> None:
        """Make exactly `adapter_dirs` active (stacked); load missing ones, drop the rest."""
        wanted = [str(Path(d).expanduser().resolve()) for d in adapter_dirs]
        if len(set(wanted)) != len(wanted):
            raise ValidationError(f"adapter_dirs: the same adapter is listed twice in {wanted}")
        new = [d for d in wanted if d not in self._names]
        for d in new:
            check_adapter(self.base_model, d)
        for d in new:
            self._load(d)
        if wanted:
            names = [self._names[d] for d in wanted]
            self.model.base_model.set_adapter(names, inference_mode=True)
            for d in [d for d in self._names if d not in wanted]:
                self.model.delete_adapter(self._names.pop(d))
            # peft looks up one adapter's config by name (PeftModel.active_adapter) in forward
            # and generate, and leaves that name on a deleted adapter when several stay active.
            self.model.active_adapter = names[0]
        elif self.model is not self.base_model:
            self.model = self.model.unload()  # back to the same base modules, weights untouched
            self._names.clear()
        self.model.eval()
        self._active = wanted
        log.info("active adapters: %s", wanted or "none (base model)")

    def _load(self, adapter_dir: str) -> None:
        from peft import PeftModel

        name = f"adapter_{self._counter}"
        self._counter += 1
        try:
            if self.model is self.base_model:
                self.model = PeftModel.from_pretrained(
                    self.base_model, adapter_dir, adapter_name=name
                )
            else:
                self.model.load_adapter(adapter_dir, adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as exc:
            if self.model is not self.base_model and name in self.model.peft_config:
                self.model.delete_adapter(name)
            raise ValidationError(
                f"adapter {adapter_dir} does not fit the base model: {exc}"
            ) from exc
        self._names[adapter_dir] = name
