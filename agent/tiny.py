"""Our own small models: chitchat text, its token rows, a byte-level BPE chat tokenizer, a Llama.

`build_tiny_model` puts them together into a tiny random model in Hugging Face format for
tests (seconds, no download); `agent.starter` trains a larger one into the offline default.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from agent.modeling import DEFAULT_CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN

log = logging.getLogger(__name__)

ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
"""Role markers of `DEFAULT_CHAT_TEMPLATE`, single tokens in our tokenizer."""
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, *ROLE_TOKENS]
"""Every special token of our tokenizer; PAD is id 0, EOS (`<|end|>`, ends a turn) id 1."""


def chitchat_conversations(limit: int | None = None) -> list[list[str]]:
    """Conversations of the `chitchat-dataset` package (its data ships inside it: no download).

    Each conversation is its messages in order, speakers alternating, whitespace normalised;
    empty messages are dropped. `limit`: only the first `limit` conversations.
    """
    import chitchat_dataset

    conversations = []
    for conversation in chitchat_dataset.ConversationDataset():
        turns = [" ".join(text.split()) for text in conversation]
        turns = [t for t in turns if t]
        if len(turns) >= 2:
            conversations.append(turns)
        if limit is not None and len(conversations) >= limit:
            break
    return conversations


def to_messages(turns: list[str], system_prompt: str | None = None) -> list[dict[str, str]]:
    """Chat messages from alternating turns: the first speaker is the user, the second the assistant."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    roles = ("user", "assistant")
    messages += [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]
    return messages


def encode_turns(
    tokenizer: PreTrainedTokenizerFast,
    conversations: list[list[dict[str, str]]],
    user_weight: float,
) -> list[list[tuple[list[int], list[float]]]]:
    """Each conversation as its turns, each turn as (token ids, per-token loss weights).

    Equals `encode_chat(..., add_generation_prompt=False)` token for token (role markers and
    EOS are special tokens, so the text between them tokenizes on its own); a test checks it.
    """
    contents = [m["content"] for conv in conversations for m in conv]
    encoded = iter(tokenizer(contents, add_special_tokens=False)["input_ids"])
    marker = {
        r: tokenizer.convert_tokens_to_ids(f"<|{r}|>") for r in ("system", "user", "assistant")
    }
    weight = {"system": 0.0, "user": user_weight, "assistant": 1.0}
    result = []
    for conv in conversations:
        turns = []
        for message in conv:
            body = [*next(encoded), tokenizer.eos_token_id]
            w = weight[message["role"]]
            turns.append(([marker[message["role"]], *body], [0.0] + [w] * len(body)))
        result.append(turns)
    return result


def pack_rows(
    turns: list[list[tuple[list[int], list[float]]]], context: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turns packed in order into rows of `context` tokens, a row only ever starting at a turn.

    Returns ids (N, T) and loss weights (N, T); padding weighs 0. A turn longer than the
    context is cut to it.
    """
    rows: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    for conv in turns:
        for turn_ids, turn_weights in conv:
            if ids and len(ids) + len(turn_ids) > context:
                rows.append((ids, weights))
                ids, weights = [], []
            ids += turn_ids[:context]
            weights += turn_weights[:context]
    if ids:
        rows.append((ids, weights))
    id_tensor = torch.full((len(rows), context), pad_id, dtype=torch.long)
    weight_tensor = torch.zeros((len(rows), context))
    for i, (row_ids, row_weights) in enumerate(rows):
        id_tensor[i, : len(row_ids)] = torch.tensor(row_ids)
        weight_tensor[i, : len(row_weights)] = torch.tensor(row_weights)
    return id_tensor, weight_tensor


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with our special tokens and chat template."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size: must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}"
        )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=ROLE_TOKENS,
        chat_template=DEFAULT_CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""SmolLM2-135M-Instruct's chat template, verbatim (ChatML with a default system prompt)."""


def chatml_tokenizer(texts: Iterable[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer shaped like SmolLM2's, as it ships: `<|endoftext|>` (0),
    `<|im_start|>` (1, BOS), `<|im_end|>` (2, EOS and PAD), and its chat template. For tests
    of what the real default model's tokenizer does, without fetching it."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def llama_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_positions: int,
) -> LlamaConfig:
    """A small Llama config over `tokenizer`'s vocabulary, tied embeddings, PAD/EOS set."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """Model, tokenizer and a generation config that stops at EOS, in HF format."""
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def build_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 512,
) -> Path:
    """A tiny random Llama with our BPE tokenizer (trained on 100 chitchat conversations)."""
    out_dir = Path(out_dir)
    texts = [t for turns in chitchat_conversations(limit=100) for t in turns]
    tokenizer = train_tokenizer(texts, vocab_size, model_max_length=512)
    config = llama_config(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=max(1, hidden_size // 16),
        intermediate_size=2 * hidden_size,
        max_positions=512,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    save_model(model, tokenizer, out_dir)
    log.info("tiny model (%d parameters) saved to %s", model.num_parameters(), out_dir)
    return out_dir


def build_peaked_model(src: str | Path, out_dir: str | Path, scale: float = 6.0) -> Path:
    """`src` with its (tied) embeddings scaled by `scale`, saved with its tokenizer to `out_dir`.

    A freshly initialised model's logits are nearly uniform and stay within about +-1.3 however
    its linear layers change (tied output embeddings of std 0.02 after RMSNorm), so no LoRA
    adapter can make it prefer anything; scaled embeddings give a peaked random model, which,
    like a trained one, an adapter can steer (PPO's learning test and benchmarks use it).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(src))
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(scale)
    model.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out_dir))
    return Path(out_dir)


def build_tiny_adapter(
    model: str | Path | torch.nn.Module,
    out_dir: str | Path,
    *,
    seed: int = 0,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    rank: int = 4,
    alpha: int = 32,
) -> Path:
    """A LoRA adapter with random, non-zero weights on `model` (a directory or a module), saved
    to `out_dir`: unlike a freshly initialised adapter, it changes the model's outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(str(model))
    lora = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False
    )
    get_peft_model(model, lora).save_pretrained(str(out_dir))
    return Path(out_dir)
