"""The filesystem seam: local paths as they are, remote ones (object stores) through copies.

The remote branches are exercised on local directories by treating them as remote (an object
store cannot be reached from here); what they do with the files is the same."""

from etils import epath

from cacherl_jax import fs


def test_workdir_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fs.workdir_path("runs/a") == epath.Path(tmp_path / "runs" / "a")
    assert str(fs.workdir_path("gs://bucket/run")) == "gs://bucket/run"
    assert fs.is_remote("gs://bucket/x") and not fs.is_remote(tmp_path)


def test_append_text_appends_locally_and_rewrites_remotely(tmp_path, monkeypatch):
    path = epath.Path(tmp_path / "metrics.jsonl")
    fs.append_text(path, "a\n")
    fs.append_text(path, "b\n")
    monkeypatch.setattr(fs, "is_remote", lambda p: True)
    fs.append_text(path, "c\n")
    assert path.read_text() == "a\nb\nc\n"


def test_local_directory_is_the_path_locally_and_uploads_remotely(tmp_path, monkeypatch):
    local = epath.Path(tmp_path / "hf")
    with fs.local_directory(local) as directory:
        assert str(directory) == str(local)
    target = epath.Path(tmp_path / "remote" / "hf")
    target.mkdir(parents=True)
    (target / "stale.bin").write_text("old export")
    monkeypatch.setattr(fs, "is_remote", lambda p: True)
    with fs.local_directory(target) as directory:
        assert str(directory) != str(target)
        (directory / "model.safetensors").write_bytes(b"\x00\x01")
        (directory / "config.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert (target / "model.safetensors").read_bytes() == b"\x00\x01"
