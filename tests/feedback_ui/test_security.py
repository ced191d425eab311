"""Login limits and session ending, against a live `rlchat serve --auth` app (HTTP and gradio_client)."""

from __future__ import annotations

import httpx
import pytest
from gradio_client import Client
from ui_helpers import PASSWORD, add_people, free_port

from agent.store import users
from feedback_ui.app import ServeConfig, build_app, launch
from feedback_ui.auth import hash_password
from feedback_ui.login import LoginLimits


@pytest.fixture
def server(sqlite_store, sqlite_settings):
    """The app with auth and no chat model; at most 3 failures per name, 5 per address."""
    add_people(sqlite_store)
    app = build_app(sqlite_store, None, sqlite_settings, auth=True)
    limits = LoginLimits(window_s=60, per_user=3, per_address=5)
    config = ServeConfig(port=free_port(), auth=True, login=limits)
    launch(app, sqlite_store, config, block=False)
    try:
        yield f"http://127.0.0.1:{config.port}/"
    finally:
        app.close()


def login(url: str, name: str, password: str) -> httpx.Response:
    return httpx.post(f"{url}login", data={"username": name, "password": password}, timeout=60)


def test_failed_logins_are_limited_per_user_and_per_address(server) -> None:
    for _ in range(3):
        assert login(server, "alice", "wrong password").status_code == 400
    locked = login(server, "alice", PASSWORD)  # even the right password waits
    assert locked.status_code == 429
    seconds = int(locked.headers["Retry-After"])
    assert 0 < seconds <= 60
    assert f"try again in {seconds} s" in locked.json()["detail"]
    assert login(server, "ALICE", PASSWORD).status_code == 429  # one name, however spelled
    assert login(server, "root", PASSWORD).status_code == 200  # other names are not locked
    # Two more failures from this address (any names) reach the per-address limit of 5.
    assert login(server, "ghost", "wrong password").status_code == 400
    assert login(server, "carol", "wrong password").status_code == 400
    refused = login(server, "root", PASSWORD)
    assert refused.status_code == 429 and "try again in" in refused.json()["detail"]


def test_password_role_change_and_disable_end_open_sessions(server, sqlite_store) -> None:
    alice = Client(server, auth=("alice", PASSWORD), verbose=False)
    assert "alice" in alice.predict(api_name="/whoami")[0]
    users.set_password(sqlite_store, "alice", hash_password("a new password"))
    with pytest.raises(Exception):  # noqa: B017 - the old cookie no longer opens the app
        alice.predict(api_name="/whoami")
    with pytest.raises(Exception, match="credentials|login"):
        Client(server, auth=("alice", PASSWORD), verbose=False)
    alice = Client(server, auth=("alice", "a new password"), verbose=False)
    assert "(user)" in alice.predict(api_name="/whoami")[0]

    ann = Client(server, auth=("ann", PASSWORD), verbose=False)
    users.set_role(sqlite_store, "alice", "annotator")
    users.set_disabled(sqlite_store, "ann", True)
    for client in (alice, ann):
        with pytest.raises(Exception):  # noqa: B017
            client.predict(api_name="/whoami")
    alice = Client(server, auth=("alice", "a new password"), verbose=False)
    assert "(annotator)" in alice.predict(api_name="/whoami")[0]
    assert login(server, "ann", PASSWORD).status_code == 400
    # Another user's session is untouched by all of this.
    root = Client(server, auth=("root", PASSWORD), verbose=False)
    assert "root" in root.predict(api_name="/whoami")[0]


def test_a_known_session_id_gives_another_login_no_hold_over_that_page(server) -> None:
    alice = Client(server, auth=("alice", PASSWORD), verbose=False)
    assert "alice" in alice.predict(api_name="/whoami")[0]  # alice's page session is open
    carol = Client(server, auth=("carol", PASSWORD), verbose=False)
    carol.session_hash = alice.session_hash  # carol learnt alice's session id
    for api_name in ("/chat_stop", "/chat_new", "/arena_stop"):
        with pytest.raises(Exception, match="belongs to another login"):
            carol.predict(api_name=api_name)
    assert "alice" in alice.predict(api_name="/whoami")[0]
