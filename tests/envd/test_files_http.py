"""/files edge cases over raw HTTP (httpx), beyond what the SDK sends."""

from __future__ import annotations

import gzip
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import EnvdProcess

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def tmp_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="wrenn-files-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def http(envd: EnvdProcess) -> Iterator[httpx.Client]:
    # httpx asks for "gzip, deflate" by default; tests that want a coding say so.
    with httpx.Client(base_url=envd.url, timeout=30) as client:
        yield client


def assert_error(response: httpx.Response, status: int, code: str, text: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code
    assert text in body["message"]


# -- upload --------------------------------------------------------------------------------


def test_octet_stream_needs_a_path(http: httpx.Client) -> None:
    r = http.post("/files", content=b"x", headers={"Content-Type": "application/octet-stream"})
    assert_error(r, 400, "invalid_argument", "path query parameter is required")


def test_unsupported_content_type(http: httpx.Client, tmp_dir: Path) -> None:
    r = http.post(
        "/files",
        params={"path": str(tmp_dir / "t")},
        content=b"x",
        headers={"Content-Type": "text/plain"},
    )
    assert_error(r, 400, "invalid_argument", "unsupported content type")
    assert not (tmp_dir / "t").exists()


def test_octet_stream_upload_response(http: httpx.Client, tmp_dir: Path) -> None:
    path = tmp_dir / "raw" / "r.bin"
    r = http.post(
        "/files",
        params={"path": str(path)},
        content=b"\x00raw",
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 200
    assert r.json() == [{"name": "r.bin", "type": "file", "path": str(path)}]
    assert path.read_bytes() == b"\x00raw"


def test_multipart_without_boundary(http: httpx.Client, tmp_dir: Path) -> None:
    r = http.post(
        "/files",
        params={"path": str(tmp_dir / "m")},
        content=b"--x\r\n",
        headers={"Content-Type": "multipart/form-data"},
    )
    assert_error(r, 400, "invalid_argument", "boundary")


def _multipart(*parts: tuple[str, str | None, bytes], boundary: str = "B0UND") -> bytes:
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        body += (
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        body += data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


MULTIPART = {"Content-Type": "multipart/form-data; boundary=B0UND"}


def test_multipart_paths_come_from_filenames(http: httpx.Client, tmp_dir: Path) -> None:
    body = _multipart(
        ("file", str(tmp_dir / "one.txt"), b"1"),
        ("other", None, b"ignored form field"),
        ("file", str(tmp_dir / "deep" / "two.txt"), b"2" * 100_000),
    )
    r = http.post("/files", content=body, headers=MULTIPART)
    assert r.status_code == 200, r.text
    assert [e["path"] for e in r.json()] == [
        str(tmp_dir / "one.txt"),
        str(tmp_dir / "deep" / "two.txt"),
    ]
    assert (tmp_dir / "one.txt").read_bytes() == b"1"
    assert (tmp_dir / "deep" / "two.txt").read_bytes() == b"2" * 100_000


def test_multipart_path_parameter_wins(http: httpx.Client, tmp_dir: Path) -> None:
    body = _multipart(("file", "ignored-name.txt", b"p"))
    r = http.post(
        "/files", params={"path": str(tmp_dir / "p.txt")}, content=body, headers=MULTIPART
    )
    assert r.status_code == 200
    assert r.json()[0]["path"] == str(tmp_dir / "p.txt")
    assert (tmp_dir / "p.txt").read_bytes() == b"p"


def test_multipart_part_without_destination(http: httpx.Client) -> None:
    r = http.post("/files", content=_multipart(("file", None, b"x")), headers=MULTIPART)
    assert_error(r, 400, "invalid_argument", "destination")


def test_multipart_same_path_twice(http: httpx.Client, tmp_dir: Path) -> None:
    body = _multipart(("file", str(tmp_dir / "d"), b"1"), ("file", str(tmp_dir / "d"), b"2"))
    r = http.post("/files", content=body, headers=MULTIPART)
    assert_error(r, 400, "invalid_argument", "multiple files to the same path")
    assert (tmp_dir / "d").read_bytes() == b"1"


def test_truncated_multipart_leaves_no_file(http: httpx.Client, tmp_dir: Path) -> None:
    body = _multipart(("file", str(tmp_dir / "cut.bin"), b"c" * 50_000))
    r = http.post("/files", content=body[:-30], headers=MULTIPART)
    assert_error(r, 400, "invalid_argument", "closing boundary")
    assert not (tmp_dir / "cut.bin").exists()


def test_malformed_multipart(http: httpx.Client, tmp_dir: Path) -> None:
    r = http.post("/files", content=b"this is not multipart at all", headers=MULTIPART)
    assert_error(r, 400, "invalid_argument", "multipart")


def test_gzip_request_bodies(http: httpx.Client, tmp_dir: Path) -> None:
    data = os.urandom(300_000) + b"tail" * 10_000
    r = http.post(
        "/files",
        params={"path": str(tmp_dir / "g.bin")},
        content=gzip.compress(data),
        headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
    )
    assert r.status_code == 200, r.text
    assert (tmp_dir / "g.bin").read_bytes() == data
    body = _multipart(("file", str(tmp_dir / "gm.bin"), data))
    r = http.post(
        "/files", content=gzip.compress(body), headers={**MULTIPART, "Content-Encoding": "gzip"}
    )
    assert r.status_code == 200, r.text
    assert (tmp_dir / "gm.bin").read_bytes() == data
    # several gzip members, as concatenated streams
    r = http.post(
        "/files",
        params={"path": str(tmp_dir / "two-members")},
        content=gzip.compress(b"first ") + gzip.compress(b"second"),
        headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
    )
    assert r.status_code == 200
    assert (tmp_dir / "two-members").read_bytes() == b"first second"


def test_bad_request_encodings(http: httpx.Client, tmp_dir: Path) -> None:
    octet = {"Content-Type": "application/octet-stream"}
    r = http.post(
        "/files",
        params={"path": str(tmp_dir / "bad.gz")},
        content=b"definitely not gzip",
        headers={**octet, "Content-Encoding": "gzip"},
    )
    assert_error(r, 400, "invalid_argument", "gzip")
    assert not (tmp_dir / "bad.gz").exists()
    r = http.post(
        "/files",
        params={"path": str(tmp_dir / "cut.gz")},
        content=gzip.compress(os.urandom(10_000))[:-100],
        headers={**octet, "Content-Encoding": "gzip"},
    )
    assert_error(r, 400, "invalid_argument", "gzip")
    assert not (tmp_dir / "cut.gz").exists()
    r = http.post(
        "/files",
        params={"path": str(tmp_dir / "br")},
        content=b"x",
        headers={**octet, "Content-Encoding": "br"},
    )
    assert_error(r, 400, "invalid_argument", "unsupported Content-Encoding")


def test_upload_metadata_headers(http: httpx.Client, tmp_dir: Path) -> None:
    path = tmp_dir / "meta.bin"
    r = http.post(
        "/files",
        params={"path": str(path)},
        content=b"m",
        headers={"Content-Type": "application/octet-stream", "X-Metadata-Build": "42"},
    )
    assert r.status_code == 200
    assert r.json()[0]["metadata"] == {"build": "42"}
    assert os.getxattr(path, "user.build") == b"42"


def test_upload_as_user_via_query(http: httpx.Client, tmp_dir: Path) -> None:
    tmp_dir.chmod(0o777)
    path = tmp_dir / "by-nobody" / "n.txt"
    r = http.post(
        "/files",
        params={"path": str(path), "username": "nobody"},
        content=b"n",
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 200
    assert path.stat().st_uid == NOBODY.pw_uid
    assert path.parent.stat().st_uid == NOBODY.pw_uid
    tmp_dir.chmod(0o755)
    r = http.post(
        "/files",
        params={"path": str(tmp_dir / "denied.txt"), "username": "nobody"},
        content=b"n",
        headers={"Content-Type": "application/octet-stream"},
    )
    assert_error(r, 403, "permission_denied", str(tmp_dir / "denied.txt"))
    assert not (tmp_dir / "denied.txt").exists()


def test_unknown_username(http: httpx.Client, tmp_dir: Path) -> None:
    r = http.get("/files", params={"path": str(tmp_dir), "username": "no-such-user"})
    assert_error(r, 400, "invalid_argument", "no-such-user")


# -- download ------------------------------------------------------------------------------


def test_download_headers(http: httpx.Client, tmp_dir: Path) -> None:
    (tmp_dir / "a.txt").write_text("text")
    (tmp_dir / "b.json").write_text("{}")
    (tmp_dir / "c.unknownext").write_bytes(b"\x00")
    r = http.get("/files", params={"path": str(tmp_dir / "a.txt")})
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    assert r.headers["content-length"] == "4"
    assert "content-encoding" not in r.headers  # "gzip, deflate" is a library default
    assert r.content == b"text"
    r = http.get("/files", params={"path": str(tmp_dir / "b.json")})
    assert r.headers["content-type"] == "application/json"
    r = http.get("/files", params={"path": str(tmp_dir / "c.unknownext")})
    assert r.headers["content-type"] == "application/octet-stream"


def test_download_large_file(http: httpx.Client, tmp_dir: Path) -> None:
    data = os.urandom(20 << 20)
    (tmp_dir / "big").write_bytes(data)
    with http.stream(
        "GET", "/files", params={"path": str(tmp_dir / "big")}, headers={"Accept-Encoding": ""}
    ) as r:
        assert r.headers["content-length"] == str(len(data))
        assert b"".join(r.iter_raw()) == data


def test_download_gzip(http: httpx.Client, tmp_dir: Path) -> None:
    data = b"zip me " * 100_000
    (tmp_dir / "z.txt").write_bytes(data)
    for accept in ("gzip", "gzip;q=1.0, identity;q=0.5", "identity;q=0, *"):
        with http.stream(
            "GET",
            "/files",
            params={"path": str(tmp_dir / "z.txt")},
            headers={"Accept-Encoding": accept},
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-encoding"] == "gzip"
            assert "content-length" not in r.headers
            raw = b"".join(r.iter_raw())
        assert len(raw) < len(data)
        assert gzip.decompress(raw) == data
    r = http.get(
        "/files", params={"path": str(tmp_dir / "z.txt")}, headers={"Accept-Encoding": "identity"}
    )
    assert "content-encoding" not in r.headers
    r = http.get(
        "/files",
        params={"path": str(tmp_dir / "z.txt")},
        headers={"Accept-Encoding": "br, identity;q=0"},
    )
    assert_error(r, 400, "invalid_argument", "no acceptable encoding")


def test_download_errors(http: httpx.Client, tmp_dir: Path) -> None:
    r = http.get("/files", params={"path": str(tmp_dir / "missing")})
    assert_error(r, 404, "not_found", str(tmp_dir / "missing"))
    r = http.get("/files", params={"path": str(tmp_dir)})
    assert_error(r, 400, "invalid_argument", "is a directory")
    os.mkfifo(tmp_dir / "fifo")
    r = http.get("/files", params={"path": str(tmp_dir / "fifo")})
    assert_error(r, 400, "invalid_argument", "not a regular file")
