"""A RIS stand-in for tests: hl7apy's MLLPServer, a real MLLP listener in its own process.

Each ORU^R01 is parsed with hl7apy's strict validation, saved to FOLDER, and answered with an ACK
whose MSA-1 is ANSWER (AA accepts; AE and AR let the tests see retries and refusals).

    python -m testbed.hl7_listener PORT FOLDER [ANSWER]

``listener`` runs it for the length of a block, on a free port.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import count
from pathlib import Path

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.mllp import AbstractErrorHandler, AbstractHandler, MLLPServer
from hl7apy.parser import parse_message

from testbed.network import free_port, wait_for

NUMBERS = count(1)


def _ack(code: str, control_id: str, text: str = "") -> str:
    ack = Message("ACK", version="2.5.1")
    ack.msh.msh_3, ack.msh.msh_5 = "RIS", "RADVLM"
    ack.msh.msh_9 = "ACK^R01^ACK"
    ack.msh.msh_10 = f"ACK{next(NUMBERS)}"
    ack.msh.msh_11 = "P"
    ack.msa.msa_1 = code
    ack.msa.msa_2 = control_id
    if text:
        ack.msa.msa_3 = text[:80]
    return ack.to_mllp()


class SaveResult(AbstractHandler):
    def __init__(self, message: str, folder: Path, answer: str) -> None:
        super().__init__(message)
        self.folder, self.answer = folder, answer

    def reply(self) -> str:
        message = parse_message(self.incoming_message, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        message.validate()
        control_id = message.msh.msh_10.value
        (self.folder / f"{control_id}-{next(NUMBERS)}.hl7").write_text(self.incoming_message)
        return _ack(self.answer, control_id)


class Refuse(AbstractErrorHandler):
    def reply(self) -> str:
        return _ack("AE", "", f"{type(self.exc).__name__}: {self.exc}")


def main() -> None:
    port, folder = int(sys.argv[1]), Path(sys.argv[2])
    answer = sys.argv[3] if len(sys.argv) > 3 else "AA"
    folder.mkdir(parents=True, exist_ok=True)
    server = MLLPServer("127.0.0.1", port, {"ORU^R01^ORU_R01": (SaveResult, folder, answer), "ERR": (Refuse,)})
    server.serve_forever()


@contextmanager
def listener(tmp_path: Path, answer: str = "AA") -> Iterator[int]:
    """This listener in its own process, saving to ``tmp_path/ris`` and answering ``answer``: its port."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "testbed.hl7_listener", str(port), str(tmp_path / "ris"),
                                answer])
    try:
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 15)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


if __name__ == "__main__":
    main()
