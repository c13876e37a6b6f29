"""The machine's PostgreSQL and Redis on loopback, as the tests use them."""

from __future__ import annotations

import socket

POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def postgres_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


def flushed_redis(db: int) -> str:
    """The URL of database ``db`` on the machine's Redis, emptied: each test module that needs a broker has its own."""
    import pytest
    import redis

    url = f"redis://127.0.0.1:6379/{db}"
    try:
        redis.Redis.from_url(url).flushdb()
    except redis.ConnectionError:
        pytest.fail("Redis is not running on 127.0.0.1:6379 (scripts/test.sh starts it)")
    return url
