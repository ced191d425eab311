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
