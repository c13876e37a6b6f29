"""``radvlm-pacs train`` checks its inputs before the expensive part and refuses what a user can fix in
one line, exit status 2, with nothing left at ``--out``: images that are missing or do not open, tables
without a column, a misspelt part, a split the sources lack, a database never migrated, a checkpoint
path that does not exist, an LLM endpoint that refuses the key, datapoints longer than the model takes.
And what a pilot watches: progress bars, the data set layouts in ``--help``, the loader's workers."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import random
import sqlite3
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoProcessor

from radvlm_pacs.cli import _parser, main
from testbed.llm_server import ScriptedLLM
from tests.training.training_data import link, placeholder_dicom, placeholder_png, txv_data
from training import answers, instructions, recipe
from training.examples import Collator
from training.instructions import Instruction

VINDR_IMAGES = ("9a5094b2563a1ef3ff50dc5c7ff71345", "051132a778e61a86eb147c7c6f564dfe")  # cardiomegaly; aortic enl.


def _iu_folder(folder: Path, reports: range = range(1, 21)) -> Path:
    """Real IU X-ray reports (the first few of NLMCXR_reports.tgz, unpacked as ecgen-radiology/) and its views."""
    (folder / "ecgen-radiology").mkdir(parents=True)
    with tarfile.open(txv_data("NLMCXR_reports.tgz")) as tar:
        for number in reports:
            member = tar.extractfile(f"ecgen-radiology/{number}.xml")
            assert member is not None
            (folder / "ecgen-radiology" / f"{number}.xml").write_bytes(member.read())
    link(txv_data("nlmcxr_tsne_pa.csv.gz"), folder)
    return folder


def _vindr_folder(folder: Path, rename: dict[str, str] | None = None) -> Path:
    """Real VinDr-CXR boxes of two images, under PhysioNet's name for the training table."""
    with gzip.open(txv_data("vinbigdata-train.csv.gz"), "rt") as handle:
        reader = csv.DictReader(handle)
        chosen = [row for row in reader if row["image_id"] in VINDR_IMAGES]
        columns = [(rename or {}).get(name, name) for name in reader.fieldnames or []]
    (folder / "annotations").mkdir(parents=True)
    with (folder / "annotations" / "annotations_train.csv").open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows(row.values() for row in chosen)
    return folder


def _stderr_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _nothing_at(out: Path) -> bool:
    return not out.exists() and not out.with_name(out.name + ".part").exists()


# --- images: checked before anything is written ---------------------------------------------------------


def test_a_build_without_its_images_is_refused_naming_the_count_and_the_first(tmp_path, capsys):
    link(txv_data("NLMCXR_reports.tgz"), tmp_path)  # the whole archive, no NLMCXR_png/ beside it
    link(txv_data("nlmcxr_tsne_pa.csv.gz"), tmp_path)
    out = tmp_path / "iu.json"
    assert main(["train", "dataset", "--data", f"iu-xray={tmp_path}", "--out", str(out)]) == 2
    assert _stderr_line(capsys) == (
        f"radvlm-pacs: iu-xray/report: 3,232 of 3,232 images missing or unreadable, the first "
        f"{tmp_path}/NLMCXR_png/CXR100_IM-0002-1001.png (no such file); put them in place, or --missing-images "
        "skip to leave their datapoints out")
    assert _nothing_at(out)  # not the 3,243 datapoints "written", nor a 1-byte "[" file


def test_skipped_images_are_left_out_and_counted(tmp_path, capsys):
    folder = _iu_folder(tmp_path / "iu")
    out = tmp_path / "iu.json"
    images = [Path(image) for image in _images_of(folder)]
    built = len(images)
    assert main(["train", "dataset", "--data", f"iu-xray={folder}", "--out", str(out), "--missing-images",
                 "skip"]) == 2  # not "wrote 0 datapoints" and a "[]" file
    assert _stderr_line(capsys) == (
        f"radvlm-pacs: no datapoint to write: iu-xray/report: {built} datapoints built, all left out ({built} images "
        f"missing or unreadable, the first {images[0]}: no such file)")
    assert _nothing_at(out)

    for image in images[:3]:
        placeholder_png(image, 32, 40)
    images[3].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG signature and nothing after it
    assert main(["train", "dataset", "--data", f"iu-xray={folder}", "--out", str(out), "--missing-images",
                 "skip"]) == 0
    printed = capsys.readouterr().out
    [row] = [line.split() for line in printed.splitlines() if line.startswith("iu-xray/report ")]
    assert row[5] == "3" and row[-2] == str(built - 3)  # written; no-image
    assert [entry["image"] for entry in json.loads(out.read_text())] == [str(image) for image in images[:3]]
    assert (f"iu-xray/report: {built - 3} images missing or unreadable, left out with their datapoints (the first "
            f"{images[3]}: does not open (") in printed

    refused = tmp_path / "refused.json"
    assert main(["train", "dataset", "--data", f"iu-xray={folder}", "--out", str(refused)]) == 2
    assert _stderr_line(capsys).startswith(f"radvlm-pacs: iu-xray/report: {built - 3} of {built} images missing or "
                                           f"unreadable, the first {images[3]} (does not open (")
    assert _nothing_at(refused)


def test_the_notes_say_one_in_the_singular(tmp_path, capsys):
    folder = _iu_folder(tmp_path / "iu", range(4, 5))  # one XXXX sentence, dropped
    for image in _images_of(folder):
        placeholder_png(Path(image), 32, 40)
    out = tmp_path / "iu.json"
    assert main(["train", "dataset", "--data", f"iu-xray={folder}", "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "iu-xray/report: 1 report had de-identification marks (XXXX, ___): 1 sentence dropped, 0 rewritten without "
        "the mark", f"wrote 1 datapoint to {out}"]


def _images_of(folder: Path) -> list[str]:
    from training.reports import RuleCleaner
    from training.sources import iu_xray

    return [item.image for item in iu_xray.reports(folder, folder / "nlmcxr_tsne_pa.csv.gz", random.Random(0),
                                                   RuleCleaner())]


def test_dicom_images_are_checked_by_their_header(tmp_path, capsys):
    folder = _vindr_folder(tmp_path / "vindr")
    placeholder_dicom(folder / "train" / f"{VINDR_IMAGES[0]}.dicom", columns=2000, rows=2500)
    (folder / "train" / f"{VINDR_IMAGES[1]}.dicom").write_bytes(b"not a DICOM file")
    out = tmp_path / "vindr.json"
    args = ["train", "dataset", "--data", f"vindr-cxr={folder}", "--out", str(out), "--only", "vindr-cxr/detection"]
    assert main(args) == 2
    line = _stderr_line(capsys)
    assert line.startswith(f"radvlm-pacs: vindr-cxr/detection: 1 of 2 images missing or unreadable, the first "
                           f"{folder / 'train' / VINDR_IMAGES[1]}.dicom (does not open (InvalidDicomError")
    assert _nothing_at(out)
    assert main([*args, "--missing-images", "skip"]) == 0
    built = json.loads(out.read_text())  # detection is taken twice (RadVLM's up-sampling): the good image, twice
    assert [entry["image"] for entry in built] == [str(folder / "train" / f"{VINDR_IMAGES[0]}.dicom")] * 2


def test_boxes_outside_their_image_are_refused_and_never_make_a_normal_image(tmp_path, capsys):
    """A downsampled copy (1,024 pixels square) of an image its readers drew on at full size: its boxes fall
    outside it. The build refuses; told to skip, it leaves that image out of every part, rather than writing a
    detection datapoint that calls an image with cardiomegaly and an aortic enlargement normal."""
    folder = _vindr_folder(tmp_path / "vindr")
    full, small = VINDR_IMAGES
    placeholder_dicom(folder / "train" / f"{full}.dicom", columns=2000, rows=2500)
    placeholder_dicom(folder / "train" / f"{small}.dicom", columns=1024, rows=1024)
    out = tmp_path / "vindr.json"
    args = ["train", "dataset", "--data", f"vindr-cxr={folder}", "--out", str(out)]
    assert main(args) == 2
    # the small image's 7 boxes (R8, R9, R10), of the 13 drawn on the two; its first row: x_min 1264 > 1024
    assert _stderr_line(capsys) == (
        f"radvlm-pacs: vindr-cxr/abnormality-grounding: 7 of 13 boxes fall outside their image (the first: {small}, "
        "box (1264, 743, 1611, 1019), image 1024x1024): the images are not the originals; put the originals "
        "in place, or --missing-images skip to leave those images out")
    assert _nothing_at(out)

    assert main([*args, "--missing-images", "skip"]) == 0
    captured = capsys.readouterr()
    built = json.loads(out.read_text())
    assert {entry["image"] for entry in built} == {str(folder / "train" / f"{full}.dicom")}
    assert [entry["task"] for entry in built].count("detection") == 2  # the full-size image, twice
    assert not any("No lesion" in entry["conversations"][1]["value"] for entry in built)
    rows = {line.split()[0]: line.split()[1:] for line in captured.out.splitlines()[1:3]}
    assert rows["vindr-cxr/detection"][-1] == rows["vindr-cxr/abnormality-grounding"][-1] == "1"  # bad-box
    # said once per part, not once per repeat (the pilot: 67 boxes, 335 warnings)
    assert captured.err == ""
    assert [line for line in captured.out.splitlines() if small in line] == [
        f"{part}: 1 image left out with its datapoints, for a box that cannot be placed on it (7 of 13 boxes; the "
        f"first {small}: box (1264, 743, 1611, 1019) falls outside the 1024x1024 image)"
        for part in ("vindr-cxr/abnormality-grounding", "vindr-cxr/detection")]


# --- lengths: counted before the first step -------------------------------------------------------------


def _conversation(image: Path, index: int, extra_rounds: int = 0) -> Instruction:
    question, answer = answers.abnormalities(random.Random(index), ["Cardiomegaly"])
    rounds = ((question, answer),) + tuple((f"Question {n}?", "Yes, the heart is enlarged. " * 8)
                                           for n in range(extra_rounds))
    return Instruction(id=f"t{index}", image=str(image), task="conversation" if extra_rounds else "abnormalities",
                       source="test", rounds=rounds)


def test_lengths_are_the_collators_without_decoding_an_image(tiny_model: Path, tmp_path: Path) -> None:
    from training.lengths import lengths

    processor = AutoProcessor.from_pretrained(tiny_model)
    items = [_conversation(placeholder_png(tmp_path / "a.png", 80, 96), 0),
             _conversation(placeholder_png(tmp_path / "b.png", 700, 500), 1, extra_rounds=3),
             _conversation(placeholder_dicom(tmp_path / "c.dcm", 600, 900), 2, extra_rounds=1),
             _conversation(placeholder_png(tmp_path / "d.png", 300, 1000), 3)]
    collator = Collator(processor)
    assert lengths(items, processor) == [collator([item])["input_ids"].shape[1] for item in items]


def test_finetune_refuses_or_skips_what_is_too_long_before_its_first_step(tiny_model: Path, tmp_path: Path,
                                                                          capsys) -> None:
    short = _conversation(placeholder_png(tmp_path / "a.png", 80, 96), 0)
    long = _conversation(placeholder_png(tmp_path / "b.png", 80, 96), 1, extra_rounds=6)
    data = tmp_path / "train.json"
    instructions.write([short, long], data)
    collator = Collator(AutoProcessor.from_pretrained(tiny_model))
    short_tokens, long_tokens = (collator([item])["input_ids"].shape[1] for item in (short, long))
    assert short_tokens < long_tokens
    out = tmp_path / "run"
    command = ["train", "finetune", "--model", str(tiny_model), "--data", str(data), "--out", str(out),
               "--workers", "0", "--batch-size", "1", "--grad-accum", "1", "--logging-steps", "1"]
    assert main([*command, "--max-length", str(long_tokens - 1)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"radvlm-pacs: 1 of 2 datapoints are longer than --max-length {long_tokens - 1:,d} tokens (the longest: t1, "
        f"{long_tokens:,d} tokens); raise --max-length, or --too-long skip to leave them out")
    assert not out.exists()  # no empty run folder

    assert main([*command, "--max-length", str(long_tokens - 1), "--too-long", "skip", "--epochs", "1"]) == 0
    captured = capsys.readouterr()
    assert (f"left out: 1 of 2 datapoints are longer than --max-length {long_tokens - 1:,d} tokens (the longest: "
            f"t1, {long_tokens:,d} tokens)") in captured.err
    assert '"train_runtime"' in captured.out
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 1  # one datapoint, batch 1, one epoch


def test_a_misspelt_local_checkpoint_is_refused_at_once(tmp_path: Path) -> None:
    """``runs/radvlm-typo`` where ``runs/`` is a local folder: transformers would try it on the hub (minutes
    of retries without a network)."""
    (tmp_path / "runs" / "radvlm").mkdir(parents=True)
    data = tmp_path / "train.json"
    instructions.write([_conversation(placeholder_png(tmp_path / "a.png", 80, 96), 0)], data)
    import radvlm_pacs

    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(Path(radvlm_pacs.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-m", "radvlm_pacs", "train", "finetune", "--model", "runs/radvlm-typo",
                           "--data", str(data), "--out", "runs/out"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"radvlm-pacs: --model runs/radvlm-typo: no such folder ({tmp_path / 'runs'} "
                                   "holds no radvlm-typo); a hub id is OWNER/NAME")
    assert not (tmp_path / "runs" / "out").exists()


# --- tables, parts, splits, databases, endpoints: one line each ------------------------------------------


@pytest.mark.parametrize(("source", "column"), [("vindr-cxr", "class_name"), ("vindr-cxr", "x_min"),
                                                ("iu-xray", "imageid")])
def test_a_table_without_a_column_is_named(tmp_path, capsys, source, column):
    if source == "vindr-cxr":
        folder = _vindr_folder(tmp_path / "data", rename={column: column.replace("_", "")})
        table = folder / "annotations" / "annotations_train.csv"
    else:
        folder = tmp_path / "data"
        folder.mkdir()
        table = folder / "nlmcxr_dicom_metadata.csv"
        table.write_text("imageId,View Position\nCXR1_1_IM-0001-4001,PA\n")
        link(txv_data("NLMCXR_reports.tgz"), folder)
    out = tmp_path / "out.json"
    assert main(["train", "dataset", "--data", f"{source}={folder}", "--out", str(out)]) == 2
    line = _stderr_line(capsys)
    assert line.startswith(f"radvlm-pacs: {table}: no column '{column}' (its columns: ")
    assert _nothing_at(out)


def test_a_misspelt_part_is_named_with_the_nearest(tmp_path, capsys):
    folder = _vindr_folder(tmp_path / "vindr")
    assert main(["train", "dataset", "--data", f"vindr-cxr={folder}", "--out", str(tmp_path / "o.json"),
                 "--only", "vindr-cxr/detections"]) == 2
    line = _stderr_line(capsys)
    assert line.startswith("radvlm-pacs: --only vindr-cxr/detections: no such part (did you mean "
                           "vindr-cxr/detection?); parts: mimic-cxr/report, ")


def test_the_test_split_of_sources_without_one_says_so(tmp_path, capsys):
    iu = _iu_folder(tmp_path / "iu", range(1, 3))
    nih = tmp_path / "nih"
    nih.mkdir()
    assert main(["train", "dataset", "--split", "test", "--data", f"iu-xray={iu}", "--data", f"nih-chestxray14={nih}",
                 "--out", str(tmp_path / "o.json")]) == 2
    assert _stderr_line(capsys) == (
        "radvlm-pacs: nothing to build: --split test, and iu-xray/report, nih-chestxray14/abnormality-grounding have "
        "no test split (the sources with one: chest-imagenome, chexpert, mimic-cxr, ms-cxr, padchest-gr, site, "
        "vindr-cxr)")
    assert main(["train", "dataset", "--data", f"vindr-cxr={tmp_path / 'nowhere'}", "--out", str(tmp_path / "o")]) == 2
    assert _stderr_line(capsys) == f"radvlm-pacs: --data vindr-cxr={tmp_path / 'nowhere'}: no such folder"
    ms_cxr = tmp_path / "ms-cxr"
    ms_cxr.mkdir()
    assert main(["train", "dataset", "--data", f"ms-cxr={ms_cxr}", "--out", str(tmp_path / "o.json")]) == 2
    assert _stderr_line(capsys) == (
        "radvlm-pacs: nothing to build: ms-cxr/phrase-grounding needs --data mimic-cxr=FOLDER; "
        "ms-cxr/grounded-conversation needs --data mimic-cxr=FOLDER and --llm-url and --llm-model")


def test_export_site_on_a_database_never_migrated_creates_nothing(tmp_path, monkeypatch, capsys):
    storage, out = tmp_path / "storage", tmp_path / "site"
    monkeypatch.setenv("RADVLM_STORAGE_DIR", str(storage))
    database = tmp_path / "node.db"
    monkeypatch.setenv("RADVLM_DATABASE_URL", f"sqlite:///{database}")
    assert main(["train", "export-site", "--out", str(out)]) == 2
    assert _stderr_line(capsys).startswith(f"radvlm-pacs: no database at sqlite:///{database}: ")
    assert not database.exists() and not out.exists() and not storage.exists()

    sqlite3.connect(database).close()  # there, empty: never migrated
    assert main(["train", "export-site", "--out", str(out)]) == 2
    line = _stderr_line(capsys)
    assert line.startswith(f"radvlm-pacs: the database at sqlite:///{database} is at revision none (never migrated), "
                           "not ") and line.endswith(": run radvlm-pacs db upgrade first")
    assert not out.exists() and not storage.exists()
    assert sqlite3.connect(database).execute("select name from sqlite_master").fetchall() == []


@pytest.fixture()
def strict_llm() -> Iterator[ScriptedLLM]:
    scripted = ScriptedLLM(api_key="the-right-key")
    server = scripted.start()
    yield scripted
    server.should_exit = True


def test_an_llm_endpoint_that_refuses_the_key_stops_the_build(strict_llm, tmp_path, monkeypatch, capsys):
    folder = _iu_folder(tmp_path / "iu", range(1, 6))
    monkeypatch.setenv("RADVLM_LLM_API_KEY", "a-wrong-key")
    out = tmp_path / "iu.json"
    assert main(["train", "dataset", "--data", f"iu-xray={folder}", "--out", str(out), "--llm-url", strict_llm.url,
                 "--llm-model", "scripted", "--cache", str(tmp_path / "cache")]) == 2
    assert _stderr_line(capsys) == (
        f"radvlm-pacs: {strict_llm.url} (scripted) refuses the request: Error code: 401 - Incorrect API key "
        "provided; check the key ($RADVLM_LLM_API_KEY), the URL and the model name")
    assert _nothing_at(out) and not strict_llm.prompts  # not one report fell back to the rules


def test_the_llm_cleaner_leaves_no_mark(strict_llm, tmp_path):
    """The prompt asks the LLM to take the marks out; whatever it leaves (this one keeps them), the rules take."""
    from training.llm import ChatLLM, Endpoint
    from training.reports import CLEANING_PROMPT, LLMCleaner

    assert "XXXX" in CLEANING_PROMPT and "Never write XXXX" in CLEANING_PROMPT
    cleaner = LLMCleaner(ChatLLM(Endpoint(url=strict_llm.url, model="scripted", api_key="the-right-key")),
                         tmp_path / "cache")
    text = "Heart size normal. No XXXX of pleural effusion. Midline sternotomy XXXX. Since the prior, no change."
    assert cleaner.clean("iu-1", text) == "Heart size normal. No pleural effusion."
    assert (cleaner.marks.reports, cleaner.marks.dropped, cleaner.marks.rewritten) == (1, 1, 1)
    assert "XXXX" in (tmp_path / "cache" / "iu-1.txt").read_text()  # the LLM's own answer, kept as given


# --- what a pilot watches -------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_show_on_a_terminal(tmp_path, monkeypatch):
    folder = _iu_folder(tmp_path / "iu", range(1, 6))
    for image in _images_of(folder):
        placeholder_png(Path(image), 16, 16)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["train", "dataset", "--data", f"iu-xray={folder}", "--out", str(tmp_path / "iu.json")]) == 0
    shown = terminal.getvalue()
    assert "iu-xray/report: " in shown and "datapoint" in shown  # the part's bar
    assert "iu-xray/report: images: 100%" in shown  # the image checks' bar

    monkeypatch.setenv("RADVLM_MODEL__BACKEND", "scripted")
    assert main(["train", "evaluate", "--data", str(tmp_path / "iu.json"), "--out", str(tmp_path / "eval")]) == 0
    assert "evaluate: 100%" in terminal.getvalue()


def test_dataset_help_lists_the_sources_and_the_files_each_reads(capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "dataset", "--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    for name, layout in recipe.LAYOUTS.items():
        assert f"\n  {name}: " in shown
        for line in layout.describe():
            assert line in shown
    for file in ("NLMCXR_reports.tgz", "annotations/annotations_{split}.csv", "BBox_List_2017.csv",
                 "stage_2_train_labels.csv", "df_chexpert_plus_240401.csv", "MS_CXR_Local_Alignment_v1.1.0.csv",
                 "grounded_reports_*.json", "silver_dataset/splits/{split}.csv", "mimic-cxr-2.0.0-metadata.csv",
                 "signoffs.csv", "test_labels.csv"):
        assert file in shown
    assert set(recipe.LAYOUTS) == set(recipe.DATASETS)


def test_data_loader_workers_default_to_the_cores(monkeypatch):
    args = ["train", "finetune", "--model", "m", "--data", "d.json", "--out", "o"]
    cores = len(os.sched_getaffinity(0))
    assert _parser().parse_args(args).workers == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two training processes on this node share them
    assert _parser().parse_args(args).workers == max(1, cores // 2)


def test_the_training_page_lists_every_layout_and_one_datapoint_per_task():
    import re

    from radvlm.parsing import BOX_PATTERN

    root = Path(__file__).resolve().parents[2]
    assert "](docs/training.md)" in (root / "README.md").read_text()
    text = (root / "docs" / "training.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in text.splitlines() if line.startswith("| `")}
    assert set(rows) == set(recipe.LAYOUTS)
    for name, layout in recipe.LAYOUTS.items():
        row = rows[name]
        for table in layout.tables:
            assert [n for n in table.names if f"`{n}`" not in row] == [], name
            assert [c for c in (*table.columns, *table.optional) if f"`{c}`" not in row] == [], name
        assert f"`{layout.images}`" in row, name
        assert all(part.name in row for part in recipe.PARTS if name in part.needs), name
    examples = [Instruction.from_llava(json.loads(block)) for block in re.findall(r"```json\n(.*?)\n```", text, re.S)]
    assert sorted(example.task for example in examples) == sorted(instructions.TASKS)
    for example in examples:
        answer = example.rounds[-1][1]
        assert bool(BOX_PATTERN.search(answer)) == ("grounding" in example.task or example.task in (
            "detection", "grounded-conversation")), example.id
        assert "XXXX" not in answer
