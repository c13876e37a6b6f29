"""HL7 v2 to the RIS over MLLP: one message, its ACK read and judged."""

from __future__ import annotations

import socket

from hl7apy.parser import parse_message

from results.hl7 import END, START
from worker.delivery.attempt import Attempt


def mllp_send(payload: bytes, host: str, port: int, timeout_s: float) -> Attempt:
    """Send one framed message and read the ACK: AA/CA delivered, AR/CR refused, AE/CE retried."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            conn.sendall(START + payload + END)
            answer = b""
            while not answer.endswith(END):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                answer += chunk
    except OSError as exc:
        return Attempt(False, True, f"MLLP {host}:{port}: {exc}")
    if not answer.endswith(END):
        return Attempt(False, True, "MLLP connection closed before a complete ACK")
    try:
        ack = parse_message(answer.strip(START + END).decode(), find_groups=False)
        code = ack.msa.msa_1.value
    except Exception as exc:  # an unreadable ACK: the message may or may not have been taken
        return Attempt(False, True, f"unreadable ACK: {exc}")
    if code in ("AA", "CA"):
        return Attempt(True, False, f"acknowledged {code}")
    return Attempt(False, code in ("AE", "CE"), f"ACK {code}: {ack.msa.msa_3.value if ack.msa.msa_3 else ''}")


def mllp_reachable(host: str, port: int, timeout_s: float) -> Attempt:
    """Does the RIS listen? A connection opened and closed, no message: nothing reaches the RIS's queue."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return Attempt(True, False, f"MLLP {host}:{port} accepts connections")
    except OSError as exc:
        return Attempt(False, True, f"MLLP {host}:{port}: {exc}")
