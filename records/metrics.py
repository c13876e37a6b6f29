"""Prometheus metrics: one vocabulary for every process, each exposing what it does.

The node counts associations and instances, the workers analyses, tokens, GPU memory and
deliveries; the API adds, at each scrape, what the database and the queues hold (studies by
state, outbox, queue depths, live GPU workers). ``serve`` is one process and exposes all of it
at ``/metrics``. Labels never hold patient data: reasons, states, kinds and queue names only.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from records.tables import DeliveryState, OutboxItem, Study, StudyState

log = logging.getLogger(__name__)
T = TypeVar("T")

LATENCY_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))

ASSOCIATIONS = Counter("radvlm_associations", "DICOM associations requested of the node, by outcome",
                       ["outcome"])
ASSOCIATIONS_ACTIVE = Gauge("radvlm_associations_active", "DICOM associations open now")
INSTANCES_RECEIVED = Counter("radvlm_instances_received", "C-STORE requests answered with success",
                             ["outcome"])  # stored, duplicate
INSTANCES_REJECTED = Counter("radvlm_instances_rejected", "C-STORE requests refused, by reason", ["reason"])
INSTANCES_SKIPPED = Counter("radvlm_instances_skipped", "stored instances not analysed (not a frontal chest "
                            "image, or undecodable), by reason", ["reason"])
SIGN_OFFS = Counter("radvlm_sign_offs", "drafts signed off, by whether the radiologist edited them", ["edited"])
SIGNED_FINDINGS = Counter("radvlm_signed_findings", "each CheXpert finding at each sign-off: whether the draft "
                          "named it and whether the radiologist signed it", ["label", "drafted", "signed"])
IMAGES_REMOVED = Counter("radvlm_images_removed", "received files removed under node.keep_images_days")
STUDIES_COMPLETED = Counter("radvlm_studies_completed", "study versions completed, by outcome", ["outcome"])

OBJECTS_NOT_BUILT = Counter("radvlm_result_objects_not_built", "result objects (SR, GSPS, SC, HL7, FHIR) that could "
                            "not be built, by kind: the study's other objects were delivered", ["kind"])
ANALYSES = Counter("radvlm_analyses", "analysis attempts, by outcome", ["outcome"])  # done, retry, failed
ANALYSIS_LATENCY = Histogram("radvlm_analysis_latency_seconds", "study complete to result stored (queue included)",
                             buckets=LATENCY_BUCKETS)
ANALYSIS_DURATION = Histogram("radvlm_analysis_duration_seconds", "model time of one study",
                              buckets=LATENCY_BUCKETS)
DELIVERIES = Counter("radvlm_deliveries", "delivery attempts, by object kind and outcome", ["kind", "outcome"])
DELIVERY_LATENCY = Histogram("radvlm_delivery_latency_seconds", "result stored to confirmed by the destination",
                             ["kind"], buckets=LATENCY_BUCKETS)
GENERATED_TOKENS = Counter("radvlm_model_generated_tokens", "tokens the model generated", ["task"])
GENERATION_SECONDS = Counter("radvlm_model_generation_seconds", "seconds spent generating", ["task"])
TOKENS_PER_SECOND = Gauge("radvlm_model_tokens_per_second", "generated tokens per second in the last model call "
                          "(all sequences of a batch)", ["task"])
GPU_MEMORY = Gauge("radvlm_gpu_memory_bytes", "CUDA memory of this process (torch), by kind", ["kind"])


def observe_generation(task: str, new_tokens: int, seconds: float) -> None:
    """One model call (``task``: analysis or chat): tokens, time, and the GPU memory it leaves."""
    GENERATED_TOKENS.labels(task).inc(new_tokens)
    GENERATION_SECONDS.labels(task).inc(seconds)
    if seconds > 0:
        TOKENS_PER_SECOND.labels(task).set(new_tokens / seconds)
    torch = sys.modules.get("torch")  # only a process that loaded the model has it
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        GPU_MEMORY.labels("allocated").set(torch.cuda.memory_allocated())
        GPU_MEMORY.labels("reserved").set(torch.cuda.memory_reserved())
        GPU_MEMORY.labels("peak_allocated").set(torch.cuda.max_memory_allocated())


def skip_reason(reason: str | None, pixel_error: str | None) -> str:
    """A label value from a selection reason: its kind, without the header values after the colon."""
    if pixel_error:
        return "pixel error"
    return (reason or "unknown").split(":", 1)[0].strip()


QueueDepths = Callable[[], dict[str, int]]


class StateCollector(Collector):
    """Gauges read at scrape time from the database (and the broker, through ``queue_depths``)."""

    def __init__(self, sessions: sessionmaker[Session], queue_depths: QueueDepths | None = None,
                 gpu_workers: Callable[[], int] | None = None) -> None:
        self.sessions, self.queue_depths, self.gpu_workers = sessions, queue_depths, gpu_workers

    def describe(self) -> Iterable[Any]:
        return []  # collected at scrape time only: the database may be away when the collector registers

    def collect(self) -> Iterable[GaugeMetricFamily]:
        counts = _read("the database", self._counts)
        if counts is not None:
            studies, outbox = counts
            yield _family("radvlm_studies", "studies by state", "state",
                          {s.value: studies.get(s, 0) for s in StudyState})
            yield _family("radvlm_outbox_items", "result objects in the outbox by delivery state", "state",
                          {s.value: outbox.get(s, 0) for s in DeliveryState})
        if self.queue_depths is not None and (depths := _read("the queue depths", self.queue_depths)) is not None:
            yield _family("radvlm_queue_depth", "messages waiting per queue", "queue", depths)
        if self.gpu_workers is not None and (live := _read("the GPU workers", self.gpu_workers)) is not None:
            yield GaugeMetricFamily("radvlm_gpu_workers", "GPU workers alive (announced in Redis)", value=live)

    def _counts(self) -> tuple[dict[StudyState, int], dict[DeliveryState, int]]:
        with self.sessions() as session:
            studies = dict(session.execute(select(Study.state, func.count()).group_by(Study.state)).all())
            outbox = dict(session.execute(select(OutboxItem.state, func.count()).group_by(OutboxItem.state)).all())
        return studies, outbox


def _read(what: str, probe: Callable[[], T]) -> T | None:
    """A scrape must not fail because the database or the broker is briefly away: log it, leave the gauge out."""
    try:
        return probe()
    except Exception as exc:
        log.warning("metrics: cannot read %s: %s", what, exc)
        return None


def _family(name: str, documentation: str, label: str, values: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def redis_queue_depths(client: Any, queues: Sequence[str]) -> QueueDepths:
    """Celery's Redis queues hold one list per priority step (``gpu``, ``gpu:1`` ... ``gpu:9``)."""

    def depths() -> dict[str, int]:
        return {queue: sum(int(client.llen(name)) for name in [queue, *(f"{queue}:{step}" for step in range(1, 10))])
                for queue in queues}

    return depths


def serve_metrics(port: int, address: str = "0.0.0.0") -> None:
    """Expose this process's metrics on ``port`` (0: not at all); a port in use stops the process with why."""
    if port == 0:
        return
    try:
        start_http_server(port, addr=address)
    except OSError as exc:
        raise OSError(f"metrics port {port}: {exc.strerror}; set another port (0 turns the metrics off)") from exc
    log.info("metrics on http://%s:%d/metrics", address, port)


_ENGINE_COMPILED: list[Gauge] = []
_ENGINE_COMPILED_LOCK = threading.Lock()


def observe_engine(compiled: bool) -> None:
    """Whether the in-process engine's decode step runs compiled (1) or not (0: several times slower, the
    worker's log says why). The gauge exists only in a process that built such an engine."""
    with _ENGINE_COMPILED_LOCK:
        if not _ENGINE_COMPILED:
            _ENGINE_COMPILED.append(Gauge("radvlm_engine_compiled", "1 when the in-process model engine's decode step "
                                          "runs compiled, 0 when it runs uncompiled (several times slower; see "
                                          "the worker's log)"))
    _ENGINE_COMPILED[0].set(1 if compiled else 0)
