"""The parts import only what docs/architecture.md allows them: import-linter's contracts (pyproject.toml) hold
on this tree, and they break when a part reaches into a room it must not."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PARTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["root_packages"]


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """import-linter over the packages under ``tree`` (put first on the path, ahead of the editable install)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=300)


def copy_of_the_parts(target: Path) -> Path:
    for part in PARTS:
        shutil.copytree(ROOT / part, target / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", target / "pyproject.toml")
    return target


def test_every_contract_is_kept() -> None:
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{len(tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['importlinter']['contracts'])} kept, " \
           "0 broken" in run.stdout


def test_the_architecture_page_names_every_part() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text()
    missing = [part for part in PARTS if f"`{part}/`" not in page]
    assert not missing, f"docs/architecture.md does not describe {missing}"


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("dicom_node/completion.py", "import worker.dispatch", "Each part stands on the seams"),
    ("api/routes/studies.py", "from radvlm.parsing import labels_from_answer", "The API reaches the model only"),
    ("records/settings.py", "import dicom_node.server", "Each part stands on the seams"),
    ("training/evaluate.py", "from results.sr import measurement_report", "Training uses the model's prompts"),
])
def test_a_forbidden_import_breaks_a_contract(tmp_path: Path, module: str, line: str, contract: str) -> None:
    tree = copy_of_the_parts(tmp_path)
    source = tree / module
    source.write_text(source.read_text() + f"\n{line}  # deliberately forbidden\n")
    run = lint_imports(tree)
    assert run.returncode != 0
    assert f"{contract}" in run.stdout and "BROKEN" in run.stdout, run.stdout
    assert module.removesuffix(".py").replace("/", ".") in run.stdout


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_each_image_holds_every_part(dockerfile: str) -> None:
    copied = {line.split()[1] for line in (ROOT / "docker" / dockerfile).read_text().splitlines()
              if line.startswith("COPY ")}
    assert set(PARTS) <= copied, f"{dockerfile} does not copy {sorted(set(PARTS) - copied)}"
