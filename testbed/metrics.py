"""A process's Prometheus page, read as the tests read it."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(port: int, path: str = "/metrics") -> dict[tuple[str, frozenset], float]:
    """A process's Prometheus page as {(sample name, labels): value}, parsed by prometheus_client."""
    text = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10).text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def sample(page: dict, name: str, **labels: str) -> float:
    return page.get((name, frozenset(labels.items())), 0.0)
