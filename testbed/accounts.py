"""The API's users in the tests: their tokens, their ``api.users`` entries, their headers, settings with them."""

from __future__ import annotations

import hashlib

from records.settings import Settings

TOKENS = {"dr.house": "radiologist token", "it.admin": "admin token", "dr.elsewhere": "another site"}


def users() -> list[dict]:
    digest = {name: hashlib.sha256(token.encode()).hexdigest() for name, token in TOKENS.items()}
    return [
        {"name": "dr.house", "person_name": "House^Gregory", "token_sha256": digest["dr.house"]},
        {"name": "it.admin", "role": "admin", "token_sha256": digest["it.admin"]},
        {"name": "dr.elsewhere", "token_sha256": digest["dr.elsewhere"], "sources": ["OTHERPACS"]},
    ]


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


HOUSE = auth("dr.house")


def settings_for(running, **api) -> Settings:  # type: ignore[no-untyped-def]
    return Settings(database_url=running.url, storage_dir=running.store.root, api={"users": users(), **api})
