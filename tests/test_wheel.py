"""The wheel: built from this tree, installed (not editable) into a fresh virtual environment, it
generates on the embedded default model and writes a servable Triton model repository, with its
package data found inside site-packages, never in the source tree. The fresh venv reuses this
environment's dependencies through a path entry, so nothing is downloaded."""
from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env=None, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs(tmp_path):
    before = sorted(p.name for p in (ROOT / "build").iterdir())
    _run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
          "-w", str(tmp_path / "dist")], cwd=tmp_path)
    assert sorted(p.name for p in (ROOT / "build").iterdir()) == before, "the build wrote into build/"
    wheel = next((tmp_path / "dist").glob("esdllm-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path)
    fresh_site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           cwd=tmp_path).stdout.strip())
    # dependencies from this environment, appended after the fresh site-packages (its .pth files,
    # the editable install among them, are not processed: esdllm comes from the wheel)
    (fresh_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    where = _run([str(py), "-c", "import esdllm, esdllm.runtime.pipeline as p; print(esdllm.__file__); "
                  "print(p.DEFAULT_MODEL)"], cwd=tmp_path, env=env).stdout.split()
    assert all(Path(w).is_relative_to(fresh_site) for w in where), where
    out = _run([str(venv / "bin" / "esdllm"), "generate", "--prompt", "upper: abcdefghijklmnop ->",
                "--gen-length", "32", "--block-length", "32", "--method", "fast-dllm", "--threshold", "0.9",
                "--json"], cwd=tmp_path, env=env)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["text"] == "ABCDEFGHIJKLMNOP" and res["stats"]["nfe"] >= 1
    repo = tmp_path / "repo"
    _run([str(venv / "bin" / "esdllm"), "serve", "--write-repo", str(repo)], cwd=tmp_path, env=env)
    cfg = (repo / "esdllm" / "config.pbtxt").read_text()
    assert "${" not in cfg and 'name: "text_input"' in cfg and "decoupled: true" in cfg
    assert (repo / "esdllm" / "1" / "model.py").is_file()
