"""The radiologist's page in a real headless Chromium (Debian's, driven by Playwright): log in, open the
study, see and toggle the boxes, ask two questions and watch the answer stream, sign off.

Screenshots of each step are saved to test-artifacts/browser/ (or $RADVLM_SCREENSHOTS).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pydicom
import pytest
from playwright.sync_api import Page, sync_playwright
from sqlalchemy import select

from api.main import create_app
from radvlm.backends.scripted import ScriptedBackend
from records.settings import DeliverySettings
from records.tables import Conversation, SignOff, Study, StudyState
from testbed.accounts import TOKENS, settings_for
from testbed.chromium import CHROMIUM, FLAGS
from testbed.dcmtk import storescu
from testbed.network import serving, wait_for
from testbed.node import worker_context
from testbed.radiographs import RG1_STUDY, radiograph, rg1_copy
from worker.askers import LocalAsker
from worker.dispatch import InProcessRunner
from worker.model_thread import ModelThread

SHOTS = Path(os.environ.get("RADVLM_SCREENSHOTS", Path(__file__).parents[2] / "test-artifacts" / "browser"))
FINDING_RED = (255, 59, 48)  # the page's colour for the first finding with boxes (Cardiomegaly)
ANSWER_CYAN = (0, 229, 255)  # the page's colour for boxes in an answer


@pytest.fixture
def served(analysed_node):
    """The API with the page on a real port; the scripted model streams at about 15 words a second."""
    running = analysed_node.running
    settings = settings_for(running, chat_max_rounds=3).model_copy(update={"delivery": DeliverySettings(
        urgent_findings=["Pleural Effusion"])})  # the site's urgent findings are bold in the worklist
    with ModelThread() as thread:
        asker = LocalAsker(worker_context(running, ScriptedBackend(delay_s=1.0)), thread)
        with serving(create_app(settings, asker)) as base:
            yield base, running


def pixel(page: Page, x: float, y: float) -> tuple[int, int, int]:
    """The colour the canvas holds at image pixel (x, y): the canvas is the image at full size."""
    return tuple(page.evaluate("([x, y]) => Array.from(document.getElementById('image').getContext('2d')"
                               ".getImageData(x, y, 1, 1).data.slice(0, 3))", [round(x), round(y)]))


def test_log_in_view_ask_and_sign_off(served):
    base, running = served
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        strict = browser.new_page()  # the page under its own content security policy: no violation on the way
        violations: list[str] = []
        strict.on("console", lambda message: violations.append(message.text)
                  if "Content Security Policy" in message.text else None)
        strict.goto(base)
        strict.fill("#token", TOKENS["dr.house"])
        strict.click("#login")
        strict.click(f"tr[data-uid='{RG1_STUDY}']")
        strict.wait_for_selector("#image[width='1841']")  # the PNG fetched as a blob and drawn
        strict.wait_for_selector(".finding-toggle[data-label='Cardiomegaly']")
        assert violations == []
        strict.close()
        # the steps below poll the page with Playwright's own expressions, which the policy forbids
        page = browser.new_page(viewport={"width": 1400, "height": 950}, bypass_csp=True)
        page.goto(base)
        page.fill("#token", "not a token")
        page.click("#login")
        page.wait_for_selector("#login-error:has-text('not known')")
        page.fill("#token", TOKENS["dr.house"])
        page.click("#login")
        page.wait_for_selector(f"tr[data-uid='{RG1_STUDY}']")
        assert page.inner_text("#who") == "dr.house (radiologist)"
        page.screenshot(path=SHOTS / "1-studies.png")
        for typed, rows in (("nobody here", 0), ("samples rg1", 1)):  # CompressedSamples^RG1, words in order
            page.fill("#filter-name", typed)
            page.click("#filters button[type=submit]")
            page.wait_for_function(f"document.querySelectorAll('#studies tbody tr').length === {rows}")
        assert page.get_attribute("#studies tbody tr", "data-uid") == RG1_STUDY
        assert page.inner_text(f"tr[data-uid='{RG1_STUDY}'] td:nth-child(6)") == "Cardiomegaly, Pleural Effusion"
        # people's names and dates as people write them (the API's JSON keeps CompressedSamples^RG1, 20040826)
        assert page.inner_text(f"tr[data-uid='{RG1_STUDY}'] td:nth-child(1)") == "CompressedSamples, RG1"
        assert page.inner_text(f"tr[data-uid='{RG1_STUDY}'] td:nth-child(4)") == "2004-08-26"
        assert page.locator(f"tr[data-uid='{RG1_STUDY}'].urgent strong").all_inner_texts() == ["Pleural Effusion"]

        page.click(f"tr[data-uid='{RG1_STUDY}']")
        page.wait_for_function("document.getElementById('image').width === 1841")
        page.wait_for_function("document.querySelectorAll('.finding-toggle').length === 2")
        assert page.locator("#findings .track").count() == 0  # no draft of this model signed off here yet
        assert page.inner_text("#report").startswith("Findings: Frontal view of the chest.")
        # the cardiomegaly box [0.33, 0.45, 0.78, 0.79] is drawn on its left edge, and goes when toggled off
        x, y = 0.33 * 1841, (0.45 + 0.79) / 2 * 1955
        assert pixel(page, x, y) == FINDING_RED
        page.screenshot(path=SHOTS / "2-study-with-boxes.png")
        page.uncheck(".finding-toggle[data-label='Cardiomegaly']")
        assert pixel(page, x, y) != FINDING_RED
        page.check(".finding-toggle[data-label='Cardiomegaly']")
        page.click("#zoom-in")
        assert page.evaluate("document.getElementById('image').style.width") != ""

        page.fill("#question", "Is there a pleural effusion?")
        page.click("#ask")
        page.wait_for_selector(".turn:nth-child(1) .answer[data-done='true']")
        assert page.inner_text(".turn:nth-child(1) .answer") == "Yes, there is pleural effusion on this Chest X-ray."
        page.fill("#question", "Where is it?")
        page.click("#ask")
        second = ".turn:nth-child(2) .answer"
        page.wait_for_function(f"document.querySelector(\"{second}\")?.textContent.length > 0")
        partial = page.inner_text(second)
        page.screenshot(path=SHOTS / "3-answer-streaming.png")
        page.wait_for_selector(f"{second}[data-done='true']")
        final = page.inner_text(second)
        assert final.startswith("The pleural effusion is located at the coordinates")
        assert len(partial) < len(final) and final.startswith(partial.strip())  # it arrived in pieces
        # the answer's boxes are drawn on the image: [0.05, 0.62, 0.31, 0.88] and [0.7, 0.64, 0.95, 0.9]
        assert pixel(page, 0.05 * 1841, 0.75 * 1955) == ANSWER_CYAN
        assert pixel(page, 0.7 * 1841, 0.77 * 1955) == ANSWER_CYAN
        page.screenshot(path=SHOTS / "4-answer-boxes.png")

        # back to the list and into the study again: your questions are there, and the next one continues them
        page.click("#back")
        page.click(f"tr[data-uid='{RG1_STUDY}']")
        page.wait_for_selector(".turn:nth-child(2) .answer[data-done='true']")
        assert page.locator(".turn .question").all_inner_texts() == ["Is there a pleural effusion?", "Where is it?"]
        page.wait_for_function("document.getElementById('image').width === 1841")
        # the third question fills the conversation (api.chat_max_rounds 3 here); the fourth starts another
        for number, question in ((3, "Is there a pneumothorax?"), (4, "Is the heart enlarged?")):
            page.fill("#question", question)
            page.click("#ask")
            page.wait_for_selector(f".turn:nth-child({number}) .answer[data-done='true']")
        assert page.inner_text("#chat-error") == ""

        page.fill("#signoff-report", "Findings: Cardiomegaly. Small left effusion not confirmed. Impression: "
                                     "Cardiomegaly.")
        page.uncheck("#signoff-findings input[value='Pleural Effusion']")
        page.click("#signoff-submit")
        page.wait_for_selector("#signoff-status:has-text('Signed off: verified report')")
        # beside each drafted finding, how often radiologists here kept it: now this one sign-off
        page.wait_for_function("document.querySelectorAll('#findings .track').length === 2")
        assert page.locator("#findings li").all_inner_texts() == ["Cardiomegaly kept 1 of 1 here",
                                                                  "Pleural Effusion kept 0 of 1 here"]
        assert pixel(page, x, y) == FINDING_RED  # the boxes are drawn again with the list
        page.screenshot(path=SHOTS / "5-signed-off.png")
        assert page.is_hidden("#show-audit")  # a radiologist has no audit log

        admin = browser.new_page(viewport={"width": 1400, "height": 950})  # the privacy officer: who did what
        admin.goto(base)
        admin.fill("#token", TOKENS["it.admin"])
        admin.click("#login")
        # logged in once the study list is drawn: the log-in shows the list last, over an audit log opened before
        admin.wait_for_selector(f"tr[data-uid='{RG1_STUDY}']")
        admin.click("#show-audit")
        admin.wait_for_selector("#audit tbody tr")
        admin.fill("#audit-user", "dr.house")
        admin.fill("#audit-action", "sign_off")
        admin.click("#audit-filters button[type=submit]")
        admin.wait_for_selector("#audit tbody tr:only-child td:nth-child(4):has-text('sign_off')")
        cells = admin.locator("#audit tbody tr td").all_inner_texts()
        assert cells[1:7] == ["dr.house", "radiologist", "sign_off", "110103 C", RG1_STUDY, "success"]
        admin.screenshot(path=SHOTS / "6-audit-log.png")
        browser.close()
    with running.sessions() as session:
        [signed] = session.scalars(select(SignOff)).all()
        asked = [[e.question for e in c.exchanges] for c in session.scalars(select(Conversation)
                                                                                .order_by(Conversation.id))]
    assert asked == [["Is there a pleural effusion?", "Where is it?", "Is there a pneumothorax?"],
                     ["Is the heart enlarged?"]]
    assert (signed.user_name, signed.findings, signed.edited) == ("dr.house", ["Cardiomegaly"], True)
    assert signed.report.startswith("Findings: Cardiomegaly. Small left effusion")
    assert sorted(p.name for p in SHOTS.glob("*.png")) == [
        "1-studies.png", "2-study-with-boxes.png", "3-answer-streaming.png", "4-answer-boxes.png", "5-signed-off.png",
        "6-audit-log.png"]


def test_a_study_with_two_frontal_images_shows_each_with_its_own_draft_and_chat(sqlite_url, start_node, tmp_path):
    holder: dict[str, InProcessRunner] = {}
    node = start_node(sqlite_url, on_ready=lambda s, v: holder["runner"](s, v))
    portable = rg1_copy(tmp_path, "ap.dcm", ViewPosition="AP")  # the same study, a second frontal image
    second = str(pydicom.dcmread(portable, stop_before_pixels=True).SOPInstanceUID)
    with ModelThread() as thread:
        runner = holder["runner"] = InProcessRunner(worker_context(node, ScriptedBackend()), thread)
        runner.start()
        assert storescu(node.port, radiograph("RG1_UNCI.dcm"), portable).returncode == 0

        def state() -> StudyState | None:
            with node.sessions() as session:
                return session.scalar(select(Study.state))

        wait_for(lambda: state() is StudyState.analysed, 30)
        with node.sessions() as session, session.begin():  # thirty older studies: the worklist takes pages
            long_ago = datetime(2020, 1, 1, tzinfo=timezone.utc)
            session.add_all(Study(study_instance_uid=f"1.2.826.0.1.3680043.10.{n}", state=StudyState.nothing_to_analyse,
                                  first_received_at=long_ago, last_received_at=long_ago + timedelta(minutes=n))
                            for n in range(30))
        asker = LocalAsker(worker_context(node, ScriptedBackend()), thread)
        with serving(create_app(settings_for(node), asker)) as base, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 950}, bypass_csp=True)
            pictures: list[str] = []
            page.on("request", lambda request: pictures.append(parse_qs(urlparse(request.url).query)["sop"][0])
                    if "/image.png" in request.url else None)
            page.goto(base)
            page.fill("#token", TOKENS["dr.house"])
            page.click("#login")
            page.wait_for_selector("#shown:has-text('1–31 of 31')")
            assert page.is_disabled("#newer") and page.is_disabled("#older")
            page.select_option("#page-size", "25")
            page.wait_for_selector("#shown:has-text('1–25 of 31')")
            page.click("#older")
            page.wait_for_selector("#shown:has-text('26–31 of 31')")
            assert page.locator("#studies tbody tr").count() == 6 and page.is_disabled("#older")
            page.click("#newer")
            page.wait_for_selector("#shown:has-text('1–25 of 31')")
            page.click(f"tr[data-uid='{RG1_STUDY}']")  # the newest, on the first page
            page.wait_for_selector("#image[width='1841']")
            assert page.locator("#image-choice button").all_inner_texts() == ["Image 1", "Image 2"]
            assert page.get_attribute("#image-choice button:nth-child(2)", "title") == (
                "frontal chest: ViewPosition AP")
            page.click("#image-choice button:nth-child(2)")
            page.wait_for_selector("#image-choice button:nth-child(2)[aria-pressed='true']")
            page.wait_for_function(f"document.querySelector('#image-choice button[aria-pressed=true]')"
                                   f".dataset.sop === '{second}'")
            page.fill("#question", "Is there a pleural effusion?")
            page.click("#ask")
            page.wait_for_selector(".turn:nth-child(1) .answer[data-done='true']")
            browser.close()
        runner.close()
    assert pictures[-1] == second and len(set(pictures)) == 2  # each image fetched for itself
    with node.sessions() as session:
        [conversation] = session.scalars(select(Conversation)).all()
    assert conversation.sop_instance_uid == second  # the question was about the image shown
