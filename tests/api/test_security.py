"""Who gets in: DICOM TLS on the node (client certificates optional or required) and HTTPS on the API."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess

import httpx
import pytest
from sqlalchemy import select

from records.settings import Destination, NodeTLS
from records.tables import Instance, Study
from testbed.dcmtk import storescu
from testbed.network import free_port, listening, wait_for
from testbed.processes import ENTRY, service
from testbed.radiographs import RG1_STUDY, radiograph
from worker.delivery.dimse import c_store

RG1 = radiograph("RG1_UNCI.dcm")


def _tls(pki, **overrides) -> NodeTLS:  # type: ignore[no-untyped-def]
    return NodeTLS(port=0, cert_file=pki.server_cert, key_file=pki.server_key, ca_file=pki.ca, **overrides)


def _stored(running) -> list[str]:  # type: ignore[no-untyped-def]
    with running.sessions() as session:
        return list(session.scalars(select(Study.study_instance_uid).join(Instance)))


def test_dicom_tls_with_client_certificates_required(sqlite_url, start_node, pki, caplog):
    running = start_node(sqlite_url, tls=_tls(pki, require_client_cert=True, plain_listener=False))
    with pytest.raises(RuntimeError, match="no plain listener"):
        running.node.port
    port = running.node.tls_port
    # DCMTK with a certificate the hospital CA signed: stored, while a silent client holds a connection open
    # (the handshake runs in each association's thread, never in the accept loop)
    with socket.create_connection(("127.0.0.1", port)):
        signed = storescu(port, RG1, extra=("+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)))
    assert signed.returncode == 0, signed.stderr
    # our own SCU (the delivery path), verifying the node's certificate and presenting the client's
    node_as_destination = Destination(name="node", ae_title="RADVLM", host="127.0.0.1", port=port, tls=True,
                                      tls_ca_file=pki.ca, tls_cert_file=pki.client_cert,
                                      tls_key_file=pki.client_key)
    again = c_store(RG1.read_bytes(), node_as_destination, "STORESCU", 10)
    assert again.delivered, again.detail
    # refused: no certificate, a stranger's certificate, no TLS at all
    for extra in (("+tla", "+cf", str(pki.ca)),
                  ("+tls", str(pki.stranger_key), str(pki.stranger_cert), "+cf", str(pki.ca)), ()):
        refused = storescu(port, RG1, extra=extra)
        assert refused.returncode != 0, extra
    no_cert = c_store(RG1.read_bytes(), node_as_destination.model_copy(update={"tls_cert_file": None}), "X", 5)
    assert not no_cert.delivered and no_cert.retry
    # our SCU refuses a node whose certificate the CA bundle does not vouch for
    distrusted = node_as_destination.model_copy(update={"tls_ca_file": pki.stranger_cert})
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in caplog.text  # the node logs why it refused
    caplog.clear()
    assert not c_store(RG1.read_bytes(), distrusted, "STORESCU", 5).delivered
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text  # and so does our SCU
    assert _stored(running) == [RG1_STUDY]


def test_dicom_tls_beside_the_plain_port_with_optional_client_certificates(sqlite_url, start_node, pki):
    running = start_node(sqlite_url, tls=_tls(pki))
    anonymous = storescu(running.node.tls_port, RG1, extra=("+tla", "+cf", str(pki.ca)))
    assert anonymous.returncode == 0, anonymous.stderr
    assert storescu(running.port, radiograph("RG3_UNCI.dcm")).returncode == 0
    assert len(_stored(running)) == 2


def test_client_certificates_without_a_ca_are_a_settings_error(pki):
    with pytest.raises(ValueError, match="needs node.tls.ca_file"):
        NodeTLS(cert_file=pki.server_cert, key_file=pki.server_key, require_client_cert=True)


def test_api_over_https_and_its_health_check(pki, tmp_path):
    port = free_port()
    env = {"RADVLM_DATA_DIR": str(tmp_path / "data"), "RADVLM_API__PORT": str(port),
           "RADVLM_API__TLS_CERT_FILE": str(pki.server_cert), "RADVLM_API__TLS_KEY_FILE": str(pki.server_key)}
    with service("api", ["api"], env, tmp_path / "logs"):
        wait_for(lambda: listening(port), 60)
        trusted = ssl.create_default_context(cafile=pki.ca)
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=trusted) as client:
            health = client.get("/health")
            assert health.json() == {"status": "ok"}
            assert health.headers["strict-transport-security"] == "max-age=31536000"
            assert client.get("/studies").status_code == 401
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the HTTPS port gets no answer
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        health = subprocess.run([*ENTRY, "health", "api"], env={**os.environ, **env}, capture_output=True, text=True)
        assert health.returncode == 0, health.stderr
