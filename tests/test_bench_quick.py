"""The benchmarks still run (quick sizes). Figures are checked by the benchmarks, never timed here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

REPO = Path(__file__).resolve().parents[1]
BENCH_TIMEOUT_S = 3600  # a bound, not a timing: the quick runs took 1,167 s under a parallel suite's load


def run_bench(module: str, *args: str) -> None:
    """``python -m bench.MODULE ARGS`` from the repository; it must exit 0."""
    result = subprocess.run([sys.executable, "-m", f"bench.{module}", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=BENCH_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def test_bench_run_quick_produces_every_figure(tmp_path):
    out = tmp_path / "RESULTS.md"
    run_bench("run", "--quick", "--out", str(out))
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["wire"]["pyfed_mb_per_s"] > 0 and results["original_wire"]["mb_per_s"] > 0
    assert results["round"]["seed"]["pyfed"]["rounds"] and results["round"]["seed"]["original"]["rounds"]
    assert results["round"]["tiny"]["pyfed"]["rounds"] and results["round"]["tiny"]["original"]["rounds"]
    assert results["outside"]["pyfed"]["round_s"] and "original" not in results["outside"]  # quick: PyFed's side
    assert set(results["aggregate"]["n"]) == {"10", "20"}
    assert results["many_clients"]["all_updates_aggregated"] is True
    text = out.read_text()
    assert "### Targets" in text and "### Wire" in text and "### Many clients" in text


def test_strategy_table_quick_covers_the_requested_strategies(tmp_path):
    run_bench("strategies", "--quick", "--strategies", "fedavg,krum", "--out", str(tmp_path))
    results = json.loads((tmp_path / "STRATEGIES.json").read_text())
    assert [row[0] for row in results["table"]] == ["`fedavg`", "`krum`"]
    assert {(r["strategy"]["name"], r["scheme"]) for r in results["runs"]} == {
        ("fedavg", "iid"), ("fedavg", "dirichlet"), ("krum", "iid"), ("krum", "dirichlet")}
    assert all(len(r["accuracy_by_round"]) == 2 for r in results["runs"])
    assert "| strategy | IID: final accuracy" in (tmp_path / "STRATEGIES.md").read_text()


def test_privacy_table_quick_has_every_epsilon_and_the_baseline(tmp_path):
    run_bench("privacy", "--quick", "--out", str(tmp_path))
    results = json.loads((tmp_path / "PRIVACY.json").read_text())
    assert [row[0] for row in results["table"]] == ["1", "3", "8", "no DP"]
    assert all(abs(r["epsilon_spent"] - r["target_epsilon"]) <= 0.01 * r["target_epsilon"]
               for r in results["runs"] if r["target_epsilon"] is not None)
    assert "| target ε (δ = 1e-5)" in (tmp_path / "PRIVACY.md").read_text()


def test_secure_aggregation_quick_measures_plain_and_secure_rounds(tmp_path):
    run_bench("secagg", "--quick", "--out", str(tmp_path))
    results = json.loads((tmp_path / "SECAGG.json").read_text())
    assert [(r["clients"], r["dropped_after_sharing"]) for r in results["runs"]] == [(3, 0), (4, 1)]  # 4: 3 parties left
    assert all(r["max_error_vs_plain"] < 1e-4 for r in results["runs"])
    assert results["networked"]["plain_round_s"] > 0 and results["networked"]["secure_round_s"] > 0


def test_compression_quick_measures_bytes_accuracy_and_the_slow_link(tmp_path):
    run_bench("compression", "--quick", "--out", str(tmp_path))
    results = json.loads((tmp_path / "COMPRESSION.json").read_text())
    assert [row[0] for row in results["table"]] == ["none", "int8"]
    assert {r["encoding"] for r in results["wire"]} >= {"none", "fp16", "int8", "top-k 1%", "top-k 10%"}
    assert [s["encoding"] for s in results["slow_link"]] == ["none", "int8"]
    assert "## Round time on a slow link" in (tmp_path / "COMPRESSION.md").read_text()


def test_batch_norm_table_quick_has_every_case_and_method(tmp_path):
    run_bench("batch_norm", "--quick", "--out", str(tmp_path))
    results = json.loads((tmp_path / "BATCH_NORM.json").read_text())
    assert {(r["case"], r["method"]) for r in results["runs"]} == {
        (case, method) for case in ("iid", "label_skew", "shifted")
        for method in ("central", "fedavg", "fedavg_recalibrated", "fedbn")}
    assert all(0 <= r["accuracy"] <= 1 for r in results["runs"])
    assert all(set(r["per_site"]) == {"client-1", "client-2", "client-3"} for r in results["runs"]
               if r["case"] == "shifted")
    assert "| case | centralised | FedAvg" in (tmp_path / "BATCH_NORM.md").read_text()


def test_feature_scaling_table_quick_compares_scaled_unscaled_and_centralised(tmp_path):
    run_bench("feature_scaling", "--quick", "--out", str(tmp_path))
    results = json.loads((tmp_path / "FEATURE_SCALING.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["central", "scaled", "unscaled"]
    assert [r.get("scaled") for r in results["runs"]] == [None, True, False]
    assert results["runs"][0]["accuracy"] > 0.9  # a standardised logistic regression on breast cancer
    assert "| case | centralised standardised logistic regression" in (tmp_path / "FEATURE_SCALING.md").read_text()
