"""A count-based baseline: an interpolated Witten-Bell trigram over a model's own tokens.

    metrics = trigram_reply_metrics(tokenizer, train_conversations, held_out_conversations)

Trained on every token of the training conversations in the chat template, scored on exactly
the held-out reply tokens `agent.heldout.reply_metrics` scores (same masks, same cut), so a
neural model's `heldout/bits_per_char` can be set against `baseline/trigram_bits_per_char`:
a model that does not beat it has learned less than counting does.
(Witten-Bell: Chen & Goodman 1998, "An empirical study of smoothing techniques", sec. 2.4.)
"""

from __future__ import annotations

import math
from collections import Counter

from agent.heldout import Chat, encode_replies
from agent.modeling import encode_chat


class WittenBellTrigram:
    """P(w | u, v) interpolated down to a uniform distribution over the vocabulary."""

    def __init__(self, sequences: list[list[int]], vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.counts: list[Counter] = [Counter(), Counter(), Counter()]  # by context length
        self.totals: list[Counter] = [Counter(), Counter(), Counter()]
        for ids in sequences:
            for i, token in enumerate(ids):
                for n in range(min(i, 2) + 1):
                    context = tuple(ids[i - n : i])
                    self.counts[n][(context, token)] += 1
                    self.totals[n][context] += 1
        self.distinct: list[Counter] = [Counter(ctx for ctx, _ in c) for c in self.counts]

    def prob(self, context: tuple[int, ...], token: int) -> float:
        p = 1.0 / self.vocab_size
        for n in range(3):
            if len(context) < n:
                break
            ctx = context[len(context) - n :] if n else ()
            total = self.totals[n][ctx]
            if total == 0:
                continue
            distinct = self.distinct[n][ctx]
            lam = total / (total + distinct)
            p = lam * self.counts[n][(ctx, token)] / total + (1 - lam) * p
        return p


def trigram_reply_metrics(
    tokenizer, train: list[Chat], held_out: list[Chat], max_tokens: int = 256
) -> dict[str, float]:
    """Held-out reply loss (nats/token) and bits per character of a trigram fit on `train`."""
    sequences = [encode_chat(tokenizer, c, add_generation_prompt=False) for c in train]
    model = WittenBellTrigram(sequences, len(tokenizer))
    nats, tokens, chars = 0.0, 0, 0
    for conversation in held_out:
        ids, mask, n_chars = encode_replies(tokenizer, conversation, max_tokens)
        for i in range(1, len(ids)):
            if mask[i]:
                nats -= math.log(model.prob(tuple(ids[max(0, i - 2) : i]), ids[i]))
                tokens += 1
        chars += n_chars
    return {
        "baseline/trigram_loss": nats / max(tokens, 1),
        "baseline/trigram_bits_per_char": nats / math.log(2) / max(chars, 1),
    }
