"""The node against DCMTK storescu and pynetdicom, with the real radiographs from pydicom-data."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import ComputedRadiographyImageStorage, CTImageStorage, Verification
from sqlalchemy import create_engine, func, select, text

from dicom_node import spool
from dicom_node.server import INCOMING
from dicom_node.transport import READ_BYTES, BulkReadSocket
from records.pixels import read_model_image
from records.tables import Instance, Study, StudyState, StudyVersion
from testbed.databases import POSTGRES_ADMIN_URL
from testbed.dcmtk import storescu
from testbed.network import wait_for
from testbed.radiographs import radiograph, rg1_copy

RG1_STUDY = "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"
RG3_STUDY = "1.3.6.1.4.1.5962.1.2.11.20040826185059.5457"


def _study(running, uid: str) -> Study | None:
    with running.sessions() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == uid))
        if study is not None:
            _ = study.instances, study.versions  # load while the session is open
        return study


def _complete(running, uid: str, timeout: float = 15.0) -> Study:
    return wait_for(lambda: (s := _study(running, uid)) and s.state is not StudyState.receiving and s, timeout)


def test_chest_pa_and_tibia_with_storescu(database_url, start_node):
    running = start_node(database_url)
    result = storescu(running.port, radiograph("RG1_UNCI.dcm"), radiograph("RG3_UNCI.dcm"))
    assert result.returncode == 0, result.stderr

    chest = _complete(running, RG1_STUDY)
    assert chest.state is StudyState.ready
    [instance] = chest.instances
    assert instance.selected is True and instance.pixel_error is None
    assert instance.selection_reason == "frontal chest: ViewPosition PA"
    assert instance.calling_ae == "STORESCU"

    tibia = _complete(running, RG3_STUDY)
    assert tibia.state is StudyState.nothing_to_analyse
    assert "not chest: BodyPartExamined EXTREMITY" in tibia.state_reason
    [skipped] = tibia.instances
    assert skipped.selected is False
    assert running.store.path(skipped.path).is_file()  # stored, though skipped

    # stored as received: the same bytes as the source file's dataset, meta rebuilt by the node
    stored = pydicom.dcmread(running.store.path(instance.path))
    source = pydicom.dcmread(radiograph("RG1_UNCI.dcm"))
    assert stored.PixelData == source.PixelData
    assert stored.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID

    # exactly one ready event, for the chest study only
    wait_for(lambda: running.ready, 5)
    assert running.ready == [(chest.id, 1)]
    [version] = _study(running, RG1_STUDY).versions
    assert version.dispatched_at is not None and version.selected_count == 1


@pytest.mark.parametrize("compressed_file, flag, uncompressed_file",
                         [("RG1_J2KR.dcm", "-xv", "RG1_UNCR.dcm"), ("RG1_J2KI.dcm", "-xw", "RG1_UNCI.dcm")])
def test_jpeg2000_received_compressed_decodes_like_uncompressed(
        sqlite_url, start_node, compressed_file, flag, uncompressed_file):
    """storescu sends JPEG 2000 as is; the node stores it compressed and decodes it identically."""
    running = start_node(sqlite_url)
    result = storescu(running.port, radiograph(compressed_file), extra=(flag,))
    assert result.returncode == 0, result.stderr
    study = _complete(running, RG1_STUDY)
    [instance] = study.instances
    assert instance.transfer_syntax_uid.startswith("1.2.840.10008.1.2.4.9")
    compressed = read_model_image(running.store.path(instance.path))
    uncompressed = read_model_image(radiograph(uncompressed_file))
    # RG1_J2KR equals RG1_UNCR and RG1_J2KI equals RG1_UNCI, pixel for pixel
    assert np.array_equal(compressed.pixels, uncompressed.pixels)
    assert (compressed.rows, compressed.columns) == (1955, 1841)


def test_unci_and_j2kr_differ_only_by_the_lossy_coding(tmp_path):
    """RG1_UNCI is the decompressed lossy J2KI: against the lossless J2KR it is within 3 grey levels."""
    unci = read_model_image(radiograph("RG1_UNCI.dcm")).pixels.astype(int)
    j2kr = read_model_image(radiograph("RG1_J2KR.dcm")).pixels.astype(int)
    difference = np.abs(unci - j2kr)
    assert difference.max() <= 3
    assert difference.mean() < 0.5


def test_same_instance_twice_is_stored_once(database_url, start_node):
    running = start_node(database_url)
    for _ in range(2):
        result = storescu(running.port, radiograph("RG1_UNCI.dcm"))
        assert result.returncode == 0, result.stderr
    study = _complete(running, RG1_STUDY)
    assert len(study.instances) == 1
    files = list(running.store.root.rglob("*.dcm"))
    assert len(files) == 1


def test_concurrent_associations_create_one_study_and_keep_one_copy(database_url, start_node, tmp_path):
    """Six associations at the same moment: four bring new instances of a study the node has never
    seen, two bring the same instance. One study row, version 1, five instances, five files."""
    running = start_node(database_url)
    study_uid = generate_uid()
    files = [rg1_copy(tmp_path, f"{n}.dcm", StudyInstanceUID=study_uid) for n in range(5)]
    senders = [*files[:4], files[4], files[4]]
    start = threading.Barrier(len(senders))
    statuses: list[int] = []

    def send(path: Path) -> None:
        ds = pydicom.dcmread(path)
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", running.port, ae_title="RADVLM")
        start.wait(timeout=30)
        statuses.append(int(assoc.send_c_store(ds).Status))
        assoc.release()

    threads = [threading.Thread(target=send, args=(path,)) for path in senders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert statuses == [0] * 6
    with running.sessions() as session:
        [study] = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).all()
        stored = set(session.scalars(select(Instance.sop_instance_uid).where(Instance.study_id == study.id)))
    assert study.version == 1
    assert stored == {pydicom.dcmread(f).SOPInstanceUID for f in files}
    assert len(list(running.store.root.glob(f"{study_uid}/*/*.dcm"))) == 5


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_connections_the_database_dropped_cost_no_store(database_url, start_node, tmp_path, caplog):
    """The node takes its pooled connections without pinging them first: after PostgreSQL has dropped
    them all (as a restart or an idle timeout does), the next C-STORE still succeeds, on a new
    connection, with a warning that says so."""
    running = start_node(database_url, completion_poll_s=600)  # no other user of the pool meanwhile
    first, second = rg1_copy(tmp_path, "first.dcm"), rg1_copy(tmp_path, "second.dcm")
    assert storescu(running.port, first).returncode == 0
    database = database_url.rsplit("/", 1)[1]
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        dropped = connection.scalar(text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = :name"),
            {"name": database})
    admin.dispose()
    assert dropped >= 1
    with caplog.at_level(logging.WARNING, logger="reception.receiver"):
        result = storescu(running.port, second)
    assert result.returncode == 0, result.stderr
    assert any("database connection lost" in r.getMessage() for r in caplog.records)
    with running.sessions() as session:
        stored = set(session.scalars(select(Instance.sop_instance_uid)))
    assert stored == {pydicom.dcmread(f).SOPInstanceUID for f in (first, second)}


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_statement_the_database_refuses_is_logged_without_patient_data(database_url, start_node, tmp_path,
                                                                         caplog):
    """The database refuses the study's row (a constraint the test adds): the sender is told "cannot
    store", the log line says which constraint refused it but none of the row's values (PostgreSQL's
    error quotes them all, the patient's name and ID among them), and nothing is left in storage."""
    running = start_node(database_url)
    admin = create_engine(database_url)
    with admin.begin() as connection:
        connection.execute(text("ALTER TABLE studies ADD CONSTRAINT refuse_all CHECK (false) NOT VALID"))
    admin.dispose()
    ds = pydicom.dcmread(rg1_copy(tmp_path, "private.dcm", PatientName="Doe^Jane", PatientID="PID-4711"))
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    with caplog.at_level(logging.ERROR, logger="reception.receiver"):
        assoc = ae.associate("127.0.0.1", running.port, ae_title="RADVLM")
        status = assoc.send_c_store(ds)
        assoc.release()
    assert status.Status == 0xA701
    assert 'CheckViolation: new row for relation "studies" violates check constraint "refuse_all"' in caplog.text
    assert "Doe^Jane" not in caplog.text and "PID-4711" not in caplog.text
    assert list(running.store.root.rglob(f"{ds.SOPInstanceUID}.dcm")) == []


def test_unknown_calling_ae_is_rejected(sqlite_url, start_node, caplog):
    from records.settings import CallerRule

    running = start_node(sqlite_url, allowed_callers=[CallerRule(ae_title="ORTHANC", host="127.0.0.1")])
    with caplog.at_level(logging.WARNING, logger="dicom_node.handlers"):
        result = storescu(running.port, radiograph("RG1_UNCI.dcm"), calling="INTRUDER")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr or "Association Rejected" in result.stderr
    assert "rejected association from INTRUDER@127.0.0.1: calling AE title not allowed" in caplog.text
    assert _study(running, RG1_STUDY) is None

    # the allowed AE from the allowed host is accepted, the same AE from another host is not
    ok = storescu(running.port, radiograph("RG1_UNCI.dcm"), calling="ORTHANC")
    assert ok.returncode == 0, ok.stderr
    wrong_host = start_node(sqlite_url, allowed_callers=[CallerRule(ae_title="ORTHANC", host="10.9.9.9")])
    with caplog.at_level(logging.WARNING, logger="dicom_node.handlers"):
        refused = storescu(wrong_host.port, radiograph("RG1_UNCI.dcm"), calling="ORTHANC")
    assert refused.returncode != 0
    assert "host not allowed for this AE title" in caplog.text


def test_wrong_called_ae_is_rejected(sqlite_url, start_node):
    running = start_node(sqlite_url)
    result = storescu(running.port, radiograph("RG1_UNCI.dcm"), called="SOMEONEELSE")
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stderr


def test_unsupported_sop_class_is_rejected_at_negotiation(sqlite_url, start_node, caplog):
    running = start_node(sqlite_url)
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    with caplog.at_level(logging.INFO, logger="dicom_node.handlers"):
        assoc = ae.associate("127.0.0.1", running.port, ae_title="RADVLM")
        assert assoc.is_established
        [rejected] = assoc.rejected_contexts
        assoc.release()
    assert rejected.abstract_syntax == CTImageStorage
    assert rejected.result == 0x03  # abstract syntax not supported
    assert "SOP classes not supported (rejected): CT Image Storage" in caplog.text


def _cr_file(path: Path, dataset_bytes: bytes, sop_uid: str) -> Path:
    """A Part 10 file whose meta is valid and whose dataset bytes are whatever the test says."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = pydicom.filebase.DicomBytesIO()
    pydicom.filewriter.write_file_meta_info(buffer, meta, enforce_standard=True)
    path.write_bytes(b"\x00" * 128 + b"DICM" + buffer.getvalue() + dataset_bytes)
    return path


def _send_raw(port: int, path: Path, syntax: str = ExplicitVRLittleEndian) -> int:
    """Send the file's dataset bytes as they are, undecoded (pynetdicom's chunked send)."""
    ae = AE(ae_title="SCU")
    ae.add_requested_context(ComputedRadiographyImageStorage, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADVLM")
    assert assoc.is_established
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()
    return int(status.Status)


def test_bad_datasets_get_their_status_and_lose_nothing(database_url, start_node, tmp_path, caplog):
    running = start_node(database_url)
    # first, a good instance that must survive everything below
    assert storescu(running.port, radiograph("RG1_UNCI.dcm")).returncode == 0

    source = pydicom.dcmread(radiograph("RG1_UNCI.dcm"))
    with caplog.at_level(logging.ERROR, logger="dicom_node.handlers"):
        # not DICOM at all
        garbage = _cr_file(tmp_path / "garbage.dcm", b"this is a JPEG, not a dataset" * 100, generate_uid())
        assert _send_raw(running.port, garbage) == 0xC210
        # a dataset cut in the middle of its pixel data
        ds = pydicom.dcmread(radiograph("RG1_UNCI.dcm"))
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        full = tmp_path / "full.dcm"
        ds.save_as(full, enforce_file_format=True)
        cut = tmp_path / "cut.dcm"
        cut.write_bytes(full.read_bytes()[:-100_000])
        assert _send_raw(running.port, cut) == 0xC212
        # a dataset whose SOP Instance UID differs from the one in the command
        mismatch = _cr_file(tmp_path / "mismatch.dcm", encode(ds, False, True), generate_uid())
        assert _send_raw(running.port, mismatch) == 0xA900
    assert "cannot decode the dataset" in caplog.text
    assert "pixel data truncated" in caplog.text
    assert "differ from the request's" in caplog.text

    with running.sessions() as session:
        uids = set(session.scalars(select(Instance.sop_instance_uid)))
    assert uids == {source.SOPInstanceUID}
    assert len(list(running.store.root.rglob("*.dcm"))) == 1
    assert not list(running.store.root.rglob("*.part"))
    assert _complete(running, RG1_STUDY).state is StudyState.ready


def test_associations_beyond_the_limit_are_rejected_until_one_ends(sqlite_url, start_node):
    """node.max_associations = 2: a third caller is rejected (transient, local limit exceeded, so a PACS
    retries later) while two are open, and accepted once one of them has ended."""
    running = start_node(sqlite_url, max_associations=2)

    def associate() -> Association:
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(Verification)
        return ae.associate("127.0.0.1", running.port, ae_title="RADVLM")

    first, second = associate(), associate()
    assert first.is_established and second.is_established
    third = associate()
    assert third.is_rejected
    assert (third.acceptor.primitive.result, third.acceptor.primitive.result_source,
            third.acceptor.primitive.diagnostic) == (0x02, 0x03, 0x02)
    first.release()
    fourth = wait_for(lambda: (a := associate()).is_established and a, 10)
    assert fourth.send_c_echo().Status == 0
    fourth.release()
    second.release()


def test_disk_below_reserve_refuses_with_out_of_resources(sqlite_url, start_node, caplog):
    running = start_node(sqlite_url, disk_reserve_mb=1 << 40)  # more than any disk has
    with caplog.at_level(logging.ERROR, logger="dicom_node.handlers"):
        result = storescu(running.port, radiograph("RG1_UNCI.dcm"))
    assert "0xa700" in (result.stdout + result.stderr).lower() or result.returncode != 0
    assert "disk space below the reserve" in (result.stdout + result.stderr) or "reserve is" in caplog.text
    assert "reserve is" in caplog.text
    assert _study(running, RG1_STUDY) is None
    assert not list(running.store.root.rglob("*.dcm"))


def test_restart_mid_study_completes_exactly_once(database_url, start_node, tmp_path):
    storage = tmp_path / "shared-storage"
    first = start_node(database_url, storage=storage, stable_age_s=3.0)
    assert storescu(first.port, radiograph("RG1_UNCI.dcm")).returncode == 0
    first.node.stop()  # the node goes down before the stable age has passed
    assert _study(first, RG1_STUDY).state is StudyState.receiving

    second = start_node(database_url, storage=storage, stable_age_s=3.0)
    study = _complete(second, RG1_STUDY)
    assert study.state is StudyState.ready
    wait_for(lambda: second.ready, 5)
    assert second.ready == [(study.id, 1)] and first.ready == []

    # a third start dispatches nothing again
    second.node.stop()
    third = start_node(database_url, storage=storage, stable_age_s=3.0)
    third.node.monitor.run_once()
    assert third.ready == []
    with third.sessions() as session:
        assert session.scalar(select(func.count()).select_from(StudyVersion)) == 1


def test_instance_after_completion_reopens_as_new_version(database_url, start_node, tmp_path):
    running = start_node(database_url)
    assert storescu(running.port, radiograph("RG1_UNCI.dcm")).returncode == 0
    first = _complete(running, RG1_STUDY)
    wait_for(lambda: running.ready, 5)

    late_path = rg1_copy(tmp_path, ViewPosition="LL")
    late = pydicom.dcmread(late_path, stop_before_pixels=True)
    assert storescu(running.port, late_path).returncode == 0

    wait_for(lambda: len(running.ready) == 2, 15)
    study = _study(running, RG1_STUDY)
    assert study.version == 2 and study.state is StudyState.ready
    assert [v.version for v in study.versions] == [1, 2]
    assert running.ready == [(first.id, 1), (first.id, 2)]
    lateral = next(i for i in study.instances if i.sop_instance_uid == late.SOPInstanceUID)
    assert lateral.study_version == 2 and lateral.selected is False
    assert lateral.selection_reason == "lateral: ViewPosition LL"


def test_bulk_read_returns_whole_pdus_and_what_arrived_when_the_peer_closes():
    ours, peer = socket.socketpair()
    sock = BulkReadSocket(Association(AE(), "acceptor"), client_socket=ours)
    payload = os.urandom(3 * READ_BYTES + 123)  # several reads, more than a socket buffer holds
    sender = threading.Thread(target=lambda: (peer.sendall(payload), peer.close()))
    sender.start()
    try:
        assert sock.recv(len(payload) - 100) == payload[:-100]
        assert sock.recv(1000) == payload[-100:]  # fewer than asked: the peer closed
    finally:
        sender.join()
        ours.close()


def test_the_node_reads_with_the_bulk_socket(sqlite_url, start_node):
    running = start_node(sqlite_url)
    ae = AE(ae_title="BULK")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", running.port, ae_title=running.node.settings.ae_title)
    assert assoc.is_established
    try:
        [acceptor] = [a for a in running.node.ae.active_associations if a.is_acceptor]
        assert type(acceptor.dul.socket) is BulkReadSocket
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_a_spooled_dataset_is_whole_once_finished(tmp_path):
    payload = [os.urandom(size) for size in (128, spool.WRITEBACK_BYTES + 5, 3 * spool.WRITEBACK_BYTES, 7)]
    spooled = spool.SpoolFile(folder=tmp_path, writeback=True, delete=False, mode="wb", suffix=".dcm")
    for fragment in payload:
        spooled.write(fragment)
        spooled.file.flush()
    spool.finish(spooled.name)
    assert Path(spooled.name).read_bytes() == b"".join(payload)
    spooled.close()  # after finish: nothing more happens, nothing raised


def test_a_dataset_abandoned_mid_transfer_leaves_no_file(tmp_path):
    spooled = spool.SpoolFile(folder=tmp_path, delete=False, mode="wb", suffix=".dcm")
    spooled.write(b"\x00" * 1000)
    name, writer = spooled.name, spooled._writer
    del spooled  # the association ended before its handler: pynetdicom drops the message
    writer.join(timeout=5)
    assert not writer.is_alive()
    assert not Path(name).exists()


def test_the_node_spools_incoming_datasets(sqlite_url, start_node):
    from pynetdicom import dimse_messages

    running = start_node(sqlite_url, fsync=True)
    assert dimse_messages.NamedTemporaryFile.func is spool.SpoolFile
    assert dimse_messages.NamedTemporaryFile.keywords == {"folder": running.store.root / INCOMING,
                                                         "writeback": True}
    assert storescu(running.port, radiograph("RG1_UNCI.dcm")).returncode == 0
    assert list((running.store.root / INCOMING).iterdir()) == []  # moved into the study tree
    [stored] = running.store.root.rglob("*.dcm")
    assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(radiograph("RG1_UNCI.dcm")).PixelData


def test_leftovers_of_a_stopped_node_are_removed_and_live_files_kept(tmp_path):
    old, fresh = tmp_path / "old.dcm", tmp_path / "fresh.dcm"
    for path in (old, fresh):
        path.write_bytes(b"\x00" * 10)
    now = datetime.now(timezone.utc)
    os.utime(old, ((now - timedelta(hours=2)).timestamp(),) * 2)
    assert spool.remove_leftovers(tmp_path, timedelta(hours=1), now) == 1
    assert not old.exists() and fresh.exists()


def test_a_write_error_reaches_the_handler(tmp_path):
    """A file-size limit (EFBIG, as a full disk gives ENOSPC) hit on the writer thread is raised by
    finish(); run in a child process so that the limit binds nothing else."""
    script = f"""
import errno, resource, signal
from pathlib import Path
from dicom_node import spool
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
spooled = spool.SpoolFile(folder=Path({str(tmp_path)!r}), suffix=".dcm")
for _ in range(4):
    spooled.write(b"\\0" * (512 << 10))
try:
    spooled.finish()
except OSError as exc:
    print("raised", errno.errorcode[exc.errno])
spooled.close()
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "raised EFBIG"


def test_deflated_chest_is_stored_and_decodes_like_uncompressed(sqlite_url, start_node, tmp_path):
    """Deflated Explicit VR Little Endian, as DCMTK storescu -xd sends it: stored, selected, same pixels."""
    running = start_node(sqlite_url)
    ds = pydicom.dcmread(radiograph("RG1_UNCI.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["deflated RG1"])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["deflated RG1 study"])
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = tmp_path / "deflated.dcm"
    ds.save_as(deflated, enforce_file_format=True)
    assert deflated.stat().st_size < len(ds.PixelData)  # the file is smaller than its inflated pixel data
    result = storescu(running.port, deflated, extra=("-xd",))
    assert result.returncode == 0 and "Status" not in result.stderr, result.stderr

    study = _complete(running, ds.StudyInstanceUID)
    assert study.state is StudyState.ready
    [instance] = study.instances
    assert instance.transfer_syntax_uid == DeflatedExplicitVRLittleEndian and instance.pixel_error is None
    stored = read_model_image(running.store.path(instance.path))
    assert np.array_equal(stored.pixels, read_model_image(radiograph("RG1_UNCI.dcm")).pixels)


def test_a_deflated_file_that_inflates_past_the_limit_is_refused_unread(sqlite_url, start_node, tmp_path, caplog):
    """A few hundred kilobytes of deflated zeros that would inflate to 288 MB: refused (A700) from a count of the
    inflated bytes, never inflated whole."""
    running = start_node(sqlite_url)
    ds = pydicom.dcmread(radiograph("RG1_UNCI.dcm"), stop_before_pixels=True)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["deflate bomb"])
    ds.Rows, ds.Columns = 12000, 12000
    ds.PixelData = bytes(ds.Rows * ds.Columns * 2)
    ds["PixelData"].VR = "OW"
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    bomb = tmp_path / "bomb.dcm"
    ds.save_as(bomb, enforce_file_format=True)
    del ds
    assert bomb.stat().st_size < 1 << 20
    with caplog.at_level(logging.ERROR, logger="reception.receiver"):
        assert _send_raw(running.port, bomb, DeflatedExplicitVRLittleEndian) == 0xA700
    assert "inflates to more than" in caplog.text
    with running.sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == 0


def test_an_image_claiming_gigapixels_is_skipped_from_its_header_at_completion(sqlite_url, start_node, tmp_path):
    """3 KB of RLE whose header claims 65535 x 65535: stored as received (a valid object), then skipped at
    completion with the reason, before anything is decoded (pydicom alone needs ~8 GiB to fail on it)."""
    running = start_node(sqlite_url)
    ds = pydicom.dcmread(radiograph("RG1_UNCI.dcm"), stop_before_pixels=True)
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["gigapixel study"])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["gigapixel"])
    ds.Rows = ds.Columns = 65535
    ds.PixelData = encapsulate([bytes(64) + bytes(3000)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    path = tmp_path / "gigapixel.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 8 * 1024
    assert _send_raw(running.port, path, RLELossless) == 0x0000

    study = _complete(running, ds.StudyInstanceUID)
    assert study.state is StudyState.nothing_to_analyse
    [instance] = study.instances
    assert instance.selected is False and instance.pixel_error is None
    assert instance.selection_reason.startswith("image too large: 65535 x 65535 x 1 frame(s)")
    assert "above the limit of 100 (node.max_image_megapixels)" in instance.selection_reason
