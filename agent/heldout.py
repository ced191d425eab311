"""How well a model predicts human chat replies it never saw: perplexity and bits per character.

    metrics = reply_metrics(model, tokenizer, held_out_conversations(64))

The rows are the starter's held-out chitchat conversations (`agent.starter.split_conversations`
with the default seed and fraction), so the from-scratch starter and any other base model
(SmolLM2) are scored on the same human replies. Each conversation is encoded once in the
model's own chat template; the scored tokens are every assistant turn's tokens (reply plus the
template's end-of-turn markup), found as the tokens between the prompt with the assistant
prompt and the conversation closed after the reply. Perplexity depends on the tokenizer;
bits per character (total bits over the characters of the replies) does not, so it is the
figure to compare models with different tokenizers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from agent.modeling import encode_chat

Chat = list[dict[str, str]]

EVAL_CONVERSATIONS = 16
"""Held-out conversations scored by default (up to 256 tokens each: seconds on a CPU)."""


def held_out_conversations(limit: int = EVAL_CONVERSATIONS, seed: int = 0) -> list[Chat]:
    """The first `limit` held-out chitchat conversations of the starter's split (as chats)."""
    from agent.starter import StarterConfig, split_conversations
    from agent.tiny import chitchat_conversations

    _, held = split_conversations(chitchat_conversations(), StarterConfig(seed=seed))
    return held[:limit]


def encode_replies(
    tokenizer, conversation: Chat, max_tokens: int
) -> tuple[list[int], list[int], int]:
    """Ids of `conversation` up to its last assistant turn that ends within `max_tokens`, a 0/1
    mask of the assistant turns' tokens, and the number of characters of those replies."""
    spans = []
    for k, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        start = len(encode_chat(tokenizer, conversation[:k], add_generation_prompt=True))
        end = len(encode_chat(tokenizer, conversation[: k + 1], add_generation_prompt=False))
        if end > max_tokens:
            break
        spans.append((start, end, len(message["content"])))
    if not spans:
        return [], [], 0
    ids = encode_chat(tokenizer, conversation, add_generation_prompt=False)[: spans[-1][1]]
    mask = [0] * len(ids)
    for start, end, _ in spans:
        mask[start:end] = [1] * (end - start)
    return ids, mask, sum(chars for *_, chars in spans)


@torch.no_grad()
def reply_metrics(
    model: torch.nn.Module, tokenizer, conversations: list[Chat], max_tokens: int = 256
) -> dict[str, float]:
    """Held-out reply loss (nats/token), perplexity and bits per character of `model`.

    Each conversation is scored up to its last assistant turn within `max_tokens` tokens (and
    the model's window), which keeps the cost of a CPU run to seconds.
    """
    model.eval()
    device = next(model.parameters()).device
    max_tokens = min(max_tokens, model.config.max_position_embeddings)
    nats, tokens, chars = 0.0, 0, 0
    for conversation in conversations:
        ids, mask, n_chars = encode_replies(tokenizer, conversation, max_tokens)
        if not ids:
            continue
        x = torch.tensor([ids], device=device)  # (1, T)
        logits = model(input_ids=x).logits[0, :-1].float()  # (T-1, V)
        nll = F.cross_entropy(logits, x[0, 1:], reduction="none")  # (T-1,)
        scored = torch.tensor(mask[1:], device=device, dtype=torch.bool)
        nats += float(nll[scored].sum())
        tokens += int(scored.sum())
        chars += n_chars
    loss = nats / max(tokens, 1)
    return {
        "heldout/reply_loss": loss,
        "heldout/reply_perplexity": math.exp(loss),
        "heldout/bits_per_char": nats / math.log(2) / max(chars, 1),
        "heldout/reply_tokens": tokens,
        "heldout/reply_chars": chars,
        "heldout/conversations": len(conversations),
    }
