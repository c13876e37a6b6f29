"""docs/ says what the code does: every SOP class and transfer syntax, the HL7 example message, the open routes;
the README stays short and links every page."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.sop_class import (
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
    Verification,
)

from radvlm.backends.scripted import ScriptedBackend
from reception.sop import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from records.pixels import read_model_image
from records.schema import StudyResult
from records.settings import DeliverySettings, HL7Settings
from results.hl7 import parse_strict
from results.outbox import SR_CLASSES, hl7_result
from testbed.radiographs import radiograph
from worker.pipeline import AnalysisOptions, analyse_image

DOCS = Path(__file__).resolve().parents[1] / "docs"
README = DOCS.parent / "README.md"


def _rows_naming(text: str, uid: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|") and re.search(rf"\b{re.escape(uid)}\b", line)]


def test_conformance_statement_lists_every_sop_class_and_transfer_syntax():
    text = (DOCS / "conformance-statement.md").read_text()
    for uid in (*STORAGE_SOP_CLASSES, *TRANSFER_SYNTAXES, Verification):
        assert _rows_naming(text, uid), f"{uid.name} ({uid}) is accepted but not in the conformance statement"
    for uid in (*SR_CLASSES.values(), GrayscaleSoftcopyPresentationStateStorage, SecondaryCaptureImageStorage,
                ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        assert _rows_naming(text, uid), f"{uid.name} ({uid}) is sent but not in the conformance statement"
    named = set(re.findall(r"\b1\.2\.840\.10008\.(?:5\.1\.4\.1\.1|1\.2)[\d.]*\d\b", text))
    known = {*STORAGE_SOP_CLASSES, *TRANSFER_SYNTAXES, *SR_CLASSES.values(), GrayscaleSoftcopyPresentationStateStorage,
             SecondaryCaptureImageStorage}
    assert named <= {str(uid) for uid in known}, named - {str(uid) for uid in known}  # nothing claimed beyond


def test_hl7_example_is_what_the_code_builds():
    """The documented example, rebuilt from its stated inputs, byte for byte (segments one per line)."""
    text = (DOCS / "hl7-interface.md").read_text()
    example = text[text.index("## 6. Example"):].split("```\n")[1].strip()
    path = radiograph("RG1_UNCI.dcm")
    header = pydicom.dcmread(path, stop_before_pixels=True)
    backend = ScriptedBackend(findings=["cardiomegaly", "pleural effusion"])
    image = analyse_image(backend, read_model_image(path), header.SOPInstanceUID, header.SeriesInstanceUID,
                          AnalysisOptions())
    result = StudyResult(study_instance_uid=header.StudyInstanceUID, study_version=1, model_id=backend.model_id,
                         model_revision=backend.model_revision, prompt_version="p", backend="scripted",
                         images=[image], seconds=1)
    hl7 = HL7Settings(host="ris.example", port=2575)
    urgent = DeliverySettings(urgent_findings=["Pneumothorax", "Pleural Effusion"]).urgent_findings
    when = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
    built = hl7_result(result, header, hl7, urgent, when).payload.decode()
    parse_strict(built)
    assert built.replace("\r", "\n").strip() == example


def test_security_page_names_each_route_that_answers_without_a_token(sqlite_url, tmp_path):
    """Every other route answers 401 without one (test_api); these open ones are named in docs/security.md."""
    from collections import defaultdict

    from fastapi.testclient import TestClient
    from starlette.routing import Route

    from api.main import PAGE, create_app
    from records.settings import Settings

    app = create_app(Settings(database_url=sqlite_url, storage_dir=tmp_path))
    calls = [(method, route.path) for route in app.routes if isinstance(route, Route)
             for method in sorted(route.methods - {"HEAD"})]
    calls += [("GET", f"/ui/{file.name}") for file in sorted(PAGE.iterdir())]
    with TestClient(app) as client:
        answered = {path for method, path in calls if client.request(
            method, path.format_map(defaultdict(lambda: "1")), json={}, follow_redirects=False).status_code != 401}
    assert {"/health", "/metrics", "/openapi.json", "/docs", "/ui/app.js"} <= answered
    page = (DOCS / "security.md").read_text()
    assert [path for path in sorted(answered) if f"`{path}`" not in page and f"`{Path(path).name}`" not in page] \
        == []


def _local_links(path: Path) -> set[str]:
    """The relative link targets of a Markdown file, without their #anchors."""
    return {target.split("#")[0] for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text())
            if not re.match(r"[a-z]+:", target) and not target.startswith("#")}


def test_readme_is_short_and_links_every_docs_page():
    """The README stays an overview (at most 200 lines); the detail is in docs/, every page linked and present."""
    assert len(README.read_text().splitlines()) <= 200
    linked = _local_links(README)
    pages = {link for link in linked if link.startswith("docs/") and link.endswith(".md")}
    assert [page for page in sorted(pages) if not (README.parent / page).is_file()] == []
    assert [page.name for page in sorted(DOCS.glob("*.md")) if f"docs/{page.name}" not in pages] == []
    assert "docs/architecture.md" in pages
    for page in (README, *sorted(DOCS.glob("*.md"))):  # and the pages' own links resolve
        assert [link for link in sorted(_local_links(page)) if not (page.parent / link).exists()] == [], page.name
