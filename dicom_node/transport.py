"""The node's association server: pynetdicom's, with a socket that reads a PDU in large pieces.

pynetdicom's ``AssociationSocket.recv`` reads 4 KiB per call and appends each piece to a growing
buffer: 2,048 Python-level calls for one 8 MiB image, which made reading the socket, not the network,
the limit of a C-STORE (see benchmarks/ingest.py). Reading into one buffer of the PDU's size, up to
1 MiB per call, takes the same bytes at a fraction of the cost. Everything else is pynetdicom's:
the server is ``AE.start_server``'s, given this module's request handler.
"""

from __future__ import annotations

import ssl

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

READ_BYTES = 1 << 20  # the most one recv call asks for


class BulkReadSocket(AssociationSocket):
    """An ``AssociationSocket`` whose ``recv`` fills one buffer of the requested size."""

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (blocking), or fewer when the peer closes the connection: pynetdicom's contract."""
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        received = 0
        while received < nr_bytes:
            count = self.socket.recv_into(view[received:], min(nr_bytes - received, READ_BYTES))  # type: ignore[union-attr]
            if not count:
                del view
                del buffer[received:]
                break
            received += count
        return buffer


class BulkReadRequestHandler(RequestHandler):
    """pynetdicom's request handler, whose associations read with ``BulkReadSocket``."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # pynetdicom has made the association's socket and queued its "connection open" event (a second
        # socket would queue another): only the read method changes, so the object takes the subclass.
        assoc.dul.socket.__class__ = BulkReadSocket
        return assoc


def serve(ae: AE, address: tuple[str, int], handlers: list, ssl_context: ssl.SSLContext | None = None,  # type: ignore[type-arg]
          ) -> ThreadedAssociationServer:
    """Start ``ae``'s association server on ``address`` in its own thread; ``shutdown()`` stops it."""
    server = ae.start_server(address, block=False, evt_handlers=handlers, ssl_context=ssl_context)
    # socketserver makes each connection's handler from this attribute; a connection accepted before
    # the line below (none, at start) would read with pynetdicom's own socket, only more slowly
    server.RequestHandlerClass = BulkReadRequestHandler
    return server
