"""Smoke tests of the loss benchmark and accuracy scripts (their code: sdft.bench) at tiny shapes on the CPU
(Triton under the interpreter), so that the GPU commands in docs/benchmarks.md keep working."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def _run(args, tmp_path, interpret=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


@needs_triton
def test_accuracy_check_against_float64_truth(tmp_path):
    out = tmp_path / "acc.json"
    printed = _run(["scripts/check_losses_gpu.py", "--device", "cpu", "--tiny", "--json", str(out)], tmp_path)
    rows = json.loads(out.read_text())["rows"]
    losses = {r["loss"] for r in rows}
    assert {"forward KL", "forward KL T=2", "reverse KL", "jsd KL", "teacher top-20"} <= losses
    fused = [r for r in rows if r["path"] in ("chunked", "triton")]
    assert {r["path"] for r in fused} == {"chunked", "triton"} and all(r["passed"] for r in fused)
    naive = [r for r in rows if r["path"] == "naive" and r["dh_err"] is not None]
    assert all(r["dh_err"] > 1e-3 for r in naive)  # the bf16 logits of naive PyTorch cost accuracy
    assert all(r["loss_err"] < 1e-5 for r in fused)  # fp32 softmax from exact products
    assert "every fused path is at least as accurate as naive PyTorch" in printed


@needs_triton
def test_gpu_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    _run(["scripts/bench_losses_gpu.py", "--device", "cpu", "--tiny", "--losses", "kl,teacher_topk",
          "--modes", "lora", "--impls", "naive,chunked,triton", "--warmup", "1", "--iters", "1",
          "--json", str(out)], tmp_path)
    rows = json.loads(out.read_text())["rows"]
    timed = {(r["loss"], r["impl"]) for r in rows if r["ms"] is not None and r["ms"] > 0}
    for impl in ("naive", "chunked", "triton"):
        assert ("kl", impl) in timed and ("teacher_topk", impl) in timed, (impl, rows)


def test_cpu_benchmark_smoke(tmp_path):
    out = tmp_path / "cpu.json"
    _run(["scripts/bench_losses.py", "--grid", "64x32x500", "--loss", "kl,topk", "--repeats", "1",
          "--json", str(out)], tmp_path, interpret=False)
    rows = json.loads(out.read_text())
    assert {(r["loss"], r["path"]) for r in rows} == {(loss, path) for loss in ("kl", "topk")
                                                      for path in ("reference", "chunked")}
    assert all(r["time_s"] > 0 and r["peak_extra_bytes"] >= 0 for r in rows)


def test_benchmarks_use_only_the_public_losses_api():
    """sdft.bench (and the scripts) reach the loss paths through `impl=` of the names in sdft.losses.__all__,
    never through kernel or private modules."""
    import ast

    import sdft.losses

    public = set(sdft.losses.__all__)
    files = sorted((REPO / "sdft" / "bench").glob("*.py")) + sorted((REPO / "scripts").glob("*.py"))
    used = []
    for path in files:
        tree = ast.parse(path.read_text())
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sdft.losses"):
                assert node.module == "sdft.losses", f"{path.name} imports {node.module}"
                used += [(path.name, a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("sdft.losses"):
                        assert a.name == "sdft.losses", f"{path.name} imports {a.name}"
                        aliases.add(a.asname or a.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                used.append((path.name, node.attr))
    assert used and all(name in public for _, name in used), [u for u in used if u[1] not in public]
