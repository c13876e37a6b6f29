"""The results in a real web viewer: OHIF's published build (``@ohif/app``, pinned) reads from an Orthanc
that holds a study analysed by the node; opened in headless Chromium, the SR's boxes are drawn where the
result says, with no console error. The screenshot goes to test-artifacts/viewer/ (the README shows it).
"""

from __future__ import annotations

import os
from pathlib import Path

from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright
from pydicom.uid import generate_uid
from sqlalchemy import select

from records.db import make_engine, make_session_factory
from records.schema import StudyResult
from records.tables import Result
from testbed.chromium import CHROMIUM, FLAGS
from testbed.network import free_port, listening, wait_for
from testbed.ohif import serving_ohif
from testbed.orthanc import running_orthanc
from testbed.processes import serve_env, service
from testbed.radiographs import rg1_copy

ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
WEBGL = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]
SHOTS = Path(os.environ.get("RADVLM_SCREENSHOTS", Path(__file__).parents[2] / "test-artifacts")) / "viewer"

# image pixel (column, row) -> the viewport's canvas (CSS pixels), through cornerstone's own transforms
TO_CANVAS = """([x, y]) => {
  const cs = window.cornerstone;
  const viewport = cs.getEnabledElements().map(e => e.viewport).find(v => v.getCurrentImageId && v.getCurrentImageId());
  const world = cs.utilities.imageToWorldCoords(viewport.getCurrentImageId(), [x, y]);
  return viewport.worldToCanvas(world);
}"""


def test_ohif_draws_the_sr_boxes_where_the_result_says(tmp_path):
    node_port = free_port()
    sqlite = f"sqlite:///{tmp_path / 'radvlm.sqlite'}"
    study_uid = generate_uid()
    # RG1 as a new study, with a pixel spacing OHIF can use (RG1's own 0\0 renders black there)
    image = rg1_copy(tmp_path, "chest.dcm", StudyInstanceUID=study_uid, SeriesInstanceUID=generate_uid(),
                     PixelSpacing=[0.175, 0.175])
    plugin = {"Plugins": [ORTHANC_DICOMWEB], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    console: list[str] = []
    with running_orthanc(tmp_path / "orthanc", {"radvlm": ("RADVLM", "127.0.0.1", node_port)},
                         extra=plugin) as orthanc:
        env = serve_env(tmp_path, sqlite, node_port, free_port(), [
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port,
             "objects": ["sr", "gsps"]}])
        with service("serve", ["serve"], env, tmp_path / "logs"):
            wait_for(lambda: listening(node_port), 60)
            orthanc.send("radvlm", orthanc.upload(image))
            wait_for(lambda: orthanc.request("GET", "/statistics")["CountInstances"] == 3, 90)
        with make_session_factory(make_engine(sqlite))() as session:
            result = StudyResult.model_validate(session.scalars(select(Result.payload)).one())
        boxes = [(g.label, box) for g in result.images[0].groundings for box in g.answer.boxes]
        assert boxes, "the scripted model grounds its findings"

        with serving_ohif(orthanc.http_port) as ohif, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS + WEBGL)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            SHOTS.mkdir(parents=True, exist_ok=True)
            drawn_all = f"() => document.querySelectorAll('svg.svg-layer polyline').length >= {len(boxes)}"
            for attempt in range(3):  # under the full suite's load, OHIF may show the SR's image undrawn:
                page.goto(f"{ohif}/viewer?StudyInstanceUIDs={study_uid}")  # then the viewer opens afresh
                page.wait_for_selector("[data-cy='study-browser-thumbnail']", timeout=60_000)
                page.screenshot(path=str(SHOTS / "opened.png"))
                for button in ("Skip all", "Confirm and hide"):  # the first-visit tour and notice
                    if page.get_by_text(button).count():
                        page.get_by_text(button).first.click()
                page.wait_for_timeout(3000)
                page.screenshot(path=str(SHOTS / "image.png"))
                page.get_by_text("RadVLM findings").first.dblclick()
                try:
                    page.wait_for_function(drawn_all, timeout=20_000)
                    break
                except PlaywrightTimeout:
                    page.screenshot(path=str(SHOTS / f"no-boxes-{attempt}.png"))
            else:
                raise AssertionError(f"OHIF drew no SR boxes in three openings of the viewer; console: {console}")
            page.wait_for_timeout(1000)  # labels settle
            page.screenshot(path=str(SHOTS / "ohif-sr-boxes.png"))
            drawn = page.evaluate("() => Array.from(document.querySelectorAll('svg.svg-layer polyline'))"
                                  ".map(e => Array.from(e.points).map(p => [p.x, p.y]))")
            expected = [(label, page.evaluate(TO_CANVAS, [box.px[0], box.px[1]]),
                         page.evaluate(TO_CANVAS, [box.px[2], box.px[3]])) for label, box in boxes]
            browser.close()
    assert console == []
    assert all(len(points) == 5 and points[0] == points[-1] for points in drawn)  # closed polylines
    drawn_boxes = sorted((min(x for x, _ in p), min(y for _, y in p), max(x for x, _ in p), max(y for _, y in p))
                         for p in drawn)
    expected_boxes = sorted((a[0], a[1], b[0], b[1]) for _, a, b in expected)
    assert len(drawn_boxes) == len(expected_boxes)
    for got, want in zip(drawn_boxes, expected_boxes):
        assert all(abs(g - w) < 2.0 for g, w in zip(got, want)), (got, want)  # CSS pixels on the canvas
