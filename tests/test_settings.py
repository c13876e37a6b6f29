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
