"""grammars/ and backends/ install as evodsl.grammars / evodsl.backends; a wheel holds only evodsl/."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return next(out.glob("evodsl-*.whl"))


def test_wheel_holds_only_the_evodsl_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"evodsl", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    assert "evodsl/grammars/evo.lark" in names
    assert "evodsl/backends/lower_torch.py" in names
    assert any(n.startswith("evodsl/ops/attention/") for n in names)


def test_installed_wheel_parses_and_compiles(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    code = ("import evodsl, torch; m = evodsl.compile('d_model = 32\\nblock = norm -> mha(heads=4) -> ffn');"
            "print(evodsl.__file__); print(m(torch.randn(1, 5, 32)).shape)")
    env = dict(os.environ, PYTHONPATH=str(target))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert str(target) in proc.stdout and "torch.Size([1, 5, 32])" in proc.stdout
