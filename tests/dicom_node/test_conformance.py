"""The conformance corpus (tests/dicom_node/conformance_corpus.py) through a real PACS: every case is uploaded to
Orthanc, which C-STOREs it to the node in the case's transfer syntax (Orthanc 1.10 sends all thirteen as
they are; the node's row for the instance says which it received); the scripted model analyses what the
node selects, and the results are checked where a radiologist finds them, in Orthanc: each SR and GSPS
valid for dciodvfy, about the analysed image, its boxes inside it.

One Orthanc and one node for the module (a second pair for files whose SOP Instance UID another file
already uses); every case is sent first, then each is checked on its own.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.server import Node
from records.clock import utcnow
from records.db import make_engine, make_session_factory, upgrade
from records.pixels import model_image, read_model_image
from records.settings import CallerRule, DeliverySettings, Destination, NodeSettings, Settings
from records.storage import InstanceStore
from records.tables import DeliveryState, Instance, OutboxItem, Study, StudyState
from testbed.network import wait_for
from testbed.orthanc import Orthanc, running_orthanc
from tests.dicom_node.conformance_corpus import CASES, NO_CONTEXT, Case

SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.34": "sr", "1.2.840.10008.5.1.4.1.1.88.22": "narrative"}
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
FINAL_STATES = {StudyState.analysed, StudyState.nothing_to_analyse, StudyState.failed}
FAST_RETRIES = DeliverySettings(retry_backoff_s=0.5, max_backoff_s=1, timeout_s=10)
BY_ID = {case.case_id: case for case in CASES}


# -- one node and one Orthanc: the site ------------------------------------------------------------------------

@dataclass
class Site:
    """A node (in-process, SQLite, the scripted model) and the Orthanc that routes to it and gets the results."""

    node: Node
    sessions: sessionmaker[Session]
    store: InstanceStore
    orthanc: Orthanc


@contextmanager
def running_site(folder: Path) -> Iterator[Site]:
    from radvlm.backends.scripted import ScriptedBackend
    from results.outbox import Routing
    from worker.context import WorkerContext
    from worker.dispatch import InProcessRunner
    from worker.model_thread import ModelThread
    from worker.pipeline import AnalysisOptions

    folder.mkdir(parents=True)
    url = f"sqlite:///{folder / 'radvlm.sqlite'}"
    upgrade(url)
    settings = NodeSettings(port=0, bind_address="127.0.0.1", stable_age_s=1.5, completion_poll_s=0.2,
                            disk_reserve_mb=1, fsync=False,
                            allowed_callers=[CallerRule(ae_title="ORTHANC")])
    sessions = make_session_factory(make_engine(url, pre_ping=False))
    store = InstanceStore(folder / "dicom", fsync=False)
    holder: dict[str, InProcessRunner] = {}
    node = Node(settings, sessions, store, on_ready=lambda s, v: holder["runner"](s, v), clock=utcnow)
    node.start()
    with ExitStack() as stack:
        stack.callback(node.stop)
        orthanc = stack.enter_context(running_orthanc(folder / "orthanc", {"RADVLM": ("RADVLM", "127.0.0.1",
                                                                                     node.port)}))
        pacs = Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port)
        model_thread = stack.enter_context(ModelThread())
        ctx = WorkerContext(settings=Settings(destinations=[pacs], delivery=FAST_RETRIES), sessions=sessions,
                            store=store, options=AnalysisOptions(max_new_tokens=64),
                            outputs=Routing(destinations=[pacs], policy=FAST_RETRIES), _backend=ScriptedBackend())
        runner = holder["runner"] = InProcessRunner(ctx, model_thread)
        runner.start()
        stack.callback(runner.close)
        yield Site(node, sessions, store, orthanc)


# -- what came back ------------------------------------------------------------------------------------------

@dataclass
class Returned:
    """An SR or GSPS found in Orthanc: its kind, dataset, dciodvfy errors and the images it references."""

    kind: str
    ds: Dataset
    errors: list[str]
    images: set[str]


@dataclass
class CaseResult:
    """What became of one case: the send, the node's instance row (if stored), the objects in Orthanc."""

    sent: str  # "" when Orthanc reported success, else its error text
    node_port: int = 0
    instance: Instance | None = None
    study: Study | None = None
    stored_path: Path | None = None
    returned: list[Returned] = field(default_factory=list)


def _image_references(ds: Dataset) -> set[str]:
    """The SOP Instance UIDs of the images an SR or GSPS is about (evidence, content, referenced series)."""
    found: set[str] = set()

    def walk(items: object) -> None:
        for item in items or []:  # type: ignore[attr-defined]
            for seq in ("ReferencedSeriesSequence", "ReferencedSOPSequence", "ReferencedImageSequence"):
                walk(item.get(seq))
            if "ReferencedSOPInstanceUID" in item and str(item.get("ReferencedSOPClassUID", "")) not in (
                    *SR_CLASSES, GSPS_CLASS):
                found.add(str(item.ReferencedSOPInstanceUID))
            walk(item.get("ContentSequence"))

    walk(ds.get("CurrentRequestedProcedureEvidenceSequence"))
    walk(ds.get("ContentSequence"))
    walk(ds.get("ReferencedSeriesSequence"))
    walk(ds.get("GraphicAnnotationSequence"))
    return found


def _dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def _returned_objects(orthanc: Orthanc, folder: Path) -> list[Returned]:
    """Every SR and presentation state Orthanc holds, read back from Orthanc and checked by dciodvfy."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for series in orthanc.request("GET", "/series?expand"):
        if series["MainDicomTags"].get("Modality") not in ("SR", "PR"):
            continue
        for instance in series["Instances"]:
            path = folder / f"{instance}.dcm"
            path.write_bytes(_orthanc_bytes(orthanc, f"/instances/{instance}/file"))
            paths.append(path)
    with ThreadPoolExecutor(2) as pool:
        errors = list(pool.map(_dciodvfy_errors, paths))
    returned = []
    for path, found in zip(paths, errors, strict=True):
        ds = pydicom.dcmread(path)
        kind = "gsps" if ds.SOPClassUID == GSPS_CLASS else SR_CLASSES.get(str(ds.SOPClassUID), str(ds.SOPClassUID))
        returned.append(Returned(kind, ds, found, _image_references(ds)))
    return returned


def _orthanc_bytes(orthanc: Orthanc, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{orthanc.http_port}{path}", timeout=60) as rsp:
        return bytes(rsp.read())


# -- sending ---------------------------------------------------------------------------------------------------

def _send_through_orthanc(orthanc: Orthanc, files: list[Path]) -> str:
    try:
        ids = [orthanc.upload(path) for path in files]
    except urllib.error.HTTPError as exc:
        return f"Orthanc refused the upload: {exc.code} {exc.read().decode(errors='replace')}"
    try:
        orthanc.send("RADVLM", *ids)
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        try:
            details = json.loads(body)
            return f"{details.get('Message', '')}: {details.get('Details', '')}"
        except ValueError:
            return body or str(exc)
    return ""


def _send(sites: list[Site], folder: Path) -> dict[str, str]:
    """Every case, its study's files together, one study after the other: the send's result by case id."""
    groups: dict[tuple[int, str], list[Case]] = defaultdict(list)
    for case in CASES:
        groups[(case.site, case.study or case.case_id)].append(case)
    sent = {}
    for (site, _), cases in groups.items():
        result = _send_through_orthanc(sites[site].orthanc, [case.write(folder) for case in cases])
        sent.update({case.case_id: result for case in cases})
    return sent


def _settled(site: Site, sop_uids: set[str]) -> bool:
    """Every stored case's study finished, and nothing left in the outbox."""
    with site.sessions() as session:
        rows = session.execute(select(Instance.sop_instance_uid, Study.state).join(Study)
                               .where(Instance.sop_instance_uid.in_(sop_uids))).all()
        pending = session.scalar(select(OutboxItem.id).where(OutboxItem.state == DeliveryState.pending).limit(1))
    return {uid for uid, _ in rows} == sop_uids and all(state in FINAL_STATES for _, state in rows) and pending is None


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, CaseResult]]:
    folder = tmp_path_factory.mktemp("conformance")
    corpus = folder / "corpus"
    corpus.mkdir()
    with ExitStack() as stack:
        sites = [stack.enter_context(running_site(folder / f"site-{n}"))
                 for n in range(max(case.site for case in CASES) + 1)]
        sent = _send(sites, corpus)
        expected_stored: dict[int, set[str]] = defaultdict(set)
        uids = {case.case_id: str(pydicom.dcmread(corpus / f"{case.case_id}.dcm", stop_before_pixels=True)
                                  .SOPInstanceUID) for case in CASES}
        for case in CASES:
            if not sent[case.case_id]:
                expected_stored[case.site].add(uids[case.case_id])
        for n, site in enumerate(sites):
            try:
                wait_for(lambda s=site, u=expected_stored[n]: _settled(s, u), 180, interval=0.5)
            except TimeoutError:
                pass  # each case's own test says what did not finish
        returned = [_returned_objects(site.orthanc, folder / f"returned-{n}") for n, site in enumerate(sites)]
        found = {}
        for case in CASES:
            site = sites[case.site]
            with site.sessions() as session:
                instance = session.scalar(select(Instance).where(Instance.sop_instance_uid == uids[case.case_id]))
                study = instance.study if instance is not None else None
            found[case.case_id] = CaseResult(
                sent=sent[case.case_id], node_port=site.node.port, instance=instance, study=study,
                stored_path=site.store.path(instance.path) if instance is not None else None,
                returned=[r for r in returned[case.site] if uids[case.case_id] in r.images])
        found["*unmatched*"] = CaseResult(sent="", returned=[
            r for n, objects in enumerate(returned) for r in objects
            if not any(uids[c.case_id] in r.images for c in CASES if c.site == n)])
        yield found


# -- the checks ------------------------------------------------------------------------------------------------

def _check_refused(case: Case, outcome: CaseResult) -> None:
    assert outcome.sent, f"{case.case_id}: the send succeeded; expected a refusal"
    assert outcome.instance is None, f"{case.case_id}: refused, but the node stored it"
    if case.status == (NO_CONTEXT,):  # Orthanc only says it found no syntax to send in: ask the node
        sop_class = case.build().SOPClassUID
        ae = AE(ae_title="ORTHANC")
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", outcome.node_port, ae_title="RADVLM")
        if assoc.is_established:
            assoc.release()
        assert [(c.abstract_syntax, c.result) for c in assoc.rejected_contexts] == [(sop_class, 3)], (
            "the node must reject the context: abstract syntax not supported")
    elif case.status:
        assert any(f"{code:04x}" in outcome.sent.lower() for code in case.status), outcome.sent


def _check_skipped(case: Case, outcome: CaseResult) -> None:
    instance = outcome.instance
    assert outcome.sent == "", f"{case.case_id}: the send failed: {outcome.sent}"
    assert instance is not None, f"{case.case_id}: not stored"
    assert instance.transfer_syntax_uid == case.transfer_syntax
    reasons = f"{instance.selection_reason or ''} | {instance.pixel_error or ''}"
    assert not instance.usable, f"{case.case_id}: usable ({reasons}); expected skipped ({case.reason})"
    assert case.reason.lower() in reasons.lower(), reasons
    assert outcome.returned == [], f"{case.case_id}: skipped, yet results reference it"


def _inside(points: np.ndarray, columns: int, rows: int) -> bool:
    return bool((points >= 0).all() and (points[:, 0] <= columns).all() and (points[:, 1] <= rows).all())


def _scoord_points(items: object) -> Iterator[np.ndarray]:
    for item in items or []:  # type: ignore[attr-defined]
        if item.ValueType == "SCOORD":
            yield np.asarray(item.GraphicData, dtype=np.float64).reshape(-1, 2)
        yield from _scoord_points(item.get("ContentSequence"))


def _check_analysed(case: Case, outcome: CaseResult) -> None:
    instance = outcome.instance
    assert outcome.sent == "", f"{case.case_id}: the send failed: {outcome.sent}"
    assert instance is not None, f"{case.case_id}: not stored"
    assert instance.transfer_syntax_uid == case.transfer_syntax, "the node did not receive the intended syntax"
    assert instance.usable, f"{case.case_id}: not analysed: {instance.selection_reason} | {instance.pixel_error}"
    assert outcome.study is not None and outcome.study.state is StudyState.analysed, outcome.study.state_reason
    header = pydicom.dcmread(outcome.stored_path, stop_before_pixels=True)
    columns, rows = int(header.Columns), int(header.Rows)
    kinds = sorted(r.kind for r in outcome.returned)
    assert kinds == ["gsps", "narrative", "sr"], kinds
    for returned in outcome.returned:
        assert returned.errors == [], f"dciodvfy, {returned.kind}: {returned.errors}"
        assert returned.images == {instance.sop_instance_uid}, returned.images
        assert returned.ds.StudyInstanceUID == header.StudyInstanceUID
    [sr] = [r.ds for r in outcome.returned if r.kind == "sr"]
    regions = list(_scoord_points(sr.ContentSequence))
    assert regions, "the scripted model's boxes are in the SR"
    assert all(_inside(points, columns, rows) for points in regions), regions
    [gsps] = [r.ds for r in outcome.returned if r.kind == "gsps"]
    graphics = [np.asarray(g.GraphicData, dtype=np.float64).reshape(-1, 2)
                for annotation in gsps.GraphicAnnotationSequence for g in annotation.GraphicObjectSequence]
    assert len(graphics) == len(regions) and all(_inside(points, columns, rows) for points in graphics)
    if case.lossless:
        received = read_model_image(outcome.stored_path)
        assert np.array_equal(received.pixels, model_image(case.build()).pixels), "lossless, yet pixels differ"


@pytest.mark.parametrize("case", CASES, ids=[case.case_id for case in CASES])
def test_case(case: Case, outcomes: dict[str, CaseResult]) -> None:
    outcome = outcomes[case.case_id]
    if case.expected == "refused":
        _check_refused(case, outcome)
    elif case.expected == "skipped":
        _check_skipped(case, outcome)
    else:
        _check_analysed(case, outcome)


def test_every_returned_object_is_about_one_case(outcomes: dict[str, CaseResult]) -> None:
    unmatched = outcomes["*unmatched*"].returned
    assert unmatched == [], [(r.kind, r.images) for r in unmatched]


# -- display transforms, pixel by pixel, without the network ------------------------------------------------------

def _window_range(ds: Dataset) -> tuple[float, float]:
    """The output range of pydicom's windowing for ``ds`` (PS3.3 C.11.2.1.2, as pydicom implements it)."""
    if ds.get("ModalityLUTSequence"):
        low, high = 0.0, 2.0 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
    elif ds.PixelRepresentation == 0:
        low, high = 0.0, 2.0 ** int(ds.BitsStored) - 1
    else:
        low, high = -(2.0 ** (int(ds.BitsStored) - 1)), 2.0 ** (int(ds.BitsStored) - 1) - 1
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        low = low * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        high = high * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return min(low, high), max(low, high)


def reference_pixels(ds: Dataset) -> np.ndarray:
    """pydicom's Modality LUT and VOI LUT on the stored values, scaled to 8 bits over the VOI output range
    (a VOI LUT's: 0 to 2^bits - 1 of its descriptor; a window's: pydicom's output range; none: the data's),
    inverted for MONOCHROME1."""
    values = apply_modality_lut(ds.pixel_array, ds)
    if ds.get("VOILUTSequence"):
        voi = apply_voi_lut(values, ds, index=0, prefer_lut=True)
        low, high = 0.0, 2.0 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
    elif "WindowCenter" in ds:
        voi = apply_voi_lut(values, ds, index=0, prefer_lut=False)
        low, high = _window_range(ds)
    else:
        voi = values.astype(np.float64)
        low, high = float(voi.min()), float(voi.max())
    scaled = np.clip((voi - low) / (high - low), 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.rint(scaled * 255.0).astype(np.uint8)


DISPLAY = [case for case in CASES if case.display]


@pytest.mark.parametrize("case", DISPLAY, ids=[case.case_id for case in DISPLAY])
def test_display_transform_matches_pydicom(case: Case, tmp_path: Path) -> None:
    path = case.write(tmp_path)  # as the node stores it: the bytes, read back
    ds = pydicom.dcmread(path)
    node = model_image(ds).pixels.astype(int)
    reference = reference_pixels(pydicom.dcmread(path)).astype(int)
    difference = np.abs(node - reference)
    assert difference.max() <= 1, (f"{(difference > 1).sum()} of {difference.size} pixels differ by more than one "
                                   f"grey level (at most {difference.max()})")


def test_the_table_names_each_case_once() -> None:
    assert len(BY_ID) == len(CASES)
    assert all(case.expected in ("analysed", "skipped", "refused") for case in CASES)
    assert all(case.reason for case in CASES if case.expected != "analysed")
