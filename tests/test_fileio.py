"""The one JSON encoder (`lora_jax.fileio`): numpy / jax values, bytes, non-finite conventions."""

import json
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
