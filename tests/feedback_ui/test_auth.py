"""Passwords, callers and roles, and the `rlchat users` command."""

from __future__ import annotations

import io

import pytest

from agent.errors import PermissionDenied, ValidationError
from feedback_ui.auth import Access, Caller, hash_password, verify_password
from rlchat import cli


def test_password_hash_is_salted_and_verifies() -> None:
    a, b = hash_password("s3cret-pass"), hash_password("s3cret-pass")
    assert a != b and a.startswith("scrypt$")
    assert verify_password("s3cret-pass", a) and verify_password("s3cret-pass", b)
    assert not verify_password("s3cret-pasS", a)
    assert not verify_password("s3cret-pass", None)
    assert not verify_password("s3cret-pass", "scrypt$garbage")
    assert not verify_password("s3cret-pass", "md5$1$2$3$aa$bb")


def test_short_password_refused() -> None:
    with pytest.raises(ValidationError, match="at least 8"):
        hash_password("short")


def test_roles_are_ordered() -> None:
    admin, user = Caller(1, "root", "admin"), Caller(2, "alice", "user")
    assert admin.can("annotator") and admin.can("user")
    assert not user.can("annotator")
    with pytest.raises(PermissionDenied, match="deploying needs the admin role"):
        user.require("admin", "deploying")


def test_access_with_and_without_auth(store, people) -> None:
    access = Access(store, auth=True)
    assert access.check_login("alice", "correct horse battery")
    assert not access.check_login("alice", "wrong password!")
    assert not access.check_login("nobody", "correct horse battery")
    assert access.caller("ann").role == "annotator"
    with pytest.raises(PermissionDenied, match="not logged in"):
        access.caller(None)
    with pytest.raises(PermissionDenied, match="no longer exists"):
        access.caller("ghost")
    local = Access(store, auth=False).caller("alice")  # the name is ignored without auth
    assert (local.name, local.role) == ("local", "admin")


def test_users_command(settings, store, monkeypatch, capsys) -> None:
    base = ["--data-dir", str(settings.data_dir), "--database-url", settings.database_url]
    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-password\n"))
    assert cli.main([*base, "users", "add", "dora", "--role", "annotator", "--password-stdin"]) == 0
    assert cli.main([*base, "users", "set-role", "dora", "admin"]) == 0
    assert cli.main([*base, "users", "list"]) == 0
    out = capsys.readouterr().out
    assert "added user 'dora'" in out and "admin" in out.splitlines()[-1]
    user = store.get_user("dora")
    assert user.role == "admin" and verify_password("a-long-password", user.password_hash)
    assert "a-long-password" not in user.password_hash
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert cli.main([*base, "users", "add", "eve", "--password-stdin"]) == 2
    assert "at least 8" in capsys.readouterr().err
    assert cli.main([*base, "users", "set-role", "nobody", "user"]) == 2


def test_scrypt_cost_is_owasp_and_old_hashes_upgrade_at_login(store) -> None:
    import hashlib
    import secrets

    assert hash_password("s3cret-pass").split("$")[1:4] == ["131072", "8", "1"]
    salt = secrets.token_bytes(16)
    weak = hashlib.scrypt(b"an-old-password", salt=salt, n=2**14, r=8, p=1, dklen=32)
    old = f"scrypt${2**14}$8$1${salt.hex()}${weak.hex()}"
    store.create_user("olduser", password_hash=old)
    access = Access(store, auth=True)
    assert not access.check_login("olduser", "wrong-password")
    assert store.get_user("olduser").password_hash == old  # a wrong password changes nothing
    assert access.check_login("olduser", "an-old-password")
    upgraded = store.get_user("olduser")
    assert upgraded.password_hash.split("$")[1] == "131072"
    assert upgraded.session_epoch == 0  # an upgrade is not a password change
    assert access.check_login("olduser", "an-old-password")


def test_unknown_user_costs_the_same_scrypt_work(store, people, monkeypatch) -> None:
    import hashlib

    access = Access(store, auth=True)
    access.check_login("nobody", "x" * 8)  # the first call may build the dummy hash
    calls: list[int] = []
    real = hashlib.scrypt

    def counting(*args, **kwargs):
        calls.append(kwargs["n"])
        return real(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", counting)
    assert not access.check_login("alice", "wrong password!")
    assert not access.check_login("nobody", "wrong password!")
    assert not access.check_login("", "wrong password!")
    assert not access.check_login("nul\x00name", "wrong password!")  # no database error either
    assert calls == [2**17] * 4


def test_user_names_are_printable_and_unique_after_normalisation(
    settings, store, monkeypatch, capsys
) -> None:
    base = ["--data-dir", str(settings.data_dir), "--database-url", settings.database_url]

    def add(name: str) -> int:
        monkeypatch.setattr("sys.stdin", io.StringIO("a-long-password\n"))
        return cli.main([*base, "users", "add", name, "--password-stdin"])

    assert add("alice") == 0
    capsys.readouterr()
    for bad, why in [
        ("root ", "whitespace"),
        ("adm\u202ein", "bidi control"),
        ("new\nline", "whitespace"),
        ("zero\u200bwidth", "invisible"),
        ("bell\x07", "control character"),
        ("ALICE", "already exists"),
        ("\uff41\uff4c\uff49\uff43\uff45", "already exists"),  # full-width alice
        ("x" * 81, "over the limit of 80"),
    ]:
        assert add(bad) == 2, bad
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert [u.name for u in store.list_users()] == ["alice"]


def test_disable_enable_delete_and_sessions_epoch(
    settings, store, people, monkeypatch, capsys
) -> None:
    base = ["--data-dir", str(settings.data_dir), "--database-url", settings.database_url]
    access = Access(store, auth=True)
    assert cli.main([*base, "users", "disable", "alice"]) == 0
    assert store.get_user("alice").disabled
    assert not access.check_login("alice", "correct horse battery")
    with pytest.raises(PermissionDenied, match="disabled"):
        access.caller("alice")
    assert cli.main([*base, "users", "enable", "alice"]) == 0
    assert access.check_login("alice", "correct horse battery")
    epoch = store.get_user("alice").session_epoch
    assert cli.main([*base, "users", "set-role", "alice", "annotator"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("another-password\n"))
    assert cli.main([*base, "users", "passwd", "alice", "--password-stdin"]) == 0
    assert store.get_user("alice").session_epoch == epoch + 2

    conv = store.create_conversation(people.carol, "")
    store.append_message(conv, "user", "hi")
    capsys.readouterr()
    assert cli.main([*base, "users", "delete", "carol"]) == 2
    assert "1 conversations" in capsys.readouterr().err and store.get_user("carol")
    assert cli.main([*base, "users", "delete", "carol", "--yes"]) == 0
    assert store.get_user("carol") is None and store.list_conversations() == []
    assert cli.main([*base, "users", "delete", "ghost"]) == 2


def test_get_or_create_finds_a_user_under_any_spelling(store, people) -> None:
    from agent.store import users

    assert users.get_or_create_user(store, "ALICE").id == people.alice
    assert users.get_or_create_user(store, "\uff41\uff4c\uff49\uff43\uff45").id == people.alice
    dora = users.get_or_create_user(store, "dora")
    assert users.get_or_create_user(store, "Dora").id == dora.id
    with pytest.raises(ValidationError, match="whitespace"):
        users.get_or_create_user(store, "new\nline")
