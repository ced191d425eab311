"""`rlchat chat`: a terminal chat on the deployed policy, logged like any other chat.

Reads one message per line from stdin (a terminal or a pipe), as UTF-8: a line that is not
valid UTF-8 is reported and skipped. `/new` starts a new conversation, `/quit` or end of
input exits.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from agent.chat import ChatAgent, SamplingParams
from agent.errors import ValidationError
from agent.store import users
from agent.store.users import check_user_name
from rlchat.commands import open_store

HELP = "type a message and press enter; /new starts a new conversation, /quit (or Ctrl-D) exits"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with the deployed model in the terminal")
    defaults = SamplingParams()
    p.add_argument("--system", help="system prompt (default: the settings' system_prompt)")
    p.add_argument(
        "--user", default=None, help="user name the chat is logged under (default: $USER)"
    )
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=defaults.top_k)
    p.add_argument("--top-p", type=float, default=defaults.top_p)
    p.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (reproducible)")
    p.add_argument("--device", default=None, help="auto (default), cpu or cuda[:N]")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings, store = open_store(args)
    sampling = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    sampling.validate()
    name = check_user_name(args.user or _login_name())
    agent = ChatAgent(store, settings, device=args.device)
    agent.policy()  # load now: no deployed model -> a NotFoundError saying what to run
    user = users.get_or_create_user(store, name)
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP)
    conversation = agent.new_conversation(user.id, args.system)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = _read_line()
        if line is None:
            continue
        if not line or line.strip() == "/quit":
            break
        text = line.rstrip("\n")
        if text.strip() == "/new":
            conversation = agent.new_conversation(user.id, args.system)
            print("(new conversation)")
            continue
        if not text.strip():
            continue
        _turn(agent, conversation, text, sampling)
    return 0


def _turn(agent: ChatAgent, conversation: int, text: str, sampling: SamplingParams) -> None:
    """One exchange: the reply streamed to stdout; a bad message is reported, not fatal."""
    try:
        chunks = agent.stream_reply(conversation, text, sampling=sampling)
    except ValidationError as exc:
        print(f"rlchat: {exc}", file=sys.stderr)
        return
    print("bot> ", end="", flush=True)
    for chunk in chunks:
        print(chunk.delta, end="", flush=True)
        if chunk.error:
            print(f"\nrlchat: the reply failed: {chunk.error}", file=sys.stderr)
    print()


def _read_line() -> str | None:
    """One line of stdin ("" at the end); None, after saying so, for a line that is not UTF-8."""
    raw = sys.stdin.buffer.readline()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        print(
            f"rlchat: that line is not valid UTF-8 text (byte {exc.start + 1}); it was "
            "skipped: set your terminal to UTF-8 and send it again",
            file=sys.stderr,
        )
        return None


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"
