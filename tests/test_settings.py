"""Settings: environment over file over defaults, and bad values refused with the name of the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from records.settings import CallerRule, load_settings


def test_file_then_environment(tmp_path, monkeypatch):
    config = tmp_path / "radvlm.toml"
    config.write_text(
        'data_dir = "/srv/radvlm"\n'
        "[node]\n"
        'ae_title = "AINODE"\n'
        "port = 104\n"
        'allowed_callers = [{ae_title = "ORTHANC", host = "10.0.0.5"}]\n'
    )
    monkeypatch.setenv("RADVLM_NODE__PORT", "11113")
    settings = load_settings(config)
    assert settings.node.ae_title == "AINODE"
    assert settings.node.port == 11113  # the environment wins
    assert settings.node.allowed_callers == [CallerRule(ae_title="ORTHANC", host="10.0.0.5")]
    assert settings.effective_database_url == "sqlite:////srv/radvlm/radvlm.sqlite"
    assert str(settings.effective_storage_dir) == "/srv/radvlm/dicom"


def test_defaults_are_embedded(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RADVLM_CONFIG_FILE", raising=False)
    settings = load_settings()
    assert settings.effective_database_url == f"sqlite:///{tmp_path}/radvlm-data/radvlm.sqlite"
    assert settings.broker_url is None
    assert settings.node.stable_age_s == 10.0


def test_bad_values_name_the_field(tmp_path, monkeypatch):
    monkeypatch.setenv("RADVLM_NODE__AE_TITLE", "A_TITLE_FAR_TOO_LONG")
    with pytest.raises(ValidationError, match="node.ae_title"):
        load_settings()
    monkeypatch.delenv("RADVLM_NODE__AE_TITLE")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_settings(tmp_path / "absent.toml")
    config = tmp_path / "typo.toml"
    config.write_text("[node]\nstable_age = 5\n")
    with pytest.raises(ValidationError, match="stable_age"):
        load_settings(config)


def test_caller_rule_matching():
    rule = CallerRule(ae_title="PACS", host="127.0.0.1")
    assert rule.matches("PACS", "127.0.0.1")
    assert not rule.matches("PACS", "127.0.0.2")
    assert CallerRule(ae_title="PACS").matches("PACS", "192.0.2.1")


def test_cli_reports_what_the_user_can_fix_without_a_traceback(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "RADVLM_DATA_DIR": str(tmp_path), "RADVLM_NODE__PORT": "not-a-port"}
    out = subprocess.run([sys.executable, "-m", "radvlm_pacs", "studies", "list"], env=env, capture_output=True,
                         text=True)
    assert out.returncode == 2
    assert "node.port" in out.stderr and "Traceback" not in out.stderr
    env = {**os.environ, "RADVLM_DATA_DIR": str(tmp_path), "RADVLM_MODEL__ID": str(tmp_path / "missing"),
           "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "radvlm_pacs", "serve"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert "weights not found: give a local folder as RADVLM_MODEL__ID" in out.stderr
    assert "Traceback" not in out.stderr
