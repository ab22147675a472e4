"""A stand-in for Alibaba OSS's S3-compatible endpoint on 127.0.0.1, in front of moto's S3 server.

moto accepts what AWS S3 accepts. OSS refuses two things botocore does unless told otherwise, and so does this:
- a path-style request (`https://oss-cn-hangzhou.aliyuncs.com/BUCKET/KEY`): OSS serves a bucket only under its
  own host name, `BUCKET.oss-cn-hangzhou.aliyuncs.com` (403 SecondLevelDomainForbidden, "Please use virtual hosted
  style to access."; OSS documents it under "Compatibility with Amazon S3" and "HTTP 403 error codes");
- an `aws-chunked` body with a trailing checksum, what botocore >= 1.36 sends by default for PutObject and
  UploadPart over HTTPS (`x-amz-content-sha256: STREAMING-UNSIGNED-PAYLOAD-TRAILER`, `Content-Encoding:
  aws-chunked`, `x-amz-trailer`): 400 InvalidArgument, "aws-chunked encoding is not supported with the specified
  x-amz-content-sha256 value." (OSS's "Use AWS SDKs to access OSS" says to turn chunked encoding off).
Everything else is forwarded to moto as a plain path-style HTTP request, and moto's answer is sent back. For the
tests of push verification, `lose_uploads_of` makes it answer chosen uploads with success and store nothing: what
DVC #10643 met with ossfs (files reported pushed, never uploaded).

Why a proxy and a name: botocore addresses an IP endpoint path-style whatever it is told, and sends aws-chunked
trailing checksums only over HTTPS (over plain HTTP the checksum goes in a header). So the client must speak HTTPS
to a host name, as it does to OSS. The name is under `.test` (RFC 6761: never delegated) and is never resolved:
the client sends every request through HTTPS_PROXY, which is this server on 127.0.0.1; it reads the name from the
CONNECT line, refuses any other, and ends the tunnel's TLS with a certificate for `oss-cn-hangzhou.oss.test` and
`*.oss-cn-hangzhou.oss.test` from a test CA made here, which the client trusts through AWS_CA_BUNDLE.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import os
import socket
import ssl
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

from support.http_files import LoopbackServer

REGION = "cn-hangzhou"
ENDPOINT_HOST = f"oss-{REGION}.oss.test"
ENDPOINT = f"https://{ENDPOINT_HOST}"
# Request headers that belong to one connection, never forwarded (Host is rewritten for moto).
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "transfer-encoding",
               "upgrade", "expect", "host", "content-length"}  # fmt: skip
_CHUNK = 1 << 20


def make_test_ca(dest: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) as PEM files in `dest`: a CA made for this test run, and the
    endpoint's certificate (the endpoint and every bucket under it) signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ptune tests: OSS stand-in CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ENDPOINT_HOST)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(ENDPOINT_HOST), x509.DNSName(f"*.{ENDPOINT_HOST}")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    dest.mkdir(parents=True, exist_ok=True)
    paths = dest / "ca.pem", dest / "server.pem", dest / "server-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def _error_xml(code: str, message: str, host: str) -> bytes:
    """OSS's error body: Code, Message, RequestId, HostId (the Host the request named)."""
    request_id = os.urandom(12).hex().upper()
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error>\n'
        f"  <Code>{code}</Code>\n  <Message>{escape(message)}</Message>\n"
        f"  <RequestId>{request_id}</RequestId>\n  <HostId>{escape(host)}</HostId>\n</Error>\n"
    ).encode()


class OssStandIn(LoopbackServer):
    """The HTTPS proxy on 127.0.0.1 that plays OSS's endpoint, forwarding to the S3 server at `backend`.

    `requests` records each request the tunnels carried, `(method, host, path, answer)`, where answer is the
    status sent; `refused` the OSS error codes sent back, in order."""

    def __init__(self, backend: str, certs: Path):
        super().__init__(_Proxy)
        self.backend = urlsplit(backend)
        self.ca, cert, key = make_test_ca(certs)
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)
        self.requests: list[tuple[str, str, str, int]] = []
        self.refused: list[str] = []
        self.tunnels_refused: list[str] = []  # CONNECT targets other than the endpoint
        # Key endings whose uploads (PutObject) are answered 200 and dropped; `lost` lists the paths dropped.
        self.lose_uploads_of: set[str] = set()
        self.lost: list[str] = []

    @property
    def proxy(self) -> str:
        return self.origin

    def client_env(self) -> dict[str, str]:
        """What a client's environment needs to reach the endpoint through this proxy, and nothing else: every
        HTTPS request through it (NO_PROXY empty), trusting the test CA."""
        return {
            "HTTPS_PROXY": self.proxy,
            "https_proxy": self.proxy,
            "NO_PROXY": "",
            "no_proxy": "",
            "AWS_CA_BUNDLE": str(self.ca),
        }

    def record(self, method: str, host: str, path: str, status: int, refused: str = "", lost: bool = False) -> None:
        with self.lock:
            self.requests.append((method, host, path, status))
            if refused:
                self.refused.append(refused)
            if lost:
                self.lost.append(path)


class _Proxy(BaseHTTPRequestHandler):
    """The proxy's side: CONNECT to the endpoint or a bucket under it opens a TLS tunnel; nothing else is served."""

    server: OssStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_CONNECT(self) -> None:
        host, _, port = self.path.rpartition(":")
        host = host.lower()
        if port != "443" or not (host == ENDPOINT_HOST or host.endswith("." + ENDPOINT_HOST)):
            # Never resolved, never reached: the tests' only outside is the stand-in.
            with self.server.lock:
                self.server.tunnels_refused.append(self.path)
            self.send_error(403, f"the OSS stand-in tunnels only to {ENDPOINT_HOST}:443 and its buckets")
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self.close_connection = True
        try:
            tls = self.server.tls.wrap_socket(self.connection, server_side=True)
        except (ssl.SSLError, OSError):
            return  # the client refused the certificate: it says why
        try:
            _Oss(tls, self.client_address, self.server)  # serves the tunnel's requests until the client is done
        except (ssl.SSLError, OSError):
            pass
        finally:
            tls.close()

    def _not_a_tunnel(self) -> None:
        self.send_error(405, "the OSS stand-in is an HTTPS proxy: CONNECT only")

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _not_a_tunnel


class _Oss(BaseHTTPRequestHandler):
    """Inside a tunnel: OSS's rules, then moto."""

    server: OssStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        """The request's body, read whole whether it is refused or forwarded (a part is at most what the client
        puts in one request: s3fs's 50 MiB blocks), so that the connection stays usable for the next request."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # HTTP trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes | http.client.HTTPResponse) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if isinstance(body, bytes):
            self.wfile.write(body)
            return
        for chunk in iter(lambda: body.read(_CHUNK), b""):
            self.wfile.write(chunk)

    def _refuse(self, host: str, status: int, code: str, message: str) -> None:
        self.server.record(self.command, host, self.path, status, refused=code)
        body = _error_xml(code, message, host)
        headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
        self._send(status, [*headers, ("x-oss-request-id", os.urandom(12).hex().upper())], body)

    def _serve(self) -> None:
        host = self.headers.get("Host", "").split(":")[0].lower()
        body = self._body()
        bucket = host[: -len(ENDPOINT_HOST) - 1] if host.endswith("." + ENDPOINT_HOST) else None
        target = urlsplit(self.path)
        if bucket is None and not (host == ENDPOINT_HOST and target.path == "/" and self.command == "GET"):
            # Only ListBuckets (GetService) is served on the endpoint itself; a bucket is reached by its own name.
            self._refuse(host, 403, "SecondLevelDomainForbidden", "Please use virtual hosted style to access.")
            return
        content_sha = self.headers.get("x-amz-content-sha256", "")
        encodings = [e.strip().lower() for e in self.headers.get("Content-Encoding", "").split(",")]
        if content_sha.startswith("STREAMING-") or "aws-chunked" in encodings or "x-amz-trailer" in self.headers:
            self._refuse(
                host,
                400,
                "InvalidArgument",
                "aws-chunked encoding is not supported with the specified x-amz-content-sha256 value.",
            )
            return
        if self.command == "PUT" and any(target.path.endswith(k) for k in self.server.lose_uploads_of):
            # A remote that loses what it was sent (DVC #10643): the client hears success, nothing is stored.
            self.server.record(self.command, host, self.path, 200, lost=True)
            etag = f'"{hashlib.md5(body).hexdigest()}"'
            self._send(200, [("ETag", etag), ("Content-Length", "0")], b"")
            return
        path = f"/{bucket}{target.path}" if bucket else target.path
        if target.query:
            path += f"?{target.query}"
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Host"] = self.server.backend.netloc
        headers["Content-Length"] = str(len(body))
        moto = http.client.HTTPConnection(self.server.backend.hostname, self.server.backend.port, timeout=300)
        try:
            moto.request(self.command, path, body=body, headers=headers)
            answer = moto.getresponse()
            self.server.record(self.command, host, self.path, answer.status)
            # moto's headers as they are, but its Transfer-Encoding: the body goes on with a length or a close.
            out = [(k, v) for k, v in answer.getheaders() if k.lower() not in ("transfer-encoding", "connection")]
            if answer.getheader("Content-Length") is None and self.command != "HEAD":
                out.append(("Connection", "close"))
                self.close_connection = True
            self._send(answer.status, out, answer)
        finally:
            moto.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_s3(env: dict[str, str]):
    """moto's S3 server on a free 127.0.0.1 port, for the `with` block; yields its URL."""
    port = _free_port()
    proc = subprocess.Popen(
        ["moto_server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {url}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
