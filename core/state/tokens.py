"""Admin tokens: created once and shown once, stored only as their hash, each with a role."""

from __future__ import annotations

from core.state.db import AdminToken
from core.state.keys import hash_token, new_token
from shared.errors import InvalidArgument

ROLES = ("manage", "read")
BOOTSTRAP_ENV = "SPK_ADMIN_TOKEN"


def create_admin_token(role: str, label: str = "") -> str:
    if role not in ROLES:
        raise InvalidArgument("role", f"must be one of {', '.join(ROLES)}")
    token = new_token("spk_admin")
    AdminToken.create(token_hash=hash_token(token), role=role, label=label)
    return token


def ensure_bootstrap_token(token: str) -> None:
    """An operator-provided manage token (from the environment), stored hashed, idempotent."""
    if len(token) < 16:
        raise InvalidArgument(BOOTSTRAP_ENV, "must be at least 16 characters")
    AdminToken.insert(
        token_hash=hash_token(token), role="manage", label="bootstrap"
    ).on_conflict_ignore().execute()


def list_admin_tokens() -> list[tuple[str, str, str, int]]:
    """(id, role, label, created_at); the id is the first 12 hex chars of the stored hash."""
    rows = AdminToken.select().order_by(AdminToken.created_at)
    return [(r.token_hash[:12], r.role, r.label, r.created_at) for r in rows]


def revoke_admin_token(token_id: str) -> None:
    if len(token_id) < 8:
        raise InvalidArgument("id", "give at least 8 characters of the id from `admin-token list`")
    matches = list(AdminToken.select().where(AdminToken.token_hash.startswith(token_id)))
    if len(matches) != 1:
        raise InvalidArgument("id", f"matches {len(matches)} tokens; give a longer prefix")
    matches[0].delete_instance()


def admin_role(token: str) -> str | None:
    row = AdminToken.get_or_none(AdminToken.token_hash == hash_token(token))
    return None if row is None else str(row.role)
