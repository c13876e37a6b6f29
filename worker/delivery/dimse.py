"""C-STORE of one stored object to one destination, and what its answer means for the outbox."""

from __future__ import annotations

import io
import ssl
from collections.abc import Sequence

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, Association
from pynetdicom.sop_class import Verification
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from records.settings import Destination
from worker.delivery.attempt import Attempt


def _tls(destination: Destination) -> tuple[ssl.SSLContext, str] | None:
    if not destination.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=destination.tls_ca_file)
    if destination.tls_cert_file:
        context.load_cert_chain(destination.tls_cert_file, destination.tls_key_file)
    return context, destination.host


def _associate(calling_ae: str, timeout_s: float, abstract_syntax: str, transfer_syntaxes: Sequence[str], host: str,
               port: int, called_ae: str, tls: tuple[ssl.SSLContext, str] | None) -> Association | Attempt:
    """An established association proposing one presentation context, or the Attempt saying why not
    (all of them worth retrying: the peer may come back or be reconfigured)."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(abstract_syntax, list(transfer_syntaxes))
    try:
        assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls)
    except (OSError, ssl.SSLError) as exc:
        return Attempt(False, True, f"cannot connect: {exc}")
    if assoc.is_rejected:
        return Attempt(False, True, "association rejected (check AE titles and the peer's allow-list)")
    if not assoc.is_established:
        return Attempt(False, True, "no association: peer down, unreachable or aborted")
    return assoc


def c_echo(host: str, port: int, called_ae: str, calling_ae: str, timeout_s: float,
           tls: tuple[ssl.SSLContext, str] | None = None) -> Attempt:
    """Verification: does the peer accept an association from us and answer C-ECHO?"""
    assoc = _associate(calling_ae, timeout_s, Verification, DEFAULT_TRANSFER_SYNTAXES, host, port, called_ae, tls)
    if isinstance(assoc, Attempt):
        return assoc
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in status:
        return Attempt(False, True, "no C-ECHO response")
    return Attempt(int(status.Status) == 0, True, f"C-ECHO status 0x{int(status.Status):04X}")


def echo_destination(destination: Destination, calling_ae: str, timeout_s: float) -> Attempt:
    """C-ECHO to a configured destination, over TLS if it has it: ``config check`` and ``health`` ask this."""
    return c_echo(destination.host, destination.port, destination.ae_title, calling_ae, timeout_s,
                  _tls(destination))


def c_store(payload: bytes, destination: Destination, calling_ae: str, timeout_s: float) -> Attempt:
    """Send one Part 10 object. Refusals of the object itself are final; anything else is retried."""
    ds = dcmread(io.BytesIO(payload))
    assoc = _associate(calling_ae, timeout_s, ds.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                       destination.host, destination.port, destination.ae_title, _tls(destination))
    if isinstance(assoc, Attempt):
        return assoc
    try:
        if not assoc.accepted_contexts:
            return Attempt(False, False, f"peer does not accept {ds.SOPClassUID.name}")
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    if "Status" not in status:
        return Attempt(False, True, "no C-STORE response")
    code = int(status.Status)
    comment = str(status.get("ErrorComment", "") or "")
    if code_to_category(code) in (STATUS_SUCCESS, STATUS_WARNING):  # stored (a warning: 0001, 0107, 0116, Bxxx)
        return Attempt(True, False, f"stored (status 0x{code:04X})")
    transient = 0xA700 <= code <= 0xA7FF  # out of resources: it may have room later
    return Attempt(False, transient, f"refused with status 0x{code:04X} {comment}".strip())
