"""The instruction builders on real annotation files (torchxrayvision's package data) with
placeholder images: counts against the paper's table, and datapoints checked by hand."""

from __future__ import annotations

import csv
import gzip
import json
import random
import tarfile
import zipfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radvlm.parsing import BOX_PATTERN, boxes_from_answer
from testbed.radiographs import radiograph
from tests.training.training_data import link, placeholder_dicom, placeholder_png, txv_data
from training import answers, instructions, recipe
from training.boxes import normalise
from training.images import gray_pixels
from training.instructions import Instruction
from training.reports import RuleCleaner, sections, sentences
from training.sources import chexpert, iu_xray, nih, rsna, vindr

VINDR_IMAGE = "9a5094b2563a1ef3ff50dc5c7ff71345"  # read by R8, R9 and R10; all three drew cardiomegaly


@pytest.fixture(scope="module")
def vindr_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vindr")
    link(txv_data("vinbigdata-train.csv.gz"), root, "train.csv.gz")
    return root


def test_vindr_fuses_the_three_readers_boxes_as_checked_by_hand(vindr_root: Path, tmp_path: Path) -> None:
    # Only this image's rows; its placeholder DICOM is 2000 columns by 2500 rows.
    table = tmp_path / "train.csv"
    with gzip.open(vindr_root / "train.csv.gz", "rt") as source, table.open("w") as out:
        lines = source.read().splitlines()
        out.write("\n".join([lines[0]] + [line for line in lines if line.startswith(VINDR_IMAGE)]) + "\n")
    placeholder_dicom(tmp_path / "train" / f"{VINDR_IMAGE}.dicom", columns=2000, rows=2500)

    [image] = vindr.images(tmp_path, "train")
    # Cardiomegaly, pixels: R10 (691, 1375, 1653, 1831), R9 (692, 1375, 1657, 1799), R8 (689, 1313, 1666, 1763).
    # Weighted box fusion with equal scores: the mean, (690.67, 1354.33, 1658.67, 1797.67), over 2000 x 2500.
    assert image.findings["Cardiomegaly"] == [pytest.approx((0.345333, 0.541733, 0.829333, 0.719067), abs=1e-5)]
    # One reader (R9) alone drew the aortic enlargement: kept, as it was drawn (1052, 715, 1299, 966).
    assert image.findings["Aortic enlargement"] == [pytest.approx((0.526, 0.286, 0.6495, 0.3864), abs=1e-5)]
    assert set(image.findings) == {"Cardiomegaly", "Aortic enlargement", "Pleural effusion", "Pleural thickening"}

    rng = random.Random(0)
    grounding = {i.id.rsplit("-", 1)[1]: i for i in vindr.abnormality_grounding(tmp_path, rng)}
    question, answer = grounding["Cardiomegaly"].rounds[0]
    assert question in [q.format(label="cardiomegaly") for q in answers.LOCATION_QUESTIONS]
    assert "[0.35, 0.54, 0.83, 0.72]" in answer
    parsed = boxes_from_answer(answer, columns=2000, rows=2500)
    assert parsed.malformed is None and len(parsed.boxes) == 1
    assert parsed.boxes[0].px == pytest.approx((700, 1350, 1660, 1800))  # the service maps it back to pixels

    [detection] = vindr.detection(tmp_path, rng)
    _, text = detection.rounds[0]
    assert "a cardiomegaly located at the coordinates [0.35, 0.54, 0.83, 0.72]" in text
    assert "an aortic enlargement located at the coordinates [0.53, 0.29, 0.65, 0.39]" in text
    assert len(BOX_PATTERN.findall(text)) == 4 and text.count(";") == 3  # four labels, one box each


def test_vindr_counts_on_the_whole_training_table_match_the_paper(vindr_root: Path) -> None:
    # The real table has no sizes and we have no images: every image is taken as 3500 x 3500, larger than any
    # box (they reach x 3131 and y 3384: on 3000 x 3000 some would fall outside, and the build refuse).
    reads: Counter[Path] = Counter()

    def size(path: Path) -> tuple[int, int]:
        reads[path] += 1
        return 3500, 3500

    inputs = recipe.Inputs(folders={"vindr-cxr": vindr_root}, cleaner=RuleCleaner(), size=size)
    tallies: list[recipe.Tally] = []
    items = list(recipe.build(recipe.runnable(inputs, ["vindr-cxr/detection"]), inputs, random.Random(0), tallies))
    assert len(reads) == 15_000 and set(reads.values()) == {1}  # each header read once, not once per repeat
    assert tallies[0].built == 15_000 == tallies[0].part.paper  # every training image, as in Table 1
    assert len(items) == 30_000 and len({i.id for i in items}) == 30_000  # repeated twice, ids unique
    no_finding = sum(1 for i in items[:15_000] if not BOX_PATTERN.search(i.rounds[0][1]))
    with gzip.open(vindr_root / "train.csv.gz", "rt") as handle:
        labelled = {row["image_id"] for row in csv.DictReader(handle) if row["class_name"] != "No finding"}
    assert no_finding == 15_000 - len(labelled)
    table = recipe.counts_table(tallies)
    assert "vindr-cxr/detection" in table and "15,000" in table and "1.000" in table


@pytest.fixture(scope="module")
def chexpert_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chexpert") / "CheXpert-v1.0-small"
    link(txv_data("chexpert_train.csv.gz"), root, "train.csv.gz")
    return root


def test_chexpert_frontal_count_is_the_papers_and_uncertain_is_absent(chexpert_root: Path) -> None:
    inputs = recipe.Inputs(folders={"chexpert": chexpert_root}, cleaner=RuleCleaner())
    tallies: list[recipe.Tally] = []
    items = list(recipe.build(recipe.runnable(inputs, ["chexpert/abnormalities"]), inputs, random.Random(0), tallies))
    assert tallies[0].built == 191_027 == tallies[0].part.paper  # the full training table is given
    by_id = {i.id: i for i in items}
    # patient00002: Lung Opacity 1, Fracture 1; Cardiomegaly, Edema, Consolidation, Atelectasis and
    # Pleural Effusion -1 (uncertain): absent, as the paper says.
    item = by_id["chexpert-train-CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg"]
    assert item.rounds[0][1].endswith("fracture and lung opacity.")
    assert item.image == str(chexpert_root / "train/patient00002/study2/view1_frontal.jpg")
    present = list(chexpert.classification(chexpert_root, random.Random(0), uncertain="present"))
    again = next(i for i in present if i.id == item.id)
    assert again.rounds[0][1].endswith("atelectasis, cardiomegaly, consolidation, edema, fracture, lung opacity "
                                       "and pleural effusion.")
    # patient00001: No Finding and Support Devices: only the device is listed.
    first = by_id["chexpert-train-CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"]
    assert first.rounds[0][1].endswith("support devices.")


def test_nih_boxes_normalised_by_the_image_size(tmp_path: Path) -> None:
    with gzip.open(txv_data("BBox_List_2017.csv.gz"), "rt") as handle:
        lines = handle.read().splitlines()[:6]  # header + 5 boxes
    (tmp_path / "BBox_List_2017.csv").write_text("\n".join(lines) + "\n")
    for line in lines[1:]:
        name = line.split(",")[0]
        if not (tmp_path / "images_001/images" / name).exists():
            placeholder_png(tmp_path / "images_001/images" / name, 1024, 1024)
    items = list(nih.abnormality_grounding(tmp_path, random.Random(0)))
    assert len(items) == 5
    # 00013118_008.png Atelectasis x 225.08 y 547.02 w 86.78 h 79.19 on 1024 x 1024:
    first = next(i for i in items if i.id == "nih-chestxray14-00013118_008.png-Atelectasis")
    assert "[0.22, 0.53, 0.3, 0.61]" in first.rounds[0][1]
    assert first.image.endswith("images_001/images/00013118_008.png")


def test_rsna_groups_each_patients_opacities(tmp_path: Path) -> None:
    link(txv_data("kaggle_stage_2_train_labels.csv.zip"), tmp_path, "stage_2_train_labels.csv.zip")
    items = {i.id: i for i in rsna.opacity_grounding(tmp_path, random.Random(0), size=lambda path: (1024, 1024))}
    with zipfile.ZipFile(tmp_path / "stage_2_train_labels.csv.zip") as archive:
        rows = list(csv.DictReader(line.decode() for line in archive.open("stage_2_train_labels.csv")))
    positive = [r for r in rows if r["Target"] == "1"]
    assert len(items) == len({r["patientId"] for r in positive})
    several = next(r["patientId"] for r in positive if sum(p["patientId"] == r["patientId"] for p in positive[:50]) > 1)
    expected = [normalise(float(r["x"]), float(r["y"]), float(r["x"]) + float(r["width"]),
                          float(r["y"]) + float(r["height"]), 1024, 1024)
                for r in positive if r["patientId"] == several]
    answer = items[f"rsna-pneumonia-{several}"].rounds[0][1]
    assert "lung opacity" in answer and len(BOX_PATTERN.findall(answer)) == len(expected) >= 2
    for box in expected:
        assert "[" + ", ".join(repr(round(v, 2)) for v in box) + "]" in answer


def test_nih_and_rsna_boxes_on_downsampled_images_are_refused(tmp_path: Path, capsys) -> None:
    """NIH's boxes are in pixels of its 1,024-pixel PNGs, RSNA's of its 1,024-pixel DICOMs: on the 256-pixel
    re-exports many fall outside the image, and the rest land in the wrong place."""
    from radvlm_pacs import main

    nih_root = tmp_path / "nih"
    with gzip.open(txv_data("BBox_List_2017.csv.gz"), "rt") as handle:
        lines = handle.read().splitlines()[:6]  # header + 5 boxes, on 5 images
    nih_root.mkdir()
    (nih_root / "BBox_List_2017.csv").write_text("\n".join(lines) + "\n")
    names = [line.split(",")[0] for line in lines[1:]]
    for index, name in enumerate(names):  # the 2nd and 4th downsampled
        side = 256 if index in (1, 3) else 1024
        placeholder_png(nih_root / "images_001/images" / name, side, side)
    out = tmp_path / "nih.json"
    args = ["train", "dataset", "--data", f"nih-chestxray14={nih_root}", "--out", str(out)]
    assert main(args) == 2
    # 00014716_007.png's Atelectasis: x 686.10 y 131.54 w 185.49 h 313.49
    assert capsys.readouterr().err.strip() == (
        "radvlm-pacs: nih-chestxray14/abnormality-grounding: 2 of 5 boxes fall outside their image (the first: "
        f"{names[1]}, box (686.102, 131.543, 871.593, 445.035), image 256x256): the images are not the originals; "
        "put the originals in place, or --missing-images skip to leave those images out")
    assert not out.exists()
    assert main([*args, "--missing-images", "skip"]) == 0
    assert sorted(entry["image"].rsplit("/", 1)[1] for entry in json.loads(out.read_text())) == sorted(
        names[i] for i in (0, 2, 4))

    rsna_root = tmp_path / "rsna"
    link(txv_data("kaggle_stage_2_train_labels.csv.zip"), rsna_root, "stage_2_train_labels.csv.zip")
    inputs = recipe.Inputs(folders={"rsna-pneumonia": rsna_root}, cleaner=RuleCleaner(), size=lambda path: (256, 256))
    with pytest.raises(recipe.BoxesOutside, match=r"^rsna-pneumonia/abnormality-grounding: [\d,]+ of 9,555 boxes fall "
                       r"outside their image \(the first: 00436515-870c-4b36-a041-de91049b9ab4, box \(264, 152, 477, "
                       r"531\), image 256x256\): the images are not the originals"):
        list(recipe.build(recipe.runnable(inputs), inputs, random.Random(0), []))


def test_imagenome_ms_cxr_and_padchest_leave_out_an_image_with_a_box_not_on_it(tmp_path: Path) -> None:
    # Chest ImaGenome: regions in pixels of the full-size MIMIC-CXR image; "a" is a 128-pixel copy, and its
    # second region lies wholly outside it (one that spills over the edge is clipped, by design)
    mimic = tmp_path / "mimic-cxr"
    imagenome = tmp_path / "chest-imagenome"
    graphs = imagenome / "silver_dataset" / "scene_graph"
    graphs.mkdir(parents=True)
    rows = []
    for dicom_id, side in (("a", 128), ("b", 500)):
        placeholder_png(mimic / "files" / f"{dicom_id}.jpg", side, side)
        rows.append({"dicom_id": dicom_id, "path": f"files/{dicom_id}.dcm", "ViewPosition": "PA"})
        objects = [{"bbox_name": "right lung", "original_x1": 10, "original_y1": 10, "original_x2": 100,
                    "original_y2": 140},
                   {"bbox_name": "left lung", "original_x1": 200, "original_y1": 200, "original_x2": 400,
                    "original_y2": 400}]
        (graphs / f"{dicom_id}_SceneGraph.json").write_text(json.dumps({"objects": objects}))
    (imagenome / "silver_dataset" / "splits").mkdir()
    with (imagenome / "silver_dataset" / "splits" / "train.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["dicom_id", "path", "ViewPosition"])
        writer.writeheader()
        writer.writerows(rows)
    inputs = recipe.Inputs(folders={"chest-imagenome": imagenome, "mimic-cxr": mimic}, cleaner=RuleCleaner(),
                           images="refuse")
    part = recipe.runnable(inputs, ["chest-imagenome/anatomical-grounding"])
    with pytest.raises(recipe.BoxesOutside, match=r"^chest-imagenome/anatomical-grounding: 1 of 4 boxes falls outside "
                       r"its image \(the first: a, box \(200, 200, 400, 400\), image 128x128\)"):
        list(recipe.build(part, inputs, random.Random(0), []))
    inputs = replace(inputs, images="skip")
    assert [i.image for i in recipe.build(part, inputs, random.Random(0), [])] == [str(mimic / "files" / "b.jpg")]

    # MS-CXR and PadChest-GR give their boxes' frame themselves: a box outside it is a slip of the table, and
    # the image goes with all its sentences (not one sentence with fewer boxes), said once however many repeats
    ms_cxr = tmp_path / "ms-cxr"
    ms_cxr.mkdir()
    with (ms_cxr / "MS_CXR_Local_Alignment_v1.1.0.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dicom_id", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height", "split"])
        writer.writerow(["c", "Left pleural effusion", "files/c.dcm", 600, 700, 300, 200, 1000, 1000, "train"])
        writer.writerow(["c", "Left pleural effusion", "files/c.dcm", 1200, 700, 300, 200, 1000, 1000, "train"])
        writer.writerow(["d", "Cardiomegaly", "files/d.dcm", 300, 500, 400, 300, 1000, 1000, "train"])
    padchest = tmp_path / "padchest-gr"
    padchest.mkdir()
    (padchest / "master_table.csv").write_text("ImageID,split\ne.png,train\nf.png,train\n")
    (padchest / "grounded_reports_20240819.json").write_text(json.dumps([
        {"ImageID": "e.png", "findings": [{"sentence_en": "Cardiomegaly.", "boxes": [[0.3, 0.5, 0.7, 0.8]]},
                                          {"sentence_en": "Right effusion.", "boxes": [[0.1, 0.7, 0.3]]}]},
        {"ImageID": "f.png", "findings": [{"sentence_en": "Hiatal hernia.", "boxes": [[0.4, 0.6, 0.6, 0.7]]}]}]))
    inputs = recipe.Inputs(folders={"ms-cxr": ms_cxr, "mimic-cxr": mimic, "padchest-gr": padchest},
                           cleaner=RuleCleaner())
    tallies: list[recipe.Tally] = []
    parts = recipe.runnable(inputs, ["ms-cxr/phrase-grounding", "padchest-gr/phrase-grounding"])
    items = list(recipe.build(parts, inputs, random.Random(0), tallies))
    assert [i.id for i in items] == ["ms-cxr-d-1", "ms-cxr-d-1-r1", "ms-cxr-d-1-r2", "padchest-gr-f.png-0",
                                     "padchest-gr-f.png-0-r1"]
    assert recipe.notes(tallies) == [
        "ms-cxr/phrase-grounding: 1 image left out with its datapoints, for a box that cannot be placed on it (1 of 3 "
        "boxes; the first c: box (1200, 700, 1500, 900) falls outside the 1000x1000 image)",
        "padchest-gr/phrase-grounding: 1 image left out with its datapoints, for a box that cannot be placed on it "
        "(1 of 3 boxes; the first e.png: box [0.1, 0.7, 0.3] is not four numbers)"]


def test_iu_xray_reports_take_the_frontal_image_and_drop_comparisons(tmp_path: Path) -> None:
    link(txv_data("NLMCXR_reports.tgz"), tmp_path)
    link(txv_data("nlmcxr_tsne_pa.csv.gz"), tmp_path)
    items = list(iu_xray.reports(tmp_path, tmp_path / "nlmcxr_tsne_pa.csv.gz", random.Random(0), RuleCleaner()))
    assert 3000 < len(items) < 3267  # 3,955 reports; 3,267 images seen as PA; some reports have no findings
    with gzip.open(tmp_path / "nlmcxr_tsne_pa.csv.gz", "rt") as handle:
        views = {row["imageid"]: row["tsne-view"] for row in csv.DictReader(handle)}
    assert all(views[Path(i.image).stem] == "PA" for i in items)  # never a lateral
    third = next(i for i in items if i.id == "iu-xray-3")
    assert third.image.endswith("NLMCXR_png/CXR3_IM-1384-1001.png")
    assert not any(RuleCleaner().clean("x", i.rounds[0][1]) != i.rounds[0][1] for i in items[:200])
    assert RuleCleaner().clean("x", "Heart size is normal. Unchanged left effusion since the prior study.") == \
        "Heart size is normal."


def test_iu_xray_a_full_stop_typed_without_its_space_ends_the_sentence(tmp_path: Path) -> None:
    """Report 4 as the archive has it: "...a cavitary lesion in the left lung apex.There are streaky opacities in
    the right upper lobe, XXXX scarring.": two sentences, of which only the second needs the missing word."""
    (tmp_path / "ecgen-radiology").mkdir()
    with tarfile.open(txv_data("NLMCXR_reports.tgz")) as tar:
        (tmp_path / "ecgen-radiology" / "4.xml").write_bytes(tar.extractfile("ecgen-radiology/4.xml").read())
    cleaner = RuleCleaner()
    [item] = iu_xray.reports(tmp_path, txv_data("nlmcxr_tsne_pa.csv.gz"), random.Random(0), cleaner)
    assert item.rounds[0][1] == (
        "There are diffuse bilateral interstitial and alveolar opacities consistent with chronic obstructive lung "
        "disease and bullous emphysema. There are irregular opacities in the left lung apex, that could represent a "
        "cavitary lesion in the left lung apex. The cardiomediastinal silhouette is normal in size and contour. There "
        "is no pneumothorax or large pleural effusion.")
    assert (cleaner.marks.reports, cleaner.marks.dropped) == (1, 1)
    # what such a split must leave whole
    assert sentences("Heart size normal.No 1.5 cm nodule.Dr.Smith agrees, at 3 p.m.today.") == [
        "Heart size normal.", "No 1.5 cm nodule.", "Dr.Smith agrees, at 3 p.m.today."]


def test_iu_xray_answers_lose_the_de_identification_marks_and_the_build_counts_them(tmp_path: Path, capsys) -> None:
    """The whole archive: 1,103 of its 3,243 report answers carried XXXX (its de-identification): a model
    trained on them writes XXXX. After the build none does, and the table says how many reports changed."""
    from radvlm_pacs import main

    link(txv_data("NLMCXR_reports.tgz"), tmp_path)
    link(txv_data("nlmcxr_tsne_pa.csv.gz"), tmp_path)
    picture = placeholder_png(tmp_path / "picture.png", 8, 8)
    with gzip.open(tmp_path / "nlmcxr_tsne_pa.csv.gz", "rt") as handle:
        frontal = [row["imageid"] for row in csv.DictReader(handle) if row["tsne-view"] == "PA"]
    (tmp_path / "NLMCXR_png").mkdir()
    for image in frontal:  # every frontal image in place (one small picture), so that the build checks them all
        (tmp_path / "NLMCXR_png" / f"{image}.png").symlink_to(picture)
    out = tmp_path / "iu.json"
    assert main(["train", "dataset", "--data", f"iu-xray={tmp_path}", "--out", str(out)]) == 0
    built = {entry["id"]: entry["conversations"][1]["value"] for entry in json.loads(out.read_text())}
    assert sum("XXXX" in answer for answer in built.values()) == 0  # before: 1,103
    assert 3200 < len(built) < 3243  # a few reports say nothing once their marked sentences went
    printed = capsys.readouterr().out
    [row] = [line.split() for line in printed.splitlines() if line.startswith("iu-xray/report ")]
    assert row[-3:] == ["1,104", "0", "0"]  # de-id: reports whose marks were taken out; no-image, bad-box: none
    assert ("iu-xray/report: 1,104 reports had de-identification marks (XXXX, ___): 1,314 sentences dropped, "
            "107 rewritten without the mark") in printed
    # report 1395 as written: "Lungs are clear. No parenchymal infiltrates. No pulmonary edema. No XXXX of pleural
    # effusions. No XXXX of acute cardiopulmonary disease. normal": the sentences say the same without the mark
    assert built["iu-xray-1395"] == ("Lungs are clear. No parenchymal infiltrates. No pulmonary edema. No pleural "
                                     "effusions. No acute cardiopulmonary disease. normal")
    # report 1135: "Heart XXXX, mediastinum, XXXX, bony structures and lung XXXX are unremarkable. Stable small
    # calcified granuloma left base. No XXXX acute findings/opacities/infiltrates noted.": the first needs the
    # missing words (dropped), the second compares (dropped), the third reads without the mark
    assert built["iu-xray-1135"] == "No acute findings/opacities/infiltrates noted."


def test_mimic_report_sections() -> None:
    text = (" FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n \n INDICATION:  ___ with cough\n \n"
            " FINDINGS: \n \n The lungs are clear.  No effusion.\n \n IMPRESSION: \n \n No acute process.\n")
    found = sections(text)
    assert " ".join(found["FINDINGS"].split()) == "The lungs are clear. No effusion."
    assert " ".join(found["IMPRESSION"].split()) == "No acute process."


def test_llava_json_round_trip(tmp_path: Path) -> None:
    item = Instruction(id="a", image="x.png", rounds=(("Q1?", "A1."), ("Q2?", "A2.")), task="conversation",
                       source="test", context="Sex: female")
    counts = instructions.write([item], tmp_path / "out.json")
    [entry] = json.loads((tmp_path / "out.json").read_text())
    assert entry["conversations"][0] == {"from": "human", "value": "<image>\nQ1?"}
    assert entry["conversations"][2] == {"from": "human", "value": "Q2?"}
    assert [i for i in instructions.read(tmp_path / "out.json")] == [item]
    assert counts[("test", "conversation")] == 1
    with pytest.raises(instructions.BadInstruction):
        Instruction(id="b", image="x", rounds=(("<image> Q", "A"),), task="report", source="t")


def test_training_images_are_the_services_model_images(tmp_path: Path) -> None:
    from records.pixels import read_model_image

    rg1 = radiograph("RG1_UNCI.dcm")  # MONOCHROME1: inverted, as the node does
    assert np.array_equal(gray_pixels(_copy(rg1, tmp_path)), read_model_image(rg1).pixels)
    sixteen = tmp_path / "16bit.png"
    Image.fromarray(np.array([[1000, 3000], [2000, 5000]], dtype=np.uint16)).save(sixteen)
    assert gray_pixels(sixteen).tolist() == [[0, 128], [64, 255]]  # scaled from the image's own range


def _copy(path: Path, folder: Path) -> Path:
    target = folder / "rg1.dcm"
    target.write_bytes(path.read_bytes())
    return target
