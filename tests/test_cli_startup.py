"""Startup a person can follow: --help and --version without the heavy libraries, the first progress line before
the model loads, an honest word about the demo model's cache, and an unknown model refused at once offline."""
from __future__ import annotations

import os
import subprocess
import sys

HEAVY = ("torch", "transformers", "SimpleITK", "matplotlib", "fastapi")


def _run(code: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_help_and_version_load_no_heavy_library():
    for argv in (["--version"], ["--help"], ["ask", "--help"], ["serve", "--help"], ["bench", "--help"]):
        code = ("import sys\nfrom medpruner.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
                "print('LOADED', [m for m in %r if m in sys.modules])" % (argv, HEAVY))
        proc = _run(code)
        assert proc.returncode == 0, proc.stderr
        assert "LOADED []" in proc.stdout, (argv, proc.stdout[-300:])


def test_an_unknown_hub_model_fails_at_once_before_the_heavy_imports(tmp_path):
    volume = tmp_path / "v.nrrd"
    code = ("import sys, SimpleITK as s\nfrom medpruner.phantom import make_phantom_ct\n"
            f"s.WriteImage(make_phantom_ct(shape=(8, 32, 32)), {str(volume)!r})\n"
            "from medpruner.cli import main\n"
            f"code = main(['ask', {str(volume)!r}, 'Q?', '--model', 'SomeOrg/NotDownloaded', '--out', "
            f"{str(tmp_path / 'out')!r}])\n"
            "print('EXIT', code, 'TORCH', 'torch' in sys.modules)")
    proc = _run(code, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert "EXIT 2 TORCH False" in proc.stdout, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("medpruner:")]
    assert "loading the model from SomeOrg/NotDownloaded" in lines[-2]
    assert "neither a checkpoint folder nor a model cached" in lines[-1] and "HF_HUB_OFFLINE" in lines[-1]


def test_the_demo_model_says_whether_it_was_built(tmp_path):
    env = {"MEDPRUNER_CACHE": str(tmp_path / "cache")}
    messages = []
    for _ in range(2):
        code = ("from medpruner.cli import _tiny_model, _StderrProgress\n"
                "_tiny_model('qwen3_vl', _StderrProgress())")
        messages.append(_run(code, env=env).stderr)
    assert "building the tiny demo model" in messages[0] and "once into the cache" in messages[0]
    assert "from the cache" in messages[1] and "building" not in messages[1]
