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


def test_urgent_findings_are_chexpert_labels_in_one_place(tmp_path):
    config = tmp_path / "radvlm.toml"
    config.write_text('[delivery]\nurgent_findings = ["pneumothorax", " Pleural Effusion"]\n')
    assert load_settings(config).delivery.urgent_findings == ["Pneumothorax", "Pleural Effusion"]
    config.write_text('[delivery]\nurgent_findings = ["Pneumothorax", "Pneumothoraces"]\n')
    with pytest.raises(ValidationError, match="'Pneumothoraces' is not a CheXpert finding; one of: Enlarged"):
        load_settings(config)
    config.write_text('[delivery]\nurgent_findings = ["No Finding"]\n')
    with pytest.raises(ValidationError, match="not a CheXpert finding"):
        load_settings(config)
    config.write_text('[hl7]\nhost = "ris"\nport = 2575\nurgent_findings = ["Pneumothorax"]\n')
    with pytest.raises(ValidationError, match="hl7.urgent_findings is now delivery.urgent_findings"):
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


def test_secrets_come_from_files_and_are_never_printed(tmp_path, monkeypatch, capsys):
    from radvlm_pacs import main

    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "radvlm_database_url").write_text(f"sqlite:///{tmp_path}/from-secret.sqlite\n")
    (secrets / "radvlm_model__server_api_key").write_text("sk-do-not-print")
    config = tmp_path / "radvlm.toml"
    config.write_text('[model]\nbackend = "openai-server"\nserver_url = "http://vllm:8000/v1"\n'
                      'server_api_key = "overridden by the secret file"\n')
    monkeypatch.setenv("RADVLM_DATA_DIR", str(tmp_path))
    settings = load_settings(config, secrets)
    assert settings.model.server_api_key.get_secret_value() == "sk-do-not-print"
    assert settings.database_url == f"sqlite:///{tmp_path}/from-secret.sqlite"
    monkeypatch.setenv("RADVLM_DATABASE_URL", "postgresql+psycopg://radvlm:hunter2@db/radvlm")
    assert load_settings(config, secrets).database_url.endswith("@db/radvlm")  # the environment wins
    monkeypatch.setenv("RADVLM_SECRETS_DIR", str(secrets))
    main(["--config", str(config), "config", "check"])
    printed = capsys.readouterr().out
    assert "sk-do-not-print" not in printed and "hunter2" not in printed and '"server_api_key": "**********"' in printed
    with pytest.raises(FileNotFoundError, match="secrets folder"):
        load_settings(config, tmp_path / "absent")


def test_no_secret_is_committed():
    """Private keys, token hashes of real users and passwords in URLs stay out of the repository."""
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    patterns = [re.compile(p) for p in (
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----", r"token_sha256\s*=\s*\"[0-9a-f]{64}\"",
        r"://[^/\s:@\"']+:(?!\$\{|[A-Z_]+@)[^@\s/\"']+@")]  # passwords in URLs; ${VAR} and PLACEHOLDER pass
    found = [f"{name}: {p.pattern}" for name in files if (root / name).is_file()
             and (root / name).stat().st_size < 2_000_000 and not name.startswith("tests/")
             for p in patterns if p.search((root / name).read_text(errors="ignore"))]
    assert found == []
