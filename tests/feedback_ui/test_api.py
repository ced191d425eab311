"""The running app through `gradio_client` (the programmatic API), with auth on."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from gradio_client import Client
from ui_helpers import PASSWORD, add_people, free_port

from agent.chat import ChatAgent
from feedback_ui.app import ServeConfig, build_app, launch


@pytest.fixture
def server(sqlite_store, sqlite_settings, deployed_tiny):
    people = add_people(sqlite_store)
    agent = ChatAgent(sqlite_store, sqlite_settings, device="cpu")
    app = build_app(sqlite_store, agent, sqlite_settings, auth=True)
    config = ServeConfig(port=free_port(), auth=True)
    launch(app, sqlite_store, config, block=False)
    try:
        yield f"http://127.0.0.1:{config.port}/", people
    finally:
        app.close()


def test_api_checks_roles_on_the_server(server, sqlite_store, deployed_tiny) -> None:
    url, people = server
    candidate = sqlite_store.register_model_version("base", "/nowhere", name="candidate")
    alice = Client(url, auth=("alice", PASSWORD), verbose=False)
    with pytest.raises(Exception, match="deploying a model needs the admin role"):
        alice.predict(candidate, api_name="/deploy")
    with pytest.raises(Exception, match="rolling back a model needs the admin role"):
        alice.predict(api_name="/rollback")
    with pytest.raises(Exception, match="needs the admin role"):
        alice.predict(api_name="/dashboard_refresh")
    assert sqlite_store.deployed_version().id == deployed_tiny

    # The chat endpoint works for alice and stores her turn under her name.
    result = alice.predict(
        "hello from the API", "be brief", 0.8, 0.95, 8, 1.1, api_name="/chat_send"
    )
    [conv] = sqlite_store.list_conversations()
    assert conv.user_id == people.alice
    user_msg, reply = sqlite_store.messages(conv.id)
    assert user_msg.content == "hello from the API" and reply.role == "assistant"
    chatbot, _, reply_id, _, _ = result
    assert reply_id == reply.id
    assert chatbot[-1]["role"] == "assistant"

    root = Client(url, auth=("root", PASSWORD), verbose=False)
    message = root.predict(deployed_tiny, api_name="/deploy")[0]
    assert f"root deployed version {deployed_tiny}" in message
    with pytest.raises(Exception, match="invalid|credentials|login|401"):
        Client(url, auth=("root", "wrong password"), verbose=False)


def call(http: httpx.Client, api_name: str, *data: Any) -> tuple[str, Any]:
    """One call through Gradio's HTTP API as raw JSON (lone surrogates as \\uXXXX escapes,
    NaN as NaN), which gradio_client cannot send; returns (last event, its data)."""
    body = json.dumps({"data": list(data)})
    posted = http.post(
        f"gradio_api/call/{api_name}", content=body, headers={"content-type": "application/json"}
    )
    posted.raise_for_status()
    stream = http.get(f"gradio_api/call/{api_name}/{posted.json()['event_id']}").text
    event, payload = "", None
    for line in stream.splitlines():
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            payload = json.loads(line.removeprefix("data: "))
    return event, payload


def test_bad_input_through_the_api_gets_a_message_not_a_null_error(
    server, sqlite_store, deployed_tiny
) -> None:
    url, _ = server
    http = httpx.Client(base_url=url, timeout=120)
    http.post("login", data={"username": "alice", "password": PASSWORD}).raise_for_status()
    event, outputs = call(http, "chat_send", "hello", "be brief", 0.8, 0.95, 8, 1.1)
    assert event == "complete", outputs
    reply_id = outputs[3]  # after the state
    before = sqlite_store.counts()
    for args, message in [
        (("lone \ud800 surrogate", "", 0.8, 0.95, 8, 1.1), "message: contains a lone surrogate"),
        (("hi", "system \udfff", 0.8, 0.95, 8, 1.1), "system prompt: contains a lone surrogate"),
        (("hi", "", 0.8, 0.95, float("nan"), 1.1), "max new tokens: NaN is not a number"),
        (("hi", "", "hot", 0.95, 8, 1.1), "temperature: expected a number, got &#x27;hot&#x27;"),
        (("hi", "", 0.8, 0.95, 8.5, 1.1), "max new tokens: 8.5 is not a whole number"),
    ]:
        event, detail = call(http, "chat_send", *args)
        assert event == "error" and message in str(detail), (args, event, detail)
    event, detail = call(http, "chat_like")
    assert event == "error" and "like: no reply was clicked" in str(detail)
    event, detail = call(http, "chat_rate", reply_id, 1, [], "nice \ud800")
    assert event == "error" and "comment: contains a lone surrogate" in str(detail)
    event, detail = call(http, "chat_rate", reply_id + 0.5, 1, [], "")
    assert event == "error" and f"reply: {reply_id + 0.5} is not an id" in str(detail)
    assert sqlite_store.counts() == before  # nothing half-written by any refused call
    event, detail = call(http, "chat_rate", reply_id, 1, [], "fine")
    assert event == "complete" and "saved" in str(detail)


def test_ids_are_whole_numbers_not_rounded(server, sqlite_store, deployed_tiny) -> None:
    url, _ = server
    other = sqlite_store.register_model_version("base", "org/other-model", name="other")
    http = httpx.Client(base_url=url, timeout=120)
    http.post("login", data={"username": "root", "password": PASSWORD}).raise_for_status()
    event, detail = call(http, "deploy", other - 0.5)  # would round to `other`
    assert event == "error" and f"version id: {other - 0.5} is not an id" in str(detail)
    event, detail = call(http, "deploy", "two")
    assert event == "error" and "version id: expected a number" in str(detail)
    assert sqlite_store.deployed_version().id == deployed_tiny
