"""Chat latency: a turn through `ChatAgent` versus bare `model.generate`, same model and prompt.

    .venv/bin/python benchmarks/chat_latency.py                      # starter and 0.5b shapes
    .venv/bin/python benchmarks/chat_latency.py --sizes starter --turns 10 --max-new-tokens 64
    .venv/bin/python benchmarks/chat_latency.py --sizes "" --model .rlchat/models/1   # SmolLM2

Models have random weights (only the shape matters for speed) and our byte-level BPE
tokenizer, except a real model folder given with --model (e.g. the converted SmolLM2 that
`rlchat starter ensure` registered), which is measured with its own weights and tokenizer;
special tokens are masked out of the logits in both paths, so every turn writes
exactly --max-new-tokens tokens. Each measured turn is a new conversation with the same system
prompt and user message, so the agent's prompt is the bare prompt. Agent and bare turns
alternate. Agent times are end to end as a caller sees them: from calling `stream_reply`
(validation, history, deployed-version check, user message written) to the first text chunk
(TTFT) and to the final chunk (the reply written). TTFT, tok/s and turn times are the best of
--turns (the least disturbed by other load: timeit's rule). Overhead = best agent turn - best
bare turn, as a share of the agent turn. Bookkeeping = the agent's wall time outside
generation (wall time - the latency it stores), median over turns, as a share of the median
turn: the DB reads and writes, prompt building and version check, measured within one turn,
so it is far less sensitive to a noisy machine than a difference of two turn times.
Runs on CUDA (bf16) when there is one.

The bare baseline also runs `generate` in a worker thread, as the agent does: on a loaded CPU
an OpenMP team started from the main thread was 5-15x slower than one from a worker thread for
small models, which would otherwise be mistaken for (negative) agent overhead.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

from agent.chat import ChatAgent, SamplingParams
from agent.config import Settings
from agent.modeling import Policy, encode_chat, end_of_turn_ids
from agent.registry import ModelRegistry
from agent.starter import SIZES
from agent.store.api import Store
from agent.tiny import chitchat_conversations, llama_config, save_model, train_tokenizer

SHAPES = {
    # name: (hidden, layers, heads, kv heads, intermediate, vocab, context)
    "tiny": (64, 2, 4, 4, 128, 512, 512),
    "starter": (
        SIZES["small"].hidden_size,
        SIZES["small"].num_layers,
        SIZES["small"].num_heads,
        SIZES["small"].num_heads,
        SIZES["small"].intermediate_size,
        SIZES["small"].vocab_size,
        SIZES["small"].context,
    ),
    # ~0.5B parameters: Qwen2.5-0.5B's depth, widened for our small vocabulary.
    "0.5b": (1152, 24, 18, 18, 4608, 4096, 2048),
}
SYSTEM = "You are a friendly, helpful assistant."
USER = "hi! what do you like to do on the weekend?"


@dataclass
class Timing:
    ttft_s: float
    total_s: float
    tokens: int
    generation_s: float = 0.0
    """Agent only: the latency stored on the reply (generation, user-message write included)."""


class FirstToken(BaseStreamer):
    """Records when `generate` produced its first new token; nothing else."""

    def __init__(self) -> None:
        self.calls, self.first_at = 0, 0.0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call is the prompt
            self.first_at = time.perf_counter()

    def end(self) -> None:
        pass


def build_model(name: str, out_dir: Path) -> Path:
    hidden, layers, heads, kv_heads, inter, vocab, context = SHAPES[name]
    texts = [t for turns in chitchat_conversations(limit=2000) for t in turns]
    tokenizer = train_tokenizer(texts, vocab, model_max_length=context)
    config = llama_config(
        tokenizer,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=inter,
        max_positions=context,
    )
    config.num_key_value_heads = kv_heads
    torch.manual_seed(0)
    save_model(LlamaForCausalLM(config), tokenizer, out_dir)
    return out_dir


def mask_special_tokens(policy: Policy) -> None:
    """No special token is ever sampled, so every reply runs to max_new_tokens."""
    special = policy.tokenizer.all_special_ids

    def hook(_module, _inputs, logits):
        logits[..., special] = float("-inf")
        return logits

    policy.model.get_output_embeddings().register_forward_hook(hook)


def bare_turn(policy: Policy, prompt_ids: list[int], sampling: SamplingParams) -> Timing:
    """`model.generate` in a worker thread, as the agent runs it (see the module docstring)."""
    streamer = FirstToken()
    input_ids = torch.tensor([prompt_ids], device=policy.device)
    out: list[torch.Tensor] = []

    def generate() -> None:
        torch.manual_seed(sampling.seed or 0)
        with torch.inference_mode():
            out.append(
                policy.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=sampling.max_new_tokens,
                    eos_token_id=end_of_turn_ids(policy.tokenizer),
                    pad_token_id=policy.tokenizer.pad_token_id,
                    streamer=streamer,
                    **sampling.generate_kwargs(),
                )
            )

    t0 = time.perf_counter()
    worker = threading.Thread(target=generate)
    worker.start()
    worker.join()
    total = time.perf_counter() - t0
    return Timing(streamer.first_at - t0, total, out[0].shape[1] - input_ids.shape[1])


def agent_turn(agent: ChatAgent, user_id: int, sampling: SamplingParams) -> Timing:
    conversation = agent.new_conversation(user_id, SYSTEM)
    t0 = time.perf_counter()
    first = None
    for chunk in agent.stream_reply(conversation, USER, sampling=sampling):
        if first is None and chunk.delta:
            first = time.perf_counter()
    total = time.perf_counter() - t0
    reply = agent.store.get_message(chunk.assistant_message_id)
    if chunk.error:
        raise RuntimeError(f"agent turn failed: {chunk.error}")
    ttft = (first or time.perf_counter()) - t0
    return Timing(ttft, total, reply.completion_tokens or 0, (reply.latency_ms or 0) / 1000)


def measure(
    name: str, args: argparse.Namespace, work: Path, model_dir: Path | None = None
) -> dict[str, object]:
    """One model: a random one of shape `name`, or the folder `model_dir` as it is."""
    model_dir = model_dir or build_model(name, work / name)
    settings = Settings(data_dir=work / f"data-{name}", database_url=args.database_url or "")
    store = Store.open(settings)
    registry = ModelRegistry(store, settings)
    registry.deploy(registry.add("base", model_dir, name=name))
    agent = ChatAgent(store, settings, device=args.device)
    policy = agent.policy()
    mask_special_tokens(policy)
    user_id = store.get_or_create_user("bench").id
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, seed=0)
    prompt = encode_chat(
        policy.tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    )
    bare_turn(policy, prompt, sampling)  # warm-up
    agent_turn(agent, user_id, sampling)
    bare, served = [], []
    for _ in range(args.turns):
        bare.append(bare_turn(policy, prompt, sampling))
        served.append(agent_turn(agent, user_id, sampling))
    store.close()

    def best(timings: list[Timing], key: str) -> float:
        return min(getattr(t, key) for t in timings)

    tokens = served[0].tokens
    overhead = best(served, "total_s") - best(bare, "total_s")
    bookkeeping = statistics.median(t.total_s - t.generation_s for t in served)
    turn = statistics.median(t.total_s for t in served)
    return {
        "model": name,
        "params": f"{policy.base_model.num_parameters() / 1e6:.1f}M",
        "device": f"{policy.device.type} {str(policy.dtype).removeprefix('torch.')}",
        "tokens": f"{tokens} / {bare[0].tokens}",
        "TTFT ms bare / agent": f"{best(bare, 'ttft_s') * 1e3:.1f} / {best(served, 'ttft_s') * 1e3:.1f}",
        "tok/s bare / agent": f"{tokens / best(bare, 'total_s'):.1f} / {tokens / best(served, 'total_s'):.1f}",
        "turn ms bare / agent": f"{best(bare, 'total_s') * 1e3:.1f} / {best(served, 'total_s') * 1e3:.1f}",
        "overhead (best of N)": f"{overhead * 1e3:.1f} ms ({100 * overhead / best(served, 'total_s'):.1f}%)",
        "bookkeeping (median)": f"{bookkeeping * 1e3:.1f} ms ({100 * bookkeeping / turn:.1f}%)",
    }


def markdown_table(rows: list[dict[str, object]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="starter,0.5b", help=f"comma list of {', '.join(SHAPES)}"
    )
    parser.add_argument(
        "--model", action="append", default=[], help="a Hugging Face model folder (repeatable)"
    )
    parser.add_argument("--turns", type=int, default=10, help="measured turns per path and size")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    parser.add_argument("--database-url", default="", help="default: SQLite in a temp dir")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        todo = [(n.strip(), None) for n in args.sizes.split(",") if n.strip()]
        todo += [(Path(m).resolve().name, Path(m).resolve()) for m in args.model]
        for name, model_dir in todo:
            rows.append(measure(name, args, Path(work), model_dir))
            print(markdown_table(rows[-1:]), flush=True)
    print()
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
