"""Hostile input: mutated copies of the real radiographs through reception and the image pipeline.

Each example is one of the pydicom-data radiographs (RG1 chest, RG3 tibia; implicit and explicit VR,
shrunk to 96x96 so ten thousand examples take minutes), mutated by hypothesis: bytes flipped, the file
cut short, header values replaced (also with the wrong VR), an oversized image, zero-length pixel data,
sequences nested thousands deep, a pixel data length of 1 GB. It goes to the node's real C-STORE handler
as pynetdicom hands it over (a received file on disk), and what is stored goes on to selection and
decoding (``completion.evaluate``), as at study completion. Every example must end in a DICOM status
with a reason, or in a selection or pixel-error reason; any exception escaping is a crash.

    .venv/bin/python benchmarks/fuzz_reception.py [--examples 10000] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataelem import RawDataElement  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.tag import Tag  # noqa: E402

from dicom_node.completion import evaluate  # noqa: E402
from reception.receiver import REJECTION_REASONS, Caller, Receiver, receive  # noqa: E402
from records.clock import utcnow  # noqa: E402
from records.db import make_engine, make_session_factory, upgrade  # noqa: E402
from records.storage import InstanceStore  # noqa: E402
from records.tables import Instance  # noqa: E402

SEEDS = ("RG1_UNCI.dcm", "RG1_UNCR.dcm", "RG3_UNCI.dcm", "RG3_UNCR.dcm")
HEADER_KEYWORDS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                   "SamplesPerPixel", "PhotometricInterpretation", "NumberOfFrames", "ViewPosition",
                   "BodyPartExamined", "Modality", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                   "WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "PatientOrientation",
                   "ImageLaterality", "PixelSpacing", "ImagerPixelSpacing")
VRS = ("AE", "AS", "CS", "DA", "DS", "FD", "FL", "IS", "LO", "OB", "OW", "PN", "SH", "SL", "SQ", "SS", "UI", "UL",
       "UN", "US", "UT")
SHARED_GROUPS = struct.pack("<HH", 0x5200, 0x9229)  # a sequence attribute that sorts before the pixel data


def shrunk(name: str) -> bytes:
    """A real radiograph at 96x96 (every nth pixel), its header otherwise as shipped."""
    ds = pydicom.dcmread(get_testdata_file(name))
    pixels = ds.pixel_array
    step = max(1, min(pixels.shape) // 96)
    small = np.ascontiguousarray(pixels[::step, ::step][:96, :96])
    ds.Rows, ds.Columns = small.shape
    ds.PixelData = small.tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _encoded(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


@dataclass(frozen=True)
class Mutation:
    kind: str
    apply: object  # Callable[[bytes], bytes]

    def __call__(self, data: bytes) -> bytes:
        return self.apply(data)  # type: ignore[operator]


def _flips(changes: list[tuple[float, int]]) -> Mutation:
    def apply(data: bytes) -> bytes:
        out = bytearray(data)
        for where, value in changes:
            out[int(where * (len(out) - 1))] = value
        return bytes(out)
    return Mutation("bytes flipped", apply)


def _cut(where: float) -> Mutation:
    return Mutation("cut short", lambda data: data[:int(where * len(data))])


def _header(keyword: str, value: object, vr: str | None) -> Mutation:
    def apply(data: bytes) -> bytes:
        ds = pydicom.dcmread(io.BytesIO(data))
        tag = Tag(keyword)
        if vr is None:
            ds[tag] = pydicom.DataElement(tag, ds[tag].VR if tag in ds else "LO", value)
            try:
                return _encoded(ds)
            except Exception:  # the value does not fit the VR: write its text as raw bytes instead
                raw = str(value).encode("latin-1", "replace")
        else:
            raw = str(value).encode("latin-1", "replace")
        raw += b" " * (len(raw) % 2)
        ds[tag] = RawDataElement(tag, vr or "UN", len(raw), raw, 0, ds.is_implicit_VR, ds.is_little_endian)
        return _encoded(ds)
    return Mutation("wrong VR" if vr else "header value", apply)


def _oversized(rows: int, columns: int) -> Mutation:
    def apply(data: bytes) -> bytes:
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.Rows, ds.Columns = rows, columns
        return _encoded(ds)
    return Mutation("oversized image", apply)


def _zero_pixels(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PixelData = b""
    return _encoded(ds)


def _pixel_data_at(data: bytes) -> tuple[int, bool]:
    """Offset of the (last) pixel data tag, and whether it is written with an explicit VR; -1 if absent."""
    at = data.rfind(b"\xe0\x7f\x10\x00")
    return at, data[at + 4:at + 6] in (b"OB", b"OW")


def _deep(depth: int) -> Mutation:
    """Sequences nested ``depth`` deep, of undefined length, before the pixel data (written byte by byte:
    pydicom's writer takes exponential time on them)."""
    def apply(data: bytes) -> bytes:
        at, explicit = _pixel_data_at(data)
        if at < 0:
            return data
        undefined = b"\xff\xff\xff\xff"
        sequence = SHARED_GROUPS + (b"SQ\x00\x00" if explicit else b"") + undefined
        item, item_end = b"\xfe\xff\x00\xe0" + undefined, b"\xfe\xff\x0d\xe0" + bytes(4)
        sequence_end = b"\xfe\xff\xdd\xe0" + bytes(4)
        nested = (sequence + item) * depth + (item_end + sequence_end) * depth
        return data[:at] + nested + data[at:]
    return Mutation("deep sequence", apply)


def _huge_length(length: int) -> Mutation:
    """The pixel data element claims ``length`` bytes (1 GB and more); the file holds what it held."""
    def apply(data: bytes) -> bytes:
        at, explicit = _pixel_data_at(data)
        if at < 0:
            return data
        out = bytearray(data)
        offset = at + 8 if explicit else at + 4
        out[offset:offset + 4] = struct.pack("<I", length)
        return bytes(out)
    return Mutation("1 GB declared length", apply)


MUTATIONS = st.one_of(
    st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=32).map(_flips),
    st.floats(0, 1, exclude_max=True).map(_cut),
    st.builds(_header, st.sampled_from(HEADER_KEYWORDS),
              st.one_of(st.integers(-2**31, 2**32), st.text(max_size=80), st.just(""), st.just("0"),
                        st.just("MONOCHROME3"), st.just("-1")),
              st.none() | st.sampled_from(VRS)),
    st.builds(_oversized, st.sampled_from([0, 1, 65535, 46341]), st.sampled_from([0, 1, 65535, 46341])),
    st.just(Mutation("zero-length pixel data", _zero_pixels)),
    st.integers(2, 20_000).map(_deep),
    st.sampled_from([0x40000000, 0xFFFFFFFE, 0x7FFFFFFF]).map(_huge_length),
)


@dataclass
class Tally:
    """What became of the examples: refused by status, stored and then selected, skipped or undecodable."""

    outcomes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)


class Harness:
    """The node's receiver over a scratch database and storage, fed files as pynetdicom leaves them."""

    def __init__(self, folder: Path) -> None:
        url = f"sqlite:///{folder / 'fuzz.sqlite'}"
        upgrade(url)
        self.sessions = make_session_factory(make_engine(url))
        self.store = InstanceStore(folder / "dicom", fsync=False)
        self.incoming = folder / "incoming"
        self.incoming.mkdir()
        self.receiver = Receiver(store=self.store, sessions=self.sessions, reserve_bytes=0, clock=utcnow,
                                 syncer=ThreadPoolExecutor(1))
        self.seeds = {name: shrunk(name) for name in SEEDS}
        self.count = 0

    def feed(self, seed_name: str, mutation: Mutation, tally: Tally) -> None:
        original = pydicom.dcmread(io.BytesIO(self.seeds[seed_name]), stop_before_pixels=True)
        self.count += 1
        try:
            data = mutation(self.seeds[seed_name])
        except Exception:  # pydicom itself cannot write this mutation: not an input, nothing to test
            tally.outcomes["mutation not writable"] += 1
            return
        tally.kinds[mutation.kind] += 1
        path = self.incoming / f"{self.count}.dcm"
        path.write_bytes(data)
        try:  # what C-STORE hands reception: the file, the negotiated syntax, the request's UIDs
            verdict = receive(self.receiver, path, original.file_meta.TransferSyntaxUID, Caller("FUZZER", "127.0.0.1"),
                              expected=(str(original.SOPInstanceUID), str(original.SOPClassUID)))
            if not verdict.stored:
                tally.outcomes[f"refused: {REJECTION_REASONS[verdict.status]}"] += 1
                return
            with self.sessions() as session:
                stored = session.query(Instance).filter_by(sop_instance_uid=str(original.SOPInstanceUID)).one()
                relative = stored.path
            if path.exists():  # a duplicate: the first copy was kept
                tally.outcomes["stored: duplicate"] += 1
                return
            evaluated = evaluate(self.store, relative)
            tally.outcomes["stored: " + ("pixel error" if evaluated.pixel_error else
                                         "selected" if evaluated.selected else "skipped")] += 1
            self.store.path(relative).unlink()  # the next example may reuse the UID
            with self.sessions() as session, session.begin():
                session.query(Instance).filter_by(path=relative).delete()
        except Exception:
            tally.crashes.append(f"{mutation.kind} of {seed_name}:\n{traceback.format_exc()}")
        finally:
            path.unlink(missing_ok=True)


def run(examples: int, seed_value: int, folder: Path) -> Tally:
    """Feed ``examples`` mutated files; the tally says what became of them."""
    harness, tally = Harness(folder), Tally()

    @seed(seed_value)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(SEEDS), MUTATIONS)
    def example(seed_name: str, mutation: Mutation) -> None:
        harness.feed(seed_name, mutation, tally)

    example()
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import logging
    import warnings

    logging.disable(logging.CRITICAL)  # every refusal logs a line; the tally counts them
    warnings.simplefilter("ignore")  # so does pydicom for each odd value
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        tally = run(args.examples, args.seed, Path(folder))
    seconds = time.perf_counter() - start
    fed = sum(tally.kinds.values())
    print(f"{fed} mutated files fed in {seconds:.0f} s ({fed / seconds:.0f}/s), seed {args.seed}")
    print("mutations:", ", ".join(f"{k} {v}" for k, v in tally.kinds.most_common()))
    for outcome, n in sorted(tally.outcomes.items()):
        print(f"  {outcome:32s} {n:6d}")
    print(f"crashes: {len(tally.crashes)}")
    for crash in tally.crashes[:5]:
        print(crash)
    return 1 if tally.crashes else 0


if __name__ == "__main__":
    sys.exit(main())
