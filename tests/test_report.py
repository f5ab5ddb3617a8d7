"""Stage 06's reports: training curves, FID (an optional extra), and the thesis-style comparison."""

import json
import os
import sys
import types

import numpy as np
import pytest
from PIL import Image

from utils import fid as fid_module


def test_06_writes_training_curves_and_fid_status(tiny_run):
    folder = os.path.join(tiny_run["run_dir"], "eval")
    curves = Image.open(os.path.join(folder, "training_curves.png"))
    assert curves.format == "PNG" and curves.size[0] > 500
    report = open(os.path.join(folder, "report.md")).read()
    assert "](training_curves.png)" in report and "## FID" in report and "## Budget" in report
    fid = json.load(open(os.path.join(folder, "fid.json")))
    reason = fid_module.fid_unavailable()
    if reason:  # the extra is missing here: one line says so, and the rest of the report is still written
        assert fid == {"skipped": reason} and reason in report
        assert reason in tiny_run["outputs"]["06_evaluate"].stdout
        assert "requirements-fid.txt" in reason or "TORCH_HOME" in reason
    else:
        assert fid["frames"] == 8 and fid["recon"] > 0 and fid["prior"] > 0
    manifest = json.load(open(os.path.join(tiny_run["run_dir"], "controller", "manifest.json")))
    assert manifest["cpu_s"] > 0  # CPU time of the stage and its workers, for the budget columns


def test_fid_messages_name_what_to_install_and_where_to_put_the_weights(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)  # `import pytorch_fid` now raises ImportError
    monkeypatch.delitem(sys.modules, "pytorch_fid.fid_score", raising=False)
    monkeypatch.delitem(sys.modules, "pytorch_fid.inception", raising=False)
    reason = fid_module.fid_unavailable()
    assert reason.startswith("FID skipped: pytorch-fid does not import") and "requirements-fid.txt" in reason
    assert "\n" not in reason
    with pytest.raises(RuntimeError, match="requirements-fid.txt"):
        fid_module.InceptionFeatures()

    # The extra imports, but the weights file is not in TORCH_HOME: say where it goes; never download.
    package = types.ModuleType("pytorch_fid")
    for name in ("fid_score", "inception"):
        sub = types.ModuleType(f"pytorch_fid.{name}")
        setattr(package, name, sub)
        monkeypatch.setitem(sys.modules, f"pytorch_fid.{name}", sub)
    monkeypatch.setitem(sys.modules, "pytorch_fid", package)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    reason = fid_module.fid_unavailable()
    assert reason.startswith("FID skipped: Inception weights not found at") and str(expected) in reason
    expected.parent.mkdir(parents=True)
    expected.write_bytes(b"")
    assert fid_module.fid_unavailable() is None


def test_frechet_distance_of_gaussians_with_known_moments():
    """Samples whose mean and covariance are exactly mu and diag(s^2): FID = |mu_a - mu_b|^2 + sum (s_a - s_b)^2."""
    try:
        import pytorch_fid.fid_score  # noqa: F401
    except Exception as e:  # noqa: BLE001 - torchvision built for another torch raises OSError/RuntimeError
        pytest.skip(f"pytorch-fid does not import here ({type(e).__name__}); the extra is requirements-fid.txt")

    rng = np.random.default_rng(0)

    def exact_samples(mu, s, n=400):
        z = rng.standard_normal((n, len(mu)))
        z -= z.mean(axis=0)
        z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance exactly I
        return mu + z * s

    mu_a, s_a = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 2.0, 0.5, 1.5])
    mu_b, s_b = np.array([1.0, 1.0, 0.0, 0.0]), np.array([2.0, 2.0, 1.0, 0.5])
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((s_a - s_b) ** 2)
    got = fid_module.frechet_distance(exact_samples(mu_a, s_a), exact_samples(mu_b, s_b))
    assert got == pytest.approx(expected, rel=1e-6)
    assert fid_module.frechet_distance(exact_samples(mu_a, s_a), exact_samples(mu_a, s_a)) == pytest.approx(0, abs=1e-6)


def test_compare_report_holds_every_run_with_its_scores(tiny_run, tiny_nvae_run, tmp_path):
    from conftest import ROOT, assert_ok

    import subprocess

    out = tmp_path / "compare.md"
    runs = [tiny_run["run_dir"], tiny_nvae_run["run_dir"]]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "06_evaluate.py"), "--compare", *runs, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_ok(proc)
    text = out.read_text()
    table1 = text.split("## Table 1")[1].split("##")[0]
    for run, kind in zip(runs, ("conv VAE (z = 8)", "NVAE (z = 16)")):
        s = json.load(open(os.path.join(run, "eval", "scores.json")))
        row = next(line for line in table1.splitlines() if f"`{run}`" in line)
        assert row.startswith(f"| {kind} |") and f"| {s['mean']:.1f} +- {s['std']:.1f} ({s['episodes']}) |" in row
        thesis = "720 +- 13" if kind.startswith("conv") else "800 +- 18"
        assert f"| {thesis} |" in row and "| 3 | 1 |" in row  # 3 rollouts, 1 V epoch
    assert "## FID" in text and "## Table 2" not in text  # no dream run among these


def test_compare_of_a_run_without_eval_is_a_clear_error(tmp_path):
    from conftest import ROOT, assert_user_error

    import subprocess

    out = tmp_path / "compare.md"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "06_evaluate.py"), "--compare", str(tmp_path),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert_user_error(proc, "scores.json: not found")
    assert not out.exists()
