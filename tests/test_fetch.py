"""fetch.py: a real download over HTTP (a server on 127.0.0.1 serving a copy of the release's files),
checked by sha256; a damaged file or an unreachable server is one line and writes nothing."""
import functools
import hashlib
import http.server
import json
import shutil
import subprocess
import sys
import threading

import pytest

import data
from extras import fetch
from conftest import FLAN, ROOT, needs_flan

SET2_CATEGORIES = ["common_sense", "entailment", "open_domain_qa", "paraphrase", "reading_comprehension",
                   "sentiment", "summarization", "text_formatting"]


@pytest.fixture
def served(tmp_path):
    """(base URL, the served folder of set 1): the release's layout, data/dataset1/..., on 127.0.0.1."""
    root = tmp_path / "www"
    shutil.copytree(FLAN, root / "data" / "dataset1")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", root / "data" / "dataset1"
    server.shutdown()
    server.server_close()


@needs_flan
def test_fetch_downloads_and_checks_every_file(served, tmp_path, capsys):
    url, _ = served
    assert fetch.main([str(tmp_path / "flan"), "--base-url", url]) == 0
    for name in fetch.SETS[1][1]:
        assert (tmp_path / "flan" / name).read_bytes() == (FLAN / name).read_bytes()
    assert [len(c) for c in data.load_federated(tmp_path / "flan").clients] == [300] * 8
    assert capsys.readouterr().out.count("\n") == 1


@needs_flan
def test_a_damaged_file_is_one_line_and_nothing_is_written(served, tmp_path):
    url, root = served
    path = root / "8" / "local_training_5.json"
    path.write_bytes(path.read_bytes().replace(b"the", b"teh", 1))
    r = subprocess.run([sys.executable, "-m", "extras.fetch", str(tmp_path / "flan"), "--base-url", url], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert "local_training_5.json: sha256" in r.stderr and "nothing written" in r.stderr
    assert list(tmp_path.iterdir()) == [root.parent.parent]  # no flan folder, no temporary one


def test_an_unreachable_server_or_a_used_folder_is_one_line(tmp_path, capsys):
    assert fetch.main([str(tmp_path / "flan"), "--base-url", "http://127.0.0.1:9/"]) == 2
    assert "cannot download" in capsys.readouterr().err and not (tmp_path / "flan").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    assert fetch.main([str(tmp_path / "used")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not an empty folder" in err


def test_fetch_set_2_over_http_on_a_release_made_here(tmp_path, monkeypatch, capsys):
    """Data set 2, of which neither CI nor the shared folder holds a copy: the same download, checks and
    layout on a small release in data set 2's file names written here, its pins those files' sha256
    (the real pins were computed from the release commit's blobs); one byte changed is refused with
    nothing written."""
    www = tmp_path / "www" / fetch.SETS[2][0]
    pins = {}
    for name in fetch.SETS[2][1]:
        path = www / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".jsonl"):
            body = "".join(json.dumps({"instruction": f"q{i}", "output": "a", "category": f"t{i}"}) + "\n" for i in range(8))
        else:
            i = int(name.rsplit("_", 1)[1].split(".")[0])
            body = json.dumps([{"instruction": f"x{i} {j}", "output": "y", "category": f"t{i}"} for j in range(3)])
        path.write_text(body)
        pins[name] = hashlib.sha256(body.encode()).hexdigest()
    monkeypatch.setitem(fetch.SETS, 2, (fetch.SETS[2][0], pins))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        assert fetch.main([str(tmp_path / "got"), "--set", "2", "--base-url", url]) == 0
        fd = data.load_federated(tmp_path / "got")
        assert [len(c) for c in fd.clients] == [3] * 8 and len(fd.tests) == 8
        assert "FLAN data set 2" in capsys.readouterr().out
        (www / name).write_text(body.replace("t", "T", 1))  # the last file, damaged
        assert fetch.main([str(tmp_path / "again"), "--set", "2", "--base-url", url]) == 2
        assert "sha256" in capsys.readouterr().err and not (tmp_path / "again").exists()
    finally:
        server.shutdown()
        server.server_close()
