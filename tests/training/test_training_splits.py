"""`train dataset --split test`: each source's held-out test split, taken once, for `train evaluate`; the
sources without one stay out, and the site's own sign-offs hold one study in ten back."""

from __future__ import annotations

import csv
import gzip
import json
import random
from pathlib import Path

from radvlm_pacs import main
from tests.training.training_data import placeholder_dicom, placeholder_png, txv_data
from training import recipe
from training.reports import RuleCleaner
from training.sources import chexpert, site

VINDR_IMAGE = "9a5094b2563a1ef3ff50dc5c7ff71345"  # three readers in VinBigData's table


def _real_rows(name: str, keep, limit: int | None = None) -> tuple[list[str], list[dict[str, str]]]:  # type: ignore[no-untyped-def]
    with gzip.open(txv_data(name), "rt") as handle:
        reader = csv.DictReader(handle)
        chosen = [row for row in reader if keep(row)][:limit]
        return list(reader.fieldnames or []), chosen


def _write(path: Path, columns: list[str], rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_only_sources_with_a_test_split_take_part():
    inputs = recipe.Inputs(folders={name: Path("/nowhere") for name in recipe.DATASETS}, cleaner=RuleCleaner(),
                           split="test", llm=object())  # type: ignore[arg-type]
    assert [part.name for part in recipe.runnable(inputs)] == [
        "mimic-cxr/report", "mimic-cxr/abnormalities", "chexpert/abnormalities",
        "chest-imagenome/anatomical-grounding", "vindr-cxr/abnormality-grounding", "vindr-cxr/detection",
        "ms-cxr/phrase-grounding", "padchest-gr/phrase-grounding", "mimic-cxr/conversation",
        "ms-cxr/grounded-conversation", "padchest-gr/grounded-conversation", "site/report", "site/abnormalities"]


def test_chexpert_and_vindr_test_splits_are_taken_once(tmp_path, capsys):
    # CheXpert's test labels come without the Frontal/Lateral column: the image's name tells the view
    columns, rows = _real_rows("chexpert_train.csv.gz", lambda row: True, limit=60)
    chexpert_root = tmp_path / "CheXpert-v1.0"
    labels = [c for c in columns if c not in ("Sex", "Age", "Frontal/Lateral", "AP/PA")]
    _write(chexpert_root / "test_labels.csv", labels, rows)
    frontal = sum("frontal" in row["Path"] for row in rows)
    assert 0 < frontal < len(rows)
    for row in rows:  # the images, which the build checks
        placeholder_png(chexpert.image_path(chexpert_root, row["Path"]), 12, 10)
    # VinDr's test annotations: real boxes of one image, under the name PhysioNet gives the test table
    columns, rows = _real_rows("vinbigdata-train.csv.gz", lambda row: row["image_id"] == VINDR_IMAGE)
    vindr_root = tmp_path / "vindr"
    _write(vindr_root / "annotations" / "annotations_test.csv", columns, rows)
    placeholder_dicom(vindr_root / "test" / f"{VINDR_IMAGE}.dicom", columns=2000, rows=2500)

    out = tmp_path / "test.json"
    assert main(["train", "dataset", "--split", "test", "--data", f"chexpert={chexpert_root}",
                 "--data", f"vindr-cxr={vindr_root}", "--out", str(out)]) == 0
    table = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:-1]}
    labelled = {row["class_name"] for row in rows} - {"No finding"}
    # part: built, paper, ratio, repeats, written: once each, and the paper's 518 for the whole CheXpert test set;
    # de-id, no-image, bad-box: no report, every image in place, every box on its image
    assert table["chexpert/abnormalities"] == [str(frontal), "518", f"{frontal / 518:.3f}", "1", str(frontal), "0",
                                               "0", "0"]
    assert table["vindr-cxr/abnormality-grounding"] == [str(len(labelled)), "-", "-", "1", str(len(labelled)), "0",
                                                        "0", "0"]
    assert table["vindr-cxr/detection"] == ["1", "-", "-", "1", "1", "0", "0", "0"]
    built = json.loads(out.read_text())
    assert len(built) == frontal + len(labelled) + 1 and len({entry["id"] for entry in built}) == len(built)
    assert all("-test-" in entry["id"] for entry in built)
    assert {entry["image"] for entry in built if entry["id"].startswith("vindr")} == {
        str(vindr_root / "test" / f"{VINDR_IMAGE}.dicom")}


def test_the_site_holds_one_study_in_ten_back(tmp_path):
    rows = [{"image": f"images/{n}.png", "study": str(n), "edited": "false", "findings": "Cardiomegaly",
             "report": f"Findings: study {n}."} for n in range(1, 101)]
    _write(tmp_path / site.TABLE, list(site.COLUMNS), rows)
    studies = {split: {i.id.split("-")[1] for i in site.classification(tmp_path, random.Random(0), split=split)}
               for split in recipe.SPLITS}
    assert not studies["train"] & studies["test"] and len(studies["train"] | studies["test"]) == 100
    assert 5 <= len(studies["test"]) <= 15  # about one in ten, and always the same ones
    assert studies["test"] == {i.id.split("-")[1] for i in site.reports(tmp_path, random.Random(1), RuleCleaner(),
                                                                         split="test")}
