"""The running app through `gradio_client` (the programmatic API), with auth on."""

from __future__ import annotations

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
