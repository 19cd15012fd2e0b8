"""llave-ds installed from a wheel (not editable), used from outside the checkout: the
shipped configs are package data, so ``--config llave_2b`` and the demo work there.

The wheel is built with ``pip wheel --no-deps`` and installed with ``--no-deps`` into a
fresh virtualenv; the heavy dependencies (torch, deepspeed, transformers, ...) come from the
test's own environment through a ``.pth`` path entry (its llave_ds, editable or not, is not
on that path: ``.pth`` files inside a path entry are not processed, so only the wheel's
``llave_ds`` can be imported).
"""
from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(root / "dist"), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (root / "dist").glob("llave_ds-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                              "--target", purelib, str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    # The dependencies of this environment, after the wheel's own directory on sys.path.
    (Path(purelib) / "zz_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    (venv / "bin" / "llave-ds").write_text(f"#!{py}\nimport sys\nfrom llave_ds.cli import main\nsys.exit(main())\n")
    (venv / "bin" / "llave-ds").chmod(0o755)
    outside = root / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    where = subprocess.run([str(py), "-c", "import llave_ds; print(llave_ds.__file__)"], cwd=outside, env=env,
                           capture_output=True, text=True, timeout=120)
    assert where.returncode == 0 and where.stdout.strip().startswith(purelib), (where.stdout, where.stderr)
    return {"py": py, "cli": venv / "bin" / "llave-ds", "cwd": outside, "env": env}


def test_installed_wheel_prints_a_shipped_config_by_name(wheel_env):
    proc = subprocess.run([str(wheel_env["cli"]), "train", "--config", "llave_2b", "--print-config"],
                          cwd=wheel_env["cwd"], env=wheel_env["env"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "temperature: 0.02" in proc.stdout and "prompt_format: llave" in proc.stdout, proc.stdout
    bad = subprocess.run([str(wheel_env["cli"]), "train", "--config", "llave_3b", "--print-config"],
                         cwd=wheel_env["cwd"], env=wheel_env["env"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "llave_2b" in bad.stderr and "'llave_3b'" in bad.stderr, bad.stderr


@pytest.mark.timeout(600)
def test_installed_wheel_runs_a_short_demo(wheel_env):
    out = wheel_env["cwd"] / "demo"
    proc = subprocess.run([str(wheel_env["cli"]), "demo", "--out", str(out), "--max-steps", "3",
                           "--train-per-subset", "16", "--eval-per-subset", "8"],
                          cwd=wheel_env["cwd"], env=wheel_env["env"], capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert list((out / "export").glob("*.safetensors"))
