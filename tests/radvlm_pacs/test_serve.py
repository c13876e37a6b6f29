"""``radvlm-pacs serve`` as a user runs it: storescu in, the result out through the CLI."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request

import httpx
import pytest

from testbed.accounts import HOUSE, users
from testbed.chat import sse
from testbed.dcmtk import storescu
from testbed.metrics import sample, scrape
from testbed.network import free_port, listening, wait_for
from testbed.processes import ENTRY, service
from testbed.radiographs import RG1_STUDY, radiograph


def _show(env: dict[str, str]) -> dict | None:
    shown = subprocess.run([*ENTRY, "studies", "show", RG1_STUDY], env=env, capture_output=True, text=True)
    return json.loads(shown.stdout) if shown.returncode == 0 else None


@pytest.mark.parametrize("backend", ["tiny", "scripted"])
def test_serve_analyses_a_study_sent_with_storescu(backend, tiny_model, tmp_path):
    import os

    port, api_port = free_port(), free_port()
    env = {**os.environ, "RADVLM_DATA_DIR": str(tmp_path / "data"), "RADVLM_NODE__PORT": str(port),
           "RADVLM_API__PORT": str(api_port), "RADVLM_API__USERS": json.dumps(users()),
           "RADVLM_NODE__BIND_ADDRESS": "127.0.0.1", "RADVLM_NODE__STABLE_AGE_S": "1",
           "RADVLM_NODE__DISK_RESERVE_MB": "1", "RADVLM_MODEL__MAX_NEW_TOKENS": "16", "HF_HUB_OFFLINE": "1"}
    if backend == "tiny":
        env["RADVLM_MODEL__ID"] = str(tiny_model)
    else:
        env["RADVLM_MODEL__BACKEND"] = "scripted"
    with service("serve", ["serve"], env, tmp_path / "logs"):
        wait_for(lambda: listening(port), 60)
        assert storescu(port, radiograph("RG1_UNCI.dcm")).returncode == 0
        shown = wait_for(lambda: (s := _show(env)) and s["state"] in ("analysed", "failed") and s, 120)
        wait_for(lambda: listening(api_port), 10)
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/health", timeout=5) as rsp:
            assert json.load(rsp) == {"status": "ok"}  # serve runs the API too
        with pytest.raises(urllib.error.HTTPError) as closed:
            urllib.request.urlopen(f"http://127.0.0.1:{api_port}/studies", timeout=5)
        assert closed.value.code == 401
        # a streamed question, answered by the model thread that analysed the study
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers=HOUSE, timeout=60) as client:
            cid = client.post(f"/studies/{RG1_STUDY}/conversations", json={}).json()["id"]
            with client.stream("POST", f"/studies/{RG1_STUDY}/conversations/{cid}/questions/stream",
                               json={"text": "Where is the pleural effusion?"}) as response:
                events = sse(response.read().decode())
        page = scrape(api_port)  # one process: the node's, the model's and the database's metrics together
    assert sample(page, "radvlm_instances_received_total", outcome="stored") == 1
    assert sample(page, "radvlm_studies", state="analysed") == 1
    assert sample(page, "radvlm_analysis_latency_seconds_count") == 1
    assert sample(page, "radvlm_model_generated_tokens_total", task="chat") > 0
    assert ("radvlm_queue_depth", frozenset({("queue", "model")})) in page
    assert shown["state"] == "analysed", shown["reason"]
    *tokens, (last, done) = events
    assert last == "done" and tokens and {kind for kind, _ in tokens} == {"token"}
    assert "".join(data["text"] for _, data in tokens).strip() == done["answer"]
    [job] = shown["jobs"]
    image = job["result"]["images"][0]
    assert job["state"] == "done" and image["report"]["text"]
    assert len(image["labels"]) == 14
    if backend == "tiny":
        assert job["result"]["backend"] == "transformers" and job["revision"].startswith("local-")
        assert image["report"]["new_tokens"] <= 16
        assert done["state"] == "answered"  # random weights: any text, streamed by transformers' TextStreamer
    else:
        [effusion] = [g for g in image["groundings"] if g["label"] == "Pleural Effusion"]
        first = effusion["answer"]["boxes"][0]
        assert first["px"] == pytest.approx([first["x1"] * 1841, first["y1"] * 1955,
                                             first["x2"] * 1841, first["y2"] * 1955])
        assert done["boxes"] == effusion["answer"]["boxes"]
