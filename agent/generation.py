"""Decoding a reply from a policy: sampling parameters and streamed, stoppable generation.

    sampling = SamplingParams(temperature=0.7, seed=1)
    sampling.validate()
    for delta in stream_generate(policy, prompt_ids, sampling, stats=stats):
        print(delta, end="")

`stream_generate` runs `model.generate` in a worker thread and yields text as soon as it
decodes to whole characters. It stops at the tokenizer's end-of-turn ids, after
`max_new_tokens`, or when a stop event is set (also when the consumer stops iterating).
Beam search (num_beams > 1) cannot stream: its reply comes as one piece when complete.
`agent.chat.ChatAgent` adds the turns, the database and the model versions around it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from queue import Queue
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from agent.errors import ValidationError
from agent.modeling import Policy, encode_chat, end_of_turn_ids

log = logging.getLogger(__name__)

MIN_REPLY_TOKENS = 16
"""Room kept for the reply: a prompt that leaves less than this is refused, never cut further."""


@dataclass
class SamplingParams:
    """How a reply is decoded. `validate()` names the field and its range when one is off."""

    max_new_tokens: int = 128
    """Longest reply in tokens, 1..4096 (cut further when the context window has less room)."""
    temperature: float = 0.8
    """Softmax temperature, 0..5; 0 means greedy decoding."""
    top_k: int = 50
    """Sample only from the k most likely tokens, 0..1000; 0 turns it off."""
    top_p: float = 0.95
    """Nucleus sampling: the smallest set of tokens with this much probability, (0, 1]."""
    repetition_penalty: float = 1.1
    """Divide the logits of tokens already seen by this, 0.5..2 (1 turns it off)."""
    do_sample: bool = True
    """Sample; False decodes greedily (or by beam search when num_beams > 1)."""
    num_beams: int = 1
    """Beam search width, 1..8; replies with num_beams > 1 are not streamed."""
    seed: int | None = None
    """Seed of the sampler, 0..2**32-1; the same seed, prompt and model give the same reply."""

    def validate(self) -> None:
        """Raise a ValidationError naming the first field out of its range."""
        for name, (lo, hi) in SAMPLING_RANGES.items():
            value = getattr(self, name)
            is_int = name in ("max_new_tokens", "top_k", "num_beams")
            if isinstance(value, bool) or not isinstance(value, int if is_int else (int, float)):
                kind = "an integer" if is_int else "a number"
                raise ValidationError(f"sampling.{name}: must be {kind}, got {value!r}")
            if not lo <= value <= hi or (name == "top_p" and value == 0):
                span = f"({lo}, {hi}]" if name == "top_p" else f"{lo}..{hi}"
                raise ValidationError(f"sampling.{name}: {value!r} is out of range {span}")
        if not isinstance(self.do_sample, bool):
            raise ValidationError(
                f"sampling.do_sample: must be true or false, got {self.do_sample!r}"
            )
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed < 2**32
        ):
            raise ValidationError(f"sampling.seed: {self.seed!r} is not an integer 0..2**32-1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def sampled(self) -> bool:
        """Whether the reply is drawn (sampling at a temperature above 0), not decoded greedily."""
        return self.do_sample and self.temperature > 0

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `model.generate` for these parameters.

        A seeded sampled reply draws from its own generator (`SeededSampler`), never from
        torch's global one, which every thread shares; beam sampling has no such hook and seeds
        the global generator instead (`seed_global_rng`)."""
        kwargs: dict[str, Any] = dict(
            repetition_penalty=self.repetition_penalty, num_beams=self.num_beams
        )
        greedy = dict(do_sample=False, temperature=None, top_k=None, top_p=None)
        if self.sampled and self.seed is not None and self.num_beams == 1:
            kwargs.update(greedy, logits_processor=LogitsProcessorList([SeededSampler(self)]))
        elif self.sampled:
            kwargs.update(
                do_sample=True, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p
            )
        else:
            kwargs.update(greedy)
        return kwargs

    def seed_global_rng(self) -> None:
        """Seed torch's global generator where `generate` draws from it: beam sampling."""
        if self.sampled and self.seed is not None and self.num_beams > 1:
            torch.manual_seed(self.seed)


class SeededSampler(LogitsProcessor):
    """Multinomial sampling with a generator of its own, as a logits processor for a greedy
    `generate`: it warps the scores as sampling would (temperature, then top-k, then top-p),
    draws each row's next token and leaves only that token possible, which greedy decoding
    then takes. The draws are those `generate` makes after `torch.manual_seed(seed)`, but two
    replies generated at once (two bases, two users) no longer take each other's."""

    def __init__(self, sampling: SamplingParams) -> None:
        self.seed = sampling.seed
        self.generator: torch.Generator | None = None  # made on the scores' device, at step 1
        self.warpers = LogitsProcessorList()
        if sampling.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            self.warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(sampling.top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.generator is None:
            self.generator = torch.Generator(device=scores.device).manual_seed(self.seed)
        probs = torch.softmax(self.warpers(input_ids, scores), dim=-1)  # (B, V)
        tokens = torch.multinomial(probs, num_samples=1, generator=self.generator)  # (B, 1)
        return torch.full_like(scores, -float("inf")).scatter_(1, tokens, 0.0)


SAMPLING_RANGES: dict[str, tuple[float, float]] = {
    "max_new_tokens": (1, 4096),
    "temperature": (0.0, 5.0),
    "top_k": (0, 1000),
    "top_p": (0.0, 1.0),
    "repetition_penalty": (0.5, 2.0),
    "num_beams": (1, 8),
}
"""Accepted range of each numeric sampling parameter (inclusive; top_p excludes 0)."""


def fit_prompt(
    policy: Policy, messages: list[dict[str, str]], max_new: int
) -> tuple[list[int], int]:
    """Prompt ids cut from the oldest turns so prompt + reply fit the model's context window.

    The system prompt and the newest user turn are always kept. When even they leave less
    than `max_new` tokens of room, the reply gets what is left (at least MIN_REPLY_TOKENS,
    else a ValidationError).
    """
    tokenizer = policy.tokenizer
    context = policy.model.config.max_position_embeddings
    ids = encode_chat(tokenizer, messages)
    if len(ids) + max_new <= context:  # the common case: everything fits
        return ids, max_new
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    minimal = encode_chat(tokenizer, [*system, turns[-1]])
    if len(minimal) + min(max_new, MIN_REPLY_TOKENS) > context:
        raise ValidationError(
            f"text: the message is {len(minimal):,} tokens with the system prompt; this "
            f"model's context window is {context:,} tokens and {MIN_REPLY_TOKENS} are kept "
            "for the reply. Shorten the message."
        )
    start = 0
    while len(ids) + max_new > context and start < len(turns) - 1:
        start += 1
        while start < len(turns) - 1 and turns[start]["role"] != "user":
            start += 1
        ids = encode_chat(tokenizer, [*system, *turns[start:]])
    if start:
        log.info("history cut: %d oldest messages left out of the prompt", start)
    return ids, min(max_new, context - len(ids))


def generate_batch(
    policy: Policy, prompts: list[list[int]], sampling: SamplingParams, *, max_new_tokens: int
) -> list[tuple[str, dict[str, Any]]]:
    """(reply text, stats) for each prompt, from one left-padded `generate` call.

    Stats hold completion_tokens (end-of-turn token included, as in `stream_generate`) and
    latency_ms (the whole batch's). The caller keeps other users off `policy` meanwhile.
    """
    tokenizer = policy.tokenizer
    pad, ends = tokenizer.pad_token_id, end_of_turn_ids(tokenizer)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    t0 = time.perf_counter()
    sampling.seed_global_rng()
    with torch.inference_mode():
        out = policy.model.generate(
            input_ids=input_ids.to(policy.device),
            attention_mask=attention_mask.to(policy.device),
            max_new_tokens=max_new_tokens,
            eos_token_id=ends,
            pad_token_id=pad,
            suppress_tokens=[pad],  # PAD is never a reply token
            **sampling.generate_kwargs(),
        )  # (B, T + new)
    latency_ms = (time.perf_counter() - t0) * 1000
    results = []
    for row in out[:, width:].tolist():
        ids = []
        for token in row:
            ids.append(token)
            if token in ends:
                break
        ids = [i for i in ids if i != pad]
        text = tokenizer.decode(ids, skip_special_tokens=True).replace("\x00", "")
        results.append((text, {"completion_tokens": len(ids), "latency_ms": latency_ms}))
    return results


def stream_generate(
    policy: Policy,
    prompt_ids: list[int],
    sampling: SamplingParams,
    *,
    max_new_tokens: int | None = None,
    stop_events: Sequence[threading.Event] = (),
    stats: dict[str, Any] | None = None,
    on_start: Callable[[], None] | None = None,
) -> Iterator[str]:
    """Text deltas of the reply to `prompt_ids` (already in the chat template).

    `max_new_tokens` overrides `sampling.max_new_tokens`. `stats` (when given) receives
    completion_tokens (generated ids, end-of-turn token included), ttft_ms and latency_ms.
    `on_start` runs once generation has started, before the first delta. Errors of
    `generate` are raised here. The caller keeps other users off `policy` meanwhile.
    """
    stats = {} if stats is None else stats
    t0 = time.perf_counter()
    streamer = _TokenQueue() if sampling.num_beams == 1 else None
    stop = threading.Event()
    job = _Job(policy, prompt_ids, max_new_tokens or sampling.max_new_tokens, sampling)
    worker = threading.Thread(target=job.run, args=(streamer, [stop, *stop_events]), daemon=True)
    worker.start()
    decoder = _Decoder(policy.tokenizer)
    try:
        if on_start is not None:
            on_start()
        if streamer is not None:
            for ids in iter(streamer.queue.get, None):
                stats["completion_tokens"] = stats.get("completion_tokens", 0) + len(ids)
                if delta := decoder.push(ids):
                    yield delta
        worker.join()
        if job.error is not None:
            raise job.error
        if streamer is None:  # beam search: the whole reply at once
            ids = [i for i in job.ids if i != policy.tokenizer.pad_token_id]
            stats["completion_tokens"] = len(ids)
            decoder.ids.extend(ids)
        if tail := decoder.flush():
            yield tail
    finally:
        stop.set()  # the consumer may have stopped early: end generation too
        worker.join()
        first = streamer.first_token_at if streamer is not None else time.perf_counter()
        if first is not None:
            stats["ttft_ms"] = (first - t0) * 1000
        stats["latency_ms"] = (time.perf_counter() - t0) * 1000


@dataclass
class _Job:
    """One `model.generate` call, run in a worker thread; the new ids or the error are kept."""

    policy: Policy
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    ids: list[int] | None = None
    error: Exception | None = None

    def run(self, streamer: _TokenQueue | None, stops: list[threading.Event]) -> None:
        tokenizer = self.policy.tokenizer
        try:
            input_ids = torch.tensor([self.prompt_ids], device=self.policy.device)  # (1, T)
            self.sampling.seed_global_rng()
            with torch.inference_mode():
                out = self.policy.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=self.max_new_tokens,
                    eos_token_id=end_of_turn_ids(tokenizer),
                    pad_token_id=tokenizer.pad_token_id,
                    suppress_tokens=[tokenizer.pad_token_id],
                    stopping_criteria=StoppingCriteriaList([_StopOnEvent(stops)]),
                    streamer=streamer,
                    **self.sampling.generate_kwargs(),
                )  # (1, T + new)
            self.ids = out[0, input_ids.shape[1] :].tolist()
        except Exception as exc:
            self.error = exc
        finally:
            if streamer is not None:
                streamer.end()


class _TokenQueue(BaseStreamer):
    """Receives new token ids from `generate` (the prompt is skipped); None marks the end."""

    def __init__(self) -> None:
        self.queue: Queue[list[int] | None] = Queue()
        self.first_token_at: float | None = None
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


class _Decoder:
    """Incremental detokenization: text is released once it decodes to whole characters."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # decoding restarts here, so a word keeps its leading space
        self.read = 0  # text of ids[prefix:read] has been released

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, ids: list[int], final: bool = False) -> str:
        self.ids.extend(ids)
        done = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done) :].replace("\x00", "")  # the store refuses NUL characters

    def flush(self) -> str:
        return self.push([], final=True)


class _StopOnEvent(StoppingCriteria):
    """Stops generation as soon as any of `events` is set."""

    def __init__(self, events: list[threading.Event]) -> None:
        self.events = events

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        stop = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)
