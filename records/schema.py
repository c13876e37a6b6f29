"""``StudyResult``: what the worker writes and what delivery and the API read (versioned).

Boxes are kept twice: as the model gave them (fractions of the original image's width and height)
and in pixels of the original image (column, row), so a reader never re-derives the mapping.
"""

from __future__ import annotations

from collections.abc import Collection

from pydantic import BaseModel, Field, model_validator

from records.findings import CHEXPERT_LABELS

SCHEMA_VERSION = 1


class Box(BaseModel):
    """One box: normalised to [0, 1] (x = column / Columns, y = row / Rows) and in pixels."""

    x1: float = Field(ge=0, le=1)
    y1: float = Field(ge=0, le=1)
    x2: float = Field(ge=0, le=1)
    y2: float = Field(ge=0, le=1)
    px: tuple[float, float, float, float] = Field(description="column1, row1, column2, row2 in the original image")

    @model_validator(mode="after")
    def _ordered(self) -> Box:
        if not (self.x1 < self.x2 and self.y1 < self.y2):
            raise ValueError(f"box corners out of order: {self.x1, self.y1, self.x2, self.y2}")
        return self


class Answer(BaseModel):
    """One question to the model and its answer, with what was parsed from it."""

    task: str
    question: str
    text: str
    boxes: list[Box] = Field(default_factory=list)
    malformed: str | None = Field(default=None, description="why the answer could not be fully parsed")
    seconds: float = 0.0
    new_tokens: int = 0


class Grounding(BaseModel):
    """Where a finding or anatomical region is on the image."""

    label: str
    kind: str = Field(description="'abnormality' or 'anatomy'")
    answer: Answer


class ImageResult(BaseModel):
    """Everything the model said about one frontal image."""

    sop_instance_uid: str
    series_instance_uid: str
    rows: int
    columns: int
    pixel_steps: list[str]
    report: Answer
    abnormalities: Answer
    labels: dict[str, bool] = Field(description="each of the 14 CheXpert labels: present or not")
    groundings: list[Grounding] = Field(default_factory=list)


class StudyResult(BaseModel):
    """What one analysis (one study version, one model revision) said about the study's frontal images, and the
    ``seconds`` it took; stored as JSON, ``schema_version`` says how to read it."""

    schema_version: int = SCHEMA_VERSION
    study_instance_uid: str
    study_version: int
    model_id: str
    model_revision: str
    prompt_version: str
    backend: str
    images: list[ImageResult]
    seconds: float

    def study_labels(self) -> dict[str, bool]:
        """Each CheXpert label, in order: present on any image of the study."""
        return {label: any(image.labels.get(label) for image in self.images) for label in CHEXPERT_LABELS}

    def findings(self) -> list[str]:
        """The findings present on any image, in CheXpert's order, without "No Finding"."""
        return [label for label, present in self.study_labels().items() if present and label != "No Finding"]

    def critical_labels(self, urgent: Collection[str]) -> list[str]:
        """The labels present in the study that the site counts as urgent (flagged AA in HL7 and FHIR)."""
        return sorted(label for label, present in self.study_labels().items() if present and label in urgent)

    def identity(self, final: bool = False) -> str:
        """The name of what is sent about this result (HL7 control ID, FHIR identifiers): study, version and
        model revision, plus "final" for the signed-off report, so every retry sends the same message."""
        return "/".join([self.study_instance_uid, str(self.study_version), self.model_revision]
                        + (["final"] if final else []))
