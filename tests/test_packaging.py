"""The wheel a user installs (issue 19): license, type marker, metadata, a description that
links only to what exists, and a build without setuptools deprecation warnings.

The wheel is built from a copy of the files it is made of, with the backend pyproject.toml
names (setuptools, called in-process by a subprocess: no download, no build isolation).
"""

from __future__ import annotations

import email
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD = ("import sys; from setuptools import build_meta; "
         "print('WHEEL', build_meta.build_wheel(sys.argv[1]))")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[zipfile.ZipFile, str]:
    """(the built wheel, everything the build printed)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "convbn_fx", src / "convbn_fx",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-c", BUILD, str(out)], cwd=src, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    name = proc.stdout.split("WHEEL ")[-1].strip()
    return zipfile.ZipFile(out / name), proc.stdout + proc.stderr


def _metadata(whl: zipfile.ZipFile) -> email.message.Message:
    [path] = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
    return email.message_from_string(whl.read(path).decode())


def test_wheel_ships_the_license_and_the_type_marker(wheel):
    whl, _ = wheel
    names = whl.namelist()
    [license_path] = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    text = whl.read(license_path).decode()
    assert "BSD 3-Clause License" in text and "Copyright (c) 2026, the convbn_fx authors" in text
    assert "convbn_fx/py.typed" in names
    assert "convbn_fx/model/pickling.py" in names  # the packages are found, subfolders too


def test_metadata_states_license_and_supported_versions(wheel):
    meta = _metadata(wheel[0])
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert meta["Requires-Python"] == ">=3.11"
    assert "torch>=2.13" in meta.get_all("Requires-Dist")
    classifiers = meta.get_all("Classifier")
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert "Typing :: Typed" in classifiers


def test_long_description_links_only_to_what_exists(wheel):
    description = _metadata(wheel[0]).get_payload()
    assert "## What it does" in description
    relative = re.findall(r"\]\((?!https?://|#)([^)]*)\)", description)
    assert relative == [], f"links to files outside the wheel: {relative}"


def test_build_prints_no_deprecation_warning(wheel):
    _, printed = wheel
    assert "deprecat" not in printed.lower(), printed
