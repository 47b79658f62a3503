"""Hub ids load as in every Hugging Face library, tested without network against a Hugging Face cache layout
built here (HF_HOME/hub/models--<org>--<name>/snapshots/<commit>/ and refs/<branch>): the id resolves from the
cache under HF_HUB_OFFLINE=1, `model.revision` picks a snapshot, and a missing id is a clear error. Each check
runs in a fresh process, since huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAIN = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def _cache(tmp_path: Path, tiny_model_dir: str) -> Path:
    """HF_HOME holding sdft-tests/tiny at two commits: `main` (the tiny model) and `v2` (other weights)."""
    home = tmp_path / "hf_home"
    repo = home / "hub" / "models--sdft-tests--tiny"
    for commit in (MAIN, OTHER):
        shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v2").write_text(OTHER)
    config = json.loads((repo / "snapshots" / OTHER / "config.json").read_text())
    config["rms_norm_eps"] = 0.125  # a visible difference between the two revisions
    (repo / "snapshots" / OTHER / "config.json").write_text(json.dumps(config))
    return home


def _run(code: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_a_hub_id_resolves_from_the_cache_offline_with_its_revision(tmp_path, tiny_model_dir):
    home = _cache(tmp_path, tiny_model_dir)
    code = ("import torch\nfrom sdft.config import load_config\nfrom sdft.models import load_configured\n"
            "for rev in ('null', 'v2'):\n"
            "    c = load_config(None, ['data.path=x', 'model.name=sdft-tests/tiny', f'model.revision={rev}',"
            " 'model.dtype=bfloat16', 'model.attn_implementation=eager'])\n"
            "    m, t = load_configured(c.model)\n"
            "    print(m.config.rms_norm_eps, m.dtype, m.config._attn_implementation, len(t) > 0)\n")
    proc = _run(code, home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[1:] == ["torch.bfloat16", "eager", "True"]  # loaded directly in model.dtype
    assert float(lines[0].split()[0]) != 0.125 and float(lines[1].split()[0]) == 0.125


def test_a_missing_hub_id_offline_is_a_clear_error(tmp_path, tiny_model_dir):
    home = _cache(tmp_path, tiny_model_dir)
    code = ("from sdft.models import load_model_and_tokenizer\n"
            "try:\n    load_model_and_tokenizer('sdft-tests/absent')\nexcept FileNotFoundError as e:\n    print(e)\n")
    proc = _run(code, home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    message = proc.stdout
    assert "'sdft-tests/absent' is not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in message and str(home / "hub") in message


def test_validate_reports_a_cached_hub_model(tmp_path, tiny_model_dir):
    home = _cache(tmp_path, tiny_model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"inputs": {"question": "What is 2 plus 2?"}, "expected": "4"}) + "\n")
    code = (f"from sdft.config import load_config\nfrom sdft.runner import validate_run\n"
            f"print('\\n'.join(validate_run(load_config(None, ['data.path={data}', 'model.name=sdft-tests/tiny']))))")
    proc = _run(code, home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model: ok (sdft-tests/tiny -> sdft-tests/tiny" in proc.stdout
