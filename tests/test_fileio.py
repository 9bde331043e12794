"""The one JSON encoder (`lora_jax.fileio`): numpy / jax values, bytes, non-finite conventions."""

import json
import os
import math

import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import fileio


def test_numpy_jax_and_tuples_become_plain_json():
  obj = {"i": np.int64(3), "f": np.float32(0.5), "a": np.arange(3), "j": jnp.ones(2),
         "t": (1, 2), 7: "int key"}
  assert json.loads(fileio.dumps(obj)) == {"i": 3, "f": 0.5, "a": [0, 1, 2], "j": [1.0, 1.0],
                                           "t": [1, 2], "7": "int key"}


def test_bytes_round_trip():
  obj = {"state": b"\x00\xffgrain", "nested": [b""]}
  assert fileio.loads(fileio.dumps(obj)) == obj


@pytest.mark.parametrize("nonfinite, expected", [
    ("null", [None, None, None]),
    ("strict", [None, "inf", "-inf"]),
])
def test_nonfinite_conventions(nonfinite, expected):
  text = fileio.dumps([math.nan, np.float32(np.inf), -math.inf], nonfinite=nonfinite)
  assert json.loads(text) == expected
  assert "NaN" not in text and "Infinity" not in text


def test_literal_nonfinite_is_python_json():
  assert fileio.dumps([math.nan, math.inf]) == "[NaN, Infinity]"


def test_unknown_type_is_refused():
  with pytest.raises(TypeError, match="object"):
    fileio.dumps({"x": object()})


def test_atomic_write_json_replaces_whole_file(tmp_path):
  path = tmp_path / "sub" / "x.json"
  fileio.atomic_write_json(str(path), {"a": 1})
  fileio.atomic_write_json(str(path), {"b": np.float64(2.0)}, indent=None, sort_keys=True)
  assert path.read_text() == '{"b": 2.0}\n'
  assert [p.name for p in path.parent.iterdir()] == ["x.json"]


# --------------------------------------------------------------------------- local and gs:// paths
# Every test below runs on a local tmp dir and on a gs:// prefix of the GCS emulator.
@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "root")
  return request.getfixturevalue("gcs_url")


def test_is_remote_and_join():
  assert fileio.is_remote("gs://b/x") and not fileio.is_remote("/tmp/gs:/x")
  assert not fileio.is_remote("runs/x")
  assert fileio.join("gs://b/runs/", "x", "config.json") == "gs://b/runs/x/config.json"
  assert fileio.join("runs", "x") == os.path.join("runs", "x")
  assert str(fileio.as_path("gs://b/x/y")) == "gs://b/x/y"


def test_write_read_list_remove(root):
  f = fileio.join(root, "sub", "a.json")
  assert not fileio.exists(f)
  fileio.atomic_write_json(f, {"a": 1})
  fileio.atomic_write_text(fileio.join(root, "sub", "b.txt"), "é\n")
  fileio.atomic_write_bytes(fileio.join(root, "c.bin"), b"\x00\x01")
  assert fileio.read_json(f, "thing") == {"a": 1}
  assert fileio.read_text(fileio.join(root, "sub", "b.txt")) == "é\n"
  assert fileio.read_bytes(fileio.join(root, "c.bin")) == b"\x00\x01"
  with fileio.open(fileio.join(root, "sub", "b.txt"), "rb") as fh:
    assert fh.read() == "é\n".encode()
  assert fileio.listdir(root) == ["c.bin", "sub"]
  assert fileio.listdir(fileio.join(root, "sub")) == ["a.json", "b.txt"]
  assert fileio.isdir(fileio.join(root, "sub")) and fileio.isfile(f)
  assert not fileio.isfile(fileio.join(root, "sub")) and not fileio.isdir(f)
  fileio.remove(f)
  assert fileio.listdir(fileio.join(root, "sub")) == ["b.txt"]
  fileio.rmtree(fileio.join(root, "sub"))
  fileio.rmtree(fileio.join(root, "sub"))  # missing is fine
  assert fileio.listdir(root) == ["c.bin"]


def test_missing_paths_are_clear_errors(root):
  missing = fileio.join(root, "nope")
  with pytest.raises(FileNotFoundError, match="nope"):
    fileio.read_json(fileio.join(missing, "x.json"), "widget")
  with pytest.raises(FileNotFoundError, match="nope"):
    fileio.listdir(missing)
  with pytest.raises(FileNotFoundError, match="nope"):
    fileio.read_bytes(missing)
  with pytest.raises(FileNotFoundError, match="nope"):
    fileio.remove(missing)
  fileio.atomic_write_text(fileio.join(root, "bad.json"), "{not json")
  with pytest.raises(ValueError, match="bad.json: not valid JSON"):
    fileio.read_json(fileio.join(root, "bad.json"), "widget")


def test_failed_write_keeps_the_previous_file(root, monkeypatch):
  f = fileio.join(root, "x.json")
  fileio.atomic_write_json(f, {"v": 1})
  with pytest.raises(TypeError):
    fileio.atomic_write_json(f, {"v": object()})
  assert fileio.read_json(f, "x") == {"v": 1}
  assert fileio.listdir(root) == ["x.json"]


def test_remote_open_refuses_writes(gcs_url):
  with pytest.raises(ValueError, match="reading only"):
    fileio.open(fileio.join(gcs_url, "x"), "w")


def _build(tmp, files: dict[str, bytes]):
  for rel, data in files.items():
    os.makedirs(os.path.dirname(os.path.join(tmp, rel)) or tmp, exist_ok=True)
    with open(os.path.join(tmp, rel), "wb") as fh:
      fh.write(data)


def test_atomic_dir_replaces_own_files_and_keeps_foreign_ones(root):
  out = fileio.join(root, "export")
  owned = ("config.json", "model*.safetensors", "params")
  with fileio.atomic_dir(out, owned) as tmp:
    _build(tmp, {"config.json": b"{}", "model-1.safetensors": b"old", "params/a/b": b"1",
                 "params/stale": b"s"})
  assert fileio.listdir(out) == ["config.json", "model-1.safetensors", "params"]
  with fileio.atomic_dir(out, owned) as tmp:  # own output: replaced
    _build(tmp, {"config.json": b'{"v": 2}', "model.safetensors": b"new", "params/a/b": b"2"})
  assert fileio.listdir(out) == ["config.json", "model.safetensors", "params"]
  assert fileio.listdir(fileio.join(out, "params")) == ["a"]
  assert fileio.read_bytes(fileio.join(out, "params", "a", "b")) == b"2"
  fileio.atomic_write_text(fileio.join(out, "notes.txt"), "mine")
  with pytest.raises(FileExistsError, match="notes.txt"):
    with fileio.atomic_dir(out, owned) as tmp:
      _build(tmp, {"config.json": b"{}"})
  with fileio.atomic_dir(out, owned, overwrite=True) as tmp:
    _build(tmp, {"config.json": b'{"v": 3}', "model.safetensors": b"3"})
  assert fileio.listdir(out) == ["config.json", "model.safetensors", "notes.txt"]
  assert fileio.read_json(fileio.join(out, "config.json"), "c") == {"v": 3}
  assert fileio.check_replaceable(out, owned, overwrite=True) == ["notes.txt"]


def test_atomic_dir_failure_changes_nothing(root):
  out = fileio.join(root, "export")
  with fileio.atomic_dir(out, ("config.json", "w.bin")) as tmp:
    _build(tmp, {"config.json": b"1", "w.bin": b"1"})
  with pytest.raises(RuntimeError):
    with fileio.atomic_dir(out, ("config.json", "w.bin")) as tmp:
      _build(tmp, {"config.json": b"2", "w.bin": b"2"})
      raise RuntimeError("writer failed")
  assert fileio.read_bytes(fileio.join(out, "w.bin")) == b"1"
  assert fileio.read_bytes(fileio.join(out, "config.json")) == b"1"
  assert fileio.listdir(out) == ["config.json", "w.bin"]
  fileio.atomic_write_text(fileio.join(root, "file"), "x")
  with pytest.raises(FileExistsError, match="not a directory"):
    with fileio.atomic_dir(fileio.join(root, "file"), ("a",)):
      pass


def test_remote_atomic_dir_uploads_commit_files_last(gcs_url, monkeypatch):
  order = []
  real = fileio.upload_file
  monkeypatch.setattr(fileio, "upload_file", lambda src, dst: (order.append(dst.rsplit("/", 1)[1]),
                                                                real(src, dst)))
  with fileio.atomic_dir(gcs_url, ("*",)) as tmp:
    _build(tmp, {"adapter_config.json": b"{}", "z.safetensors": b"w", "a.bin": b"a"})
  assert order[-1] == "adapter_config.json" and sorted(order) == sorted(
      ["adapter_config.json", "z.safetensors", "a.bin"])


def test_remote_upload_failure_leaves_no_commit_file(gcs_url, monkeypatch):
  """Mid-upload failure: the export is visibly incomplete (no config.json), never a mix."""
  with fileio.atomic_dir(gcs_url, ("*",)) as tmp:
    _build(tmp, {"config.json": b"1", "w.bin": b"1"})
  real = fileio.upload_file

  def flaky(src, dst):
    if dst.endswith("config.json"):
      raise OSError("network down")
    real(src, dst)
  monkeypatch.setattr(fileio, "upload_file", flaky)
  with pytest.raises(OSError, match="network down"):
    with fileio.atomic_dir(gcs_url, ("*",)) as tmp:
      _build(tmp, {"config.json": b"2", "w.bin": b"2"})
  assert fileio.listdir(gcs_url) == ["w.bin"]


def test_local_copy_and_staged_dir(root):
  with fileio.staged_dir(fileio.join(root, "figs")) as d:
    _build(d, {"a.png": b"png", "sub/b.txt": b"b"})
  assert fileio.listdir(fileio.join(root, "figs")) == ["a.png", "sub"]
  with fileio.local_copy(fileio.join(root, "figs")) as local:
    assert os.path.isdir(local) and os.path.basename(local) == "figs"
    with open(os.path.join(local, "sub", "b.txt"), "rb") as fh:
      assert fh.read() == b"b"
  with fileio.local_copy(fileio.join(root, "figs", "a.png")) as local:
    assert local.endswith("a.png") and open(local, "rb").read() == b"png"
  if fileio.is_remote(root):
    assert not os.path.exists(local)  # the download is deleted afterwards
    with pytest.raises(RuntimeError):
      with fileio.staged_dir(fileio.join(root, "failed")) as d:
        _build(d, {"x": b"x"})
        raise RuntimeError
    assert not fileio.exists(fileio.join(root, "failed"))
  else:
    assert local == fileio.join(root, "figs", "a.png")


def test_move(root):
  fileio.atomic_write_text(fileio.join(root, "ck", "5", "a", "x"), "5")
  fileio.move(fileio.join(root, "ck", "5"), fileio.join(root, "aside", "5"))
  assert not fileio.exists(fileio.join(root, "ck", "5"))
  assert fileio.read_text(fileio.join(root, "aside", "5", "a", "x")) == "5"
