"""ChatAgent on a tiny random Llama: streaming, DB rows, seeds, context window, hot deploy,
bad input, failures, and the `rlchat chat` command."""

from __future__ import annotations

import io
import threading
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent import modeling
from agent.chat import ChatAgent, SamplingParams
from agent.errors import NotFoundError, ValidationError
from agent.modeling import encode_chat, end_of_turn_ids
from agent.registry import ModelRegistry
from agent.tiny import build_tiny_adapter
from rlchat.cli import main as cli_main

SHORT = SamplingParams(max_new_tokens=8, seed=0)


def make_adapter(base_dir: Path, out_dir: Path, seed: int, hidden_size: int | None = None) -> Path:
    """A random LoRA adapter on the tiny model, or on the same architecture at another width
    (`hidden_size`): an adapter that does not fit."""
    if hidden_size is None:
        return build_tiny_adapter(base_dir, out_dir, seed=seed)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    config.hidden_size, config.intermediate_size = hidden_size, 2 * hidden_size
    return build_tiny_adapter(AutoModelForCausalLM.from_config(config), out_dir, seed=seed)


def build(store, settings, model_dir) -> SimpleNamespace:
    registry = ModelRegistry(store, settings)
    base_id = registry.add("base", model_dir, name="tiny")
    registry.deploy(base_id)
    agent = ChatAgent(store, settings, device="cpu")
    user_id = store.get_or_create_user("alice").id
    return SimpleNamespace(
        store=store, registry=registry, agent=agent, base_id=base_id, user_id=user_id
    )


@pytest.fixture
def env(sqlite_store, sqlite_settings, tiny_model_dir) -> SimpleNamespace:
    return build(sqlite_store, sqlite_settings, tiny_model_dir)


@contextmanager
def edit_logits(policy, edit):
    """Apply `edit(step, logits)` to the LM head's output at every generation step (1-based)."""
    step = [0]

    def hook(_module, _inputs, logits):
        step[0] += 1
        return edit(step[0], logits.clone())

    handle = policy.model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def end_turn_at(policy, n: int):
    """The model ends its turn with its n-th token (and writes no special tokens before)."""
    eot = end_of_turn_ids(policy.tokenizer)
    special = policy.tokenizer.all_special_ids

    def edit(step, logits):
        logits[..., special] = -1e4
        if step >= n:
            logits[..., eot] = 1e4
        return logits

    return edit_logits(policy, edit)


# ---- sampling parameters ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", 1.5),
        ("temperature", -0.1),
        ("temperature", 6),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.2),
        ("repetition_penalty", 3.0),
        ("num_beams", 0),
        ("do_sample", "yes"),
        ("seed", -1),
    ],
)
def test_sampling_out_of_range_names_the_field(env, field, value):
    sampling = SamplingParams(**{field: value})
    with pytest.raises(ValidationError, match=f"sampling.{field}"):
        sampling.validate()
    conv = env.agent.new_conversation(env.user_id)
    with pytest.raises(ValidationError, match=f"sampling.{field}"):
        env.agent.stream_reply(conv, "hi", sampling=sampling)
    assert env.store.messages(conv) == []


def test_sampling_params_round_trip_and_greedy_at_zero_temperature():
    sampling = SamplingParams(temperature=0, top_k=0, top_p=1.0, seed=7)
    sampling.validate()
    assert SamplingParams(**sampling.to_dict()) == sampling
    assert sampling.generate_kwargs()["do_sample"] is False


# ---- turns and their rows --------------------------------------------------------------


def test_two_turn_chat_rows_are_exactly_right(store, settings, tiny_model_dir):
    env = build(store, settings, tiny_model_dir)
    conv = env.agent.new_conversation(env.user_id, "Be brief.")
    chunks = list(env.agent.stream_reply(conv, "hello there", sampling=SHORT))
    last = chunks[-1]
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(c.delta for c in chunks) == last.text and last.error is None
    second = env.agent.reply(conv, "and how are you?", sampling=SHORT)

    rows = store.messages(conv)
    assert [(m.role, m.parent_id) for m in rows] == [
        ("user", None),
        ("assistant", rows[0].id),
        ("user", rows[1].id),
        ("assistant", rows[2].id),
    ]
    assert [rows[1].id, rows[3].id] == [last.assistant_message_id, second.assistant_message_id]
    assert [rows[0].id, rows[2].id] == [last.user_message_id, second.user_message_id]
    assert [m.content for m in rows] == ["hello there", last.text, "and how are you?", second.text]
    tokenizer = env.agent.policy().tokenizer
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there"},
    ]
    second_prompt = [
        *history,
        {"role": "assistant", "content": last.text},
        {"role": "user", "content": "and how are you?"},
    ]
    prompts = [history, second_prompt]
    for user, reply, prompt in zip(rows[::2], rows[1::2], prompts, strict=True):
        assert user.model_version_id is None and user.sampling is None
        assert user.prompt_tokens is None and user.latency_ms is None
        assert reply.model_version_id == env.base_id and reply.error is None
        assert reply.sampling == SHORT.to_dict()
        assert reply.prompt_tokens == len(encode_chat(tokenizer, prompt))
        assert 1 <= reply.completion_tokens <= SHORT.max_new_tokens
        assert 0 < reply.ttft_ms <= reply.latency_ms
    assert store.get_conversation(conv).title == "hello there"


def test_generation_is_reproducible_under_a_seed(env):
    messages = [{"role": "user", "content": "what do you like to do?"}]
    replies = [
        env.agent.generate(messages, SamplingParams(max_new_tokens=12, seed=s)) for s in (1, 1, 2)
    ]
    assert replies[0] == replies[1] and replies[0] != replies[2]
    conv = env.agent.new_conversation(env.user_id, "")
    turn = env.agent.reply(conv, messages[0]["content"], sampling=SamplingParams(12, seed=1))
    assert turn.text == replies[0]
    assert env.store.counts()["messages"] == 2  # generate() wrote nothing


def test_stops_at_end_of_turn_and_beam_search_gives_one_chunk(env):
    conv = env.agent.new_conversation(env.user_id)
    with end_turn_at(env.agent.policy(), 4):
        last = env.agent.reply(conv, "hi", sampling=SamplingParams(max_new_tokens=50, seed=0))
    with end_turn_at(env.agent.policy(), 4):
        beams = list(
            env.agent.stream_reply(
                conv, "again", sampling=SamplingParams(num_beams=3, do_sample=False)
            )
        )
    assert env.store.get_message(last.assistant_message_id).completion_tokens == 4
    assert last.text.strip()
    assert [c.done for c in beams] == [False, True] and beams[0].text == beams[1].text
    assert env.store.get_message(beams[1].assistant_message_id).completion_tokens == 4


def test_regenerate_adds_a_sibling(env):
    conv = env.agent.new_conversation(env.user_id)
    first = env.agent.reply(conv, "hi", sampling=SHORT)
    *_, again = env.agent.regenerate(first.assistant_message_id, sampling=SamplingParams(8, seed=5))
    assert again.user_message_id == first.user_message_id
    siblings = env.store.siblings(first.assistant_message_id)
    assert [m.id for m in siblings] == [first.assistant_message_id, again.assistant_message_id]
    assert again.text != first.text
    with pytest.raises(ValidationError, match="assistant_message_id"):
        env.agent.regenerate(first.user_message_id)


def test_stop_event_and_abandoned_stream_keep_the_partial_reply(env):
    conv = env.agent.new_conversation(env.user_id)
    stop = threading.Event()
    long = SamplingParams(max_new_tokens=400, seed=0)
    with end_turn_at(env.agent.policy(), 10_000):  # never ends on its own
        chunks = []
        for chunk in env.agent.stream_reply(
            conv, "tell me a story", sampling=long, stop_event=stop
        ):
            chunks.append(chunk)
            stop.set()
        stream = env.agent.stream_reply(conv, "another", sampling=long)
        partial = [next(stream), next(stream)]
        stream.close()
    stopped = env.store.get_message(chunks[-1].assistant_message_id)
    assert chunks[-1].done and stopped.content == chunks[-1].text and stopped.error is None
    assert stopped.completion_tokens < 400
    abandoned = env.store.messages(conv)[-1]
    assert abandoned.role == "assistant" and abandoned.parent_id == partial[0].user_message_id
    assert abandoned.content.startswith(partial[-1].text) and abandoned.completion_tokens < 400


# ---- context window ---------------------------------------------------------------------


def test_long_history_is_cut_from_the_oldest_turns(env, monkeypatch):
    conv = env.agent.new_conversation(env.user_id, "SYSTEM-PROMPT")
    parent = None
    for i in range(12):  # far more history than the 512-token window holds
        parent = env.store.append_message(conv, "user", f"question {i} " + "blah " * 30, parent)
        parent = env.store.append_message(conv, "assistant", f"answer {i} " + "meh " * 30, parent)
    policy = env.agent.policy()
    seen = []
    generate = policy.model.generate

    def spy(**kwargs):
        seen.append(kwargs["input_ids"])
        return generate(**kwargs)

    monkeypatch.setattr(policy.model, "generate", spy)
    last = env.agent.reply(
        conv, "NEWEST-QUESTION", sampling=SamplingParams(max_new_tokens=32, seed=0)
    )
    assert last.error is None
    prompt = policy.tokenizer.decode(seen[0][0])
    context = policy.model.config.max_position_embeddings
    assert len(seen[0][0]) + 32 <= context
    assert prompt.startswith("<|system|>SYSTEM-PROMPT") and "NEWEST-QUESTION" in prompt
    assert "question 11" in prompt and "question 0 " not in prompt
    assert env.store.get_message(last.assistant_message_id).prompt_tokens == len(seen[0][0])


def test_max_new_tokens_beyond_the_window_is_cut_to_fit(env):
    conv = env.agent.new_conversation(env.user_id)
    with end_turn_at(env.agent.policy(), 3):
        last = env.agent.reply(conv, "hi", sampling=SamplingParams(max_new_tokens=4096))
    assert last.error is None and last.assistant_message_id is not None


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ("", ValidationError, "text: must not be empty"),
        ("   \n", ValidationError, "text: must not be empty"),
        ("hello " * 700, ValidationError, "context window is 512 tokens"),
        ("x" * 40_000, ValidationError, "over the limit of 32,000"),
    ],
)
def test_bad_message_stores_nothing(env, text, error, match):
    conv = env.agent.new_conversation(env.user_id)
    with pytest.raises(error, match=match):
        env.agent.stream_reply(conv, text, sampling=SHORT)
    assert env.store.messages(conv) == []


# ---- models: none deployed, unknown, not fitting, hot deploy ----------------------------


def test_no_deployed_model_says_what_to_run(sqlite_store, sqlite_settings):
    agent = ChatAgent(sqlite_store, sqlite_settings, device="cpu")
    conv = agent.new_conversation(sqlite_store.get_or_create_user("bob").id)
    with pytest.raises(NotFoundError, match="rlchat starter ensure"):
        agent.stream_reply(conv, "hi")
    assert sqlite_store.messages(conv) == []


def test_unknown_model_path_lists_what_was_looked_for(env):
    missing = env.registry.add("base", "no-such-org/no-such-model")
    env.registry.deploy(missing)
    conv = env.agent.new_conversation(env.user_id)
    with pytest.raises(NotFoundError, match="Looked for: the local directory .*no-such-model"):
        env.agent.stream_reply(conv, "hi", sampling=SHORT)
    assert env.store.messages(conv) == []


def test_adapter_that_does_not_fit_the_base(env, tiny_model_dir, tmp_path):
    src = make_adapter(tiny_model_dir, tmp_path / "wide", seed=0, hidden_size=32)
    bad = env.registry.add("sft", src, parent_id=env.base_id)
    env.registry.deploy(bad)
    conv = env.agent.new_conversation(env.user_id)
    with pytest.raises(
        ValidationError, match=f"model version {bad} cannot be served.*does not fit"
    ):
        env.agent.stream_reply(conv, "hi", sampling=SHORT)
    assert env.store.messages(conv) == []
    env.registry.rollback()  # the agent serves the base again, unharmed
    assert env.agent.reply(conv, "hi", sampling=SHORT).error is None


def test_hot_deploy_changes_replies_without_reloading_the_base(
    env, tiny_model_dir, tmp_path, monkeypatch
):
    loads = []
    load_base = modeling.load_base
    monkeypatch.setattr(
        modeling, "load_base", lambda *a, **k: loads.append(a) or load_base(*a, **k)
    )
    conv = env.agent.new_conversation(env.user_id)
    sampling = SamplingParams(max_new_tokens=12, seed=3)
    before = env.agent.reply(conv, "hi", sampling=sampling)
    policy = env.agent.policy()
    adapter = make_adapter(tiny_model_dir, tmp_path / "sft", seed=1)
    sft = env.registry.add("sft", adapter, parent_id=env.base_id)
    env.registry.deploy(sft)  # while the agent is running
    after = env.agent.reply(conv, "hi", parent_id=None, sampling=sampling)
    assert after.model_version_id == sft and after.text != before.text
    assert env.agent.policy() is policy and len(loads) == 1  # same base weights in memory
    arena = env.agent.reply(conv, "hi", sampling=sampling, version_id=env.base_id)  # a candidate
    assert arena.model_version_id == env.base_id
    env.registry.rollback()
    back = env.agent.reply(conv, "hi", sampling=sampling)
    assert back.model_version_id == env.base_id
    rows = {m.id: m for m in env.store.messages(conv)}
    assert rows[after.assistant_message_id].model_version_id == sft
    assert len(loads) == 1


def test_concurrent_turns_on_two_versions_each_get_their_own_policy(env, tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "sft", seed=1)
    sft = env.registry.add("sft", adapter, parent_id=env.base_id)
    sampling = SamplingParams(max_new_tokens=12, seed=3)
    prompt = [
        {"role": "system", "content": env.agent.settings.system_prompt},
        {"role": "user", "content": "hi"},
    ]
    expected = {v: env.agent.generate(prompt, sampling, version_id=v) for v in (env.base_id, sft)}
    assert expected[env.base_id] != expected[sft]
    results: dict[int, list[str]] = {}

    def chat(version_id: int) -> None:
        results[version_id] = [
            env.agent.reply(
                env.agent.new_conversation(env.user_id),
                "hi",
                sampling=sampling,
                version_id=version_id,
            ).text
            for _ in range(3)
        ]

    threads = [threading.Thread(target=chat, args=(v,)) for v in expected]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == {v: [text] * 3 for v, text in expected.items()}


def test_seeded_replies_on_two_bases_at_once_are_the_sequential_ones(env, tiny_model_dir):
    # Two bases generate at the same time (each under its own lock): a seeded reply must not
    # depend on what the other draws. (Seeding torch's global RNG made them interleave.)
    other = env.registry.add("base", tiny_model_dir)  # a second copy: another base, another lock
    seeds = {env.base_id: 3, other: 4}
    prompt = [{"role": "user", "content": "hi"}]

    def replies(version_id: int) -> list[str]:
        return [
            env.agent.generate(
                prompt, SamplingParams(max_new_tokens=32, seed=seeds[version_id] + i), version_id
            )
            for i in range(4)
        ]

    expected = {v: replies(v) for v in seeds}
    results: dict[int, list[str]] = {}
    threads = [
        threading.Thread(target=lambda v=v: results.__setitem__(v, replies(v))) for v in seeds
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == expected


def test_failed_generation_keeps_the_user_message_and_the_error(env, monkeypatch):
    policy = env.agent.policy()

    def broken(**_kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(policy.model, "generate", broken)
    conv = env.agent.new_conversation(env.user_id)
    last = env.agent.reply(conv, "hi", sampling=SHORT)
    assert last.done and "out of memory" in last.error
    user, reply = env.store.messages(conv)
    assert (user.role, user.content) == ("user", "hi")
    assert (reply.role, reply.content, reply.parent_id) == ("assistant", "", user.id)
    assert "RuntimeError: CUDA out of memory" in reply.error
    monkeypatch.undo()  # the next turn continues after the failed one, which is left out
    nxt = env.agent.reply(conv, "hello?", sampling=SHORT)
    assert nxt.error is None and env.store.get_message(nxt.user_message_id).parent_id == reply.id


# ---- rlchat chat -----------------------------------------------------------------------


def test_chat_command_reads_piped_lines(env, sqlite_settings, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", _stdin("hello\n\n/new\nsecond chat\n/quit\nignored\n"))
    args = ["--data-dir", str(sqlite_settings.data_dir), "chat", "--max-new-tokens", "6"]
    assert cli_main([*args, "--user", "carol", "--seed", "0"]) == 0
    assert capsys.readouterr().out.count("bot> ") == 2
    convs = env.store.list_conversations(env.store.get_user("carol").id)
    assert [[m.role for m in env.store.messages(c.id)] for c in convs] == [
        ["user", "assistant"]
    ] * 2


def test_chat_command_without_deployed_model_exits_2(sqlite_settings, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", _stdin("hello\n"))
    assert cli_main(["--data-dir", str(sqlite_settings.data_dir), "chat"]) == 2
    assert "rlchat starter ensure" in capsys.readouterr().err


def _stdin(text: str) -> io.TextIOWrapper:
    """A piped stdin: text over bytes, as `rlchat chat` reads it (through `.buffer`)."""
    return io.TextIOWrapper(io.BytesIO(text.encode("utf-8")), encoding="utf-8")
