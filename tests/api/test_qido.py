"""QIDO-RS matching (api.qido) on both databases the service runs on, with the values viewers send."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlalchemy import select

from api import qido
from records.db import make_engine, make_session_factory
from records.tables import Study

PATIENTS = {  # study UID: (patient ID, patient name, study date)
    "1.2.1": ("9RG1", "CompressedSamples^RG1", "20040826"),
    "1.2.2": ("9rg2", "SMITH^JOHN", "20260105"),
    "1.2.3": ("A_1", "Smith^Anna", "20260131"),
    "1.2.4": ("AB1", "SMYTHE^Mary", "20260201"),
    "1.2.5": ("P%5", "O'Neil (Jr.)^Sean", "20251231"),
    "1.2.6": ("P65", None, None),
}


@pytest.fixture
def match(database_url):  # type: ignore[no-untyped-def]
    """The study UIDs a condition selects from PATIENTS, in a real database of each kind."""
    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    now = datetime(2026, 11, 30, tzinfo=timezone.utc)
    with sessions() as session, session.begin():
        session.add_all(Study(study_instance_uid=uid, patient_id=pid, patient_name=name, study_date=date,
                              first_received_at=now, last_received_at=now)
                        for uid, (pid, name, date) in PATIENTS.items())

    def _match(condition) -> list[str]:  # type: ignore[no-untyped-def]
        with sessions() as session:
            return sorted(session.scalars(select(Study.study_instance_uid).where(condition)))

    yield _match
    engine.dispose()


def test_uid_lists_are_split_on_commas_and_backslashes(match):
    assert match(qido.uid_list(Study.study_instance_uid, "1.2.1,1.2.3")) == ["1.2.1", "1.2.3"]
    assert match(qido.uid_list(Study.study_instance_uid, "1.2.2\\1.2.9")) == ["1.2.2"]


def test_wildcards_are_case_sensitive_except_in_person_names(match):
    assert match(qido.wildcard(Study.patient_id, "9RG*")) == ["1.2.1"]
    assert match(qido.wildcard(Study.patient_id, "9rg2")) == ["1.2.2"]
    assert match(qido.wildcard(Study.patient_name, "smith*", any_case=True)) == ["1.2.2", "1.2.3"]
    assert match(qido.wildcard(Study.patient_name, "SM?TH^*", any_case=True)) == ["1.2.2", "1.2.3"]
    assert match(qido.wildcard(Study.patient_name, "smith^john", any_case=True)) == ["1.2.2"]
    assert match(qido.wildcard(Study.patient_name, "*^M*", any_case=True)) == ["1.2.4"]


def test_only_star_and_question_mark_are_wildcards(match):
    """SQL's own wildcards and a regular expression's signs in a value are matched as themselves."""
    assert match(qido.wildcard(Study.patient_id, "A_1")) == ["1.2.3"]
    assert match(qido.wildcard(Study.patient_id, "A_*")) == ["1.2.3"]
    assert match(qido.wildcard(Study.patient_id, "P%?")) == ["1.2.5"]
    assert match(qido.wildcard(Study.patient_name, "o'neil (jr.)*", any_case=True)) == ["1.2.5"]
    assert match(qido.wildcard(Study.patient_name, "O'Neil .*", any_case=True)) == []


def test_a_lone_star_or_an_empty_value_matches_every_study_also_without_the_attribute(match):
    assert match(qido.wildcard(Study.patient_name, "**", any_case=True)) == sorted(PATIENTS)
    assert match(qido.wildcard(Study.patient_id, "")) == sorted(PATIENTS)
    assert match(qido.date_range(Study.study_date, "")) == sorted(PATIENTS)
    assert match(qido.uid_list(Study.study_instance_uid, "")) == sorted(PATIENTS)


def test_dates_and_date_ranges_include_both_ends(match):
    assert match(qido.date_range(Study.study_date, "20260105")) == ["1.2.2"]
    assert match(qido.date_range(Study.study_date, "20260105-20260131")) == ["1.2.2", "1.2.3"]
    assert match(qido.date_range(Study.study_date, "20260131-")) == ["1.2.3", "1.2.4"]
    assert match(qido.date_range(Study.study_date, "-20251231")) == ["1.2.1", "1.2.5"]


@pytest.mark.parametrize("value", ["2026-01-05", "-", "20260105-2026", "yesterday"])
def test_what_is_no_date_or_range_is_refused_with_the_reason(value):
    with pytest.raises(ValueError, match="date"):
        qido.date_range(Study.study_date, value)
