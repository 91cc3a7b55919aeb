"""ddfast.pipeline / report / sweep as an API, with the cheap ``fake`` distiller (tests/_ddfast_fake.py) on
scikit-learn's digits: outputs, metrics schema, exact resume after an interrupt, config checks, caches, sweeps."""
import json
import os

import pytest
import torch

import _ddfast_fake
from ddfast import pipeline, sweep
from ddfast.pipeline import stages
from ddfast.distill.base import SyntheticSet
from ddfast.pipeline import RunConfig, RunConfigMismatch, UsageError
from ddfast.report import run_wall_seconds

_ddfast_fake.register()

TINY = {"distill": {"iterations": 2}}  # for tests that are not about distillation


def _cfg(out, **kw):
    base = dict(dataset="digits", noise="sym:0.4", method="fake", tad=False, ipc=3, preset="quick", seed=0,
                out=str(out), device="cpu", baselines=("random_subset",), quiet=True, overrides={})
    base.update(kw)
    return RunConfig(**base)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DDFAST_FAKE_FAIL_AT", raising=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    os.environ["DDFAST_CACHE"] = str(root / "cache")
    try:
        m = pipeline.run(_cfg(root / "run"))
    finally:
        del os.environ["DDFAST_CACHE"]
    return root / "run", m


def test_run_writes_every_output(finished):
    out, m = finished
    for f in ("run.json", "synset.safetensors", "synset.json", "synset_grid.png", "metrics.json", "report.md",
              "plots/loss.png"):
        assert (out / f).exists(), f
    syn = SyntheticSet.load(str(out))
    assert syn.images.shape == (30, 1, 8, 8) and syn.method == "fake"
    assert torch.bincount(syn.hard_labels(), minlength=10).tolist() == [3] * 10
    assert syn.metadata["ddfast_run"]["noise"] == "sym:0.4"
    png = open(out / "synset_grid.png", "rb").read(8)
    assert png == b"\x89PNG\r\n\x1a\n"


def test_metrics_schema(finished):
    out, m = finished
    disk = json.load(open(out / "metrics.json"))
    assert disk["schema"] == "ddfast.metrics/1" and disk["complete"] is True
    for key in ("distilled", "random_subset"):
        r = disk["results"][key]
        assert set(r) >= {"mean", "std", "accs", "seconds", "n_images"}
        assert 0.0 <= r["mean"] <= 100.0 and len(r["accs"]) == 2
        t = torch.tensor(r["accs"], dtype=torch.float64)
        assert r["mean"] == pytest.approx(float(t.mean()))
        assert r["std"] == pytest.approx(float(t.std(unbiased=False)))
    n = disk["noise"]
    assert n["spec"] == "sym:0.4" and n["target_rate"] == 0.4 and n["seed"] == 0
    assert 0.3 < n["realised_rate"] < 0.5
    assert n["n_flipped"] == round(n["realised_rate"] * n["n"])
    T = torch.tensor(n["transition"])
    assert T.shape == (10, 10) and torch.allclose(T.sum(1), torch.ones(10), atol=1e-4)
    assert disk["tad"] == {"enabled": False, "rounds": []}
    for stage in ("data", "noise", "distill", "evaluate", "baseline:random_subset", "report"):
        assert disk["stages"][stage]["seconds"] >= 0 and disk["stages"][stage]["peak_memory_bytes"] > 0
    env = disk["environment"]
    assert env["torch"] == torch.__version__ and "extension" in env and env["device"] == "cpu"
    assert disk["config"]["method"] == "fake" and disk["distill"]["config"]["ipc"] == 3
    assert disk["distill"]["iterations"] == 8
    assert disk["command"].startswith("ddfast run --dataset digits")


def test_report_sections(finished):
    out, m = finished
    text = open(out / "report.md").read()
    for s in ("## Test accuracy", "## Label noise", "## Time and peak memory per stage", "## Reproduce",
              "realised rate", "synset_grid.png", "plots/loss.png", m["command"]):
        assert s in text, s
    assert f"{m['results']['distilled']['mean']:.2f}" in text


def test_report_tad_per_class_table():
    from ddfast.report import render_report

    last = {"round": 2, "n_trusted": 7, "trusted_per_class": [4, 3], "precision_per_class": [1.0, 2 / 3],
            "coverage_per_class": [0.4, 0.25]}
    m = {"dataset": {"classes": ["cat", "dog"]}, "tad": {"enabled": True, "rounds": [last]}}
    text = render_report(m)
    assert "Trusted set per class after round 2" in text
    assert "| cat | 4 | 1.000 | 0.400 |" in text and "| dog | 3 | 0.667 | 0.250 |" in text
    # without clean labels only the sizes are shown
    text = render_report({"dataset": {}, "tad": {"enabled": True, "rounds": [{"trusted_per_class": [4, 3]}]}})
    assert "| 0 | 4 |" in text and "precision" not in text.split("Trusted set per class")[1].split("\n\n")[1]
    # the estimated noise transition's diagonal, and its error when the clean labels are known
    text = render_report({**m, "tad": {"enabled": True, "rounds": [
        dict(last, transition_diagonal=[0.61, 0.58], transition_error=0.125)]}})
    assert "| cat | 4 | 1.000 | 0.400 | 0.610 |" in text and "| dog | 3 | 0.667 | 0.250 | 0.580 |" in text
    assert "largest row error against the realised noise: 0.125" in text


def test_report_per_class_accuracy_table():
    from ddfast.report import render_report

    res = {"distilled": {"mean": 60.0, "std": 0.0, "accs": [60.0], "per_class": [80.0, 40.0]},
           "full_noisy": {"mean": 70.0, "std": 0.0, "accs": [70.0], "per_class": [90.0, 50.0]},
           "random_subset": {"mean": 50.0, "std": 0.0, "accs": [50.0]}}  # no per-class figures: no column
    text = render_report({"dataset": {"classes": ["cat", "dog"]}, "config": {"method": "dance"}, "results": res})
    assert "### Per-class test accuracy (%)" in text
    assert "| cat | 80.0 | 90.0 | -10.0 |" in text and "| dog | 40.0 | 50.0 | -10.0 |" in text
    assert "random subset" not in text.split("### Per-class test accuracy (%)")[1].split("\n\n")[2]
    assert "the difference column is the distilled set minus" in text
    # without the full noisy baseline the text does not name a column the table lacks
    text = render_report({"dataset": {"classes": ["cat", "dog"]}, "config": {"method": "dance"},
                          "results": {k: v for k, v in res.items() if k != "full_noisy"}})
    assert "| cat | 80.0 |" in text and "difference column is" not in text and "no difference column" in text
    del res["distilled"]["per_class"]
    assert "Per-class test accuracy" not in render_report({"dataset": {}, "results": res})


def test_report_titles_without_label_noise():
    from ddfast.report import baseline_title, render_report

    res = {"random_subset": {"mean": 70.0, "std": 1.0, "accs": [69.0, 71.0]}}
    clean = render_report({"noise": {"spec": "none"}, "results": res})
    noisy = render_report({"noise": {"spec": "sym:0.4"}, "results": res})
    assert "| random real subset |" in clean and "(noisy labels)" not in clean
    assert "| random real subset (noisy labels) |" in noisy
    assert baseline_title("full_noisy", "none") == "full training set, last epoch"
    assert baseline_title("full_noisy", "asym:0.2") == "full noisy training set, last epoch"


def test_report_headline_compares_with_the_last_epoch_full_noisy_baseline():
    """The first sentence compares the distilled set with the full noisy set trained to its last epoch and says
    so; early stopping and the best epoch (oracle) follow, then the random subset."""
    from ddfast.report import crossover_rates, crossover_table, render_report, result_row

    ev = {"epochs_trained": 30, "curve": [60.0, 70.0, 65.0],
          "best_epoch": {"mean": 70.0, "std": 0.0, "accs": [70.0], "epochs": [2]},
          "early_stop": {"mean": 68.0, "std": 0.0, "accs": [68.0], "epochs": [2]}}
    res = {"distilled": {"mean": 66.0, "std": 0.5, "accs": [66.0], "n_images": 100},
           "full_noisy": {"mean": 65.0, "std": 0.0, "accs": [65.0], "n_images": 60000, "eval": ev},
           "random_subset": {"mean": 40.0, "std": 1.0, "accs": [40.0]}}
    text = render_report({"noise": {"spec": "sym:0.6"}, "results": res})
    first = [ln for ln in text.splitlines() if ln.startswith("**")][0]
    assert "beats training on all 60000 noisy images to the last of 30 epochs" in first and "1.00 points" in first
    assert "early stopped on held-out noisy labels the full set gives 68.00" in text
    assert "an oracle that peeks at the clean test labels, 70.00" in text
    assert result_row(res, "full_noisy@best_epoch")["epochs"] == [2] and result_row(res, "gce") is None
    # crossover: the lowest rate at which the distilled set beats the last-epoch full noisy set
    cells = []
    for spec, d, f in (("none", 80.0, 90.0), ("sym:0.2", 78.0, 85.0), ("sym:0.4", 75.0, 74.0),
                       ("sym:0.6", 70.0, 60.0), ("asym:0.4", 60.0, 70.0)):
        cells.append({"method": "datm", "tad": False, "noise": spec, "ipc": 10,
                      "metrics": {"results": {"distilled": {"mean": d}, "full_noisy": {"mean": f}}}})
    got = {(c["noise"], c["method"]): c for c in crossover_rates(cells)}
    assert got[("sym", "DATM")]["crossover"] == 0.4 and got[("sym", "DATM")]["rates"] == [0.0, 0.2, 0.4, 0.6]
    assert got[("asym", "DATM")]["crossover"] is None
    table = crossover_table(crossover_rates(cells))
    assert "| DATM | sym | 10 | 0.4 | 0, 0.2, 0.4, 0.6 |" in table and "| DATM | asym | 10 | none | 0, 0.4 |" in table
    assert crossover_table([]) == ""


def test_long_tail_rows_against_hand_computed_groups():
    from ddfast.report import long_tail_rows, long_tail_text

    d = [90.0, 80.0, 70.0, 60.0, 50.0, 40.0, 30.0, 20.0, 10.0, 0.0]
    f = [95.0, 85.0, 75.0, 60.0, 60.0, 60.0, 60.0, 50.0, 50.0, 50.0]
    cell = {"method": "dance", "tad": False, "noise": "sym:0.4", "ipc": 10, "imbalance": 0.01,
            "metrics": {"results": {"distilled": {"per_class": d}, "full_noisy": {"per_class": f}}}}
    balanced = {**cell, "imbalance": None}
    rows = long_tail_rows([cell, balanced, {**cell, "metrics": {"results": {"distilled": {"per_class": d}}}}])
    assert len(rows) == 1  # the balanced cell and the one without full-noisy figures are left out
    r = rows[0]
    assert r["distilled"] == pytest.approx({"head": 80.0, "middle": 45.0, "tail": 10.0})
    assert r["full_noisy"] == pytest.approx({"head": 85.0, "middle": 60.0, "tail": 50.0})
    assert r["tail_minus_head"] == pytest.approx((10.0 - 50.0) - (80.0 - 85.0))
    text = long_tail_text(rows)
    assert "| DANCE | sym:0.4 | 10 | 0.01 | 80.0 / 45.0 / 10.0 | 85.0 / 60.0 / 50.0 | -5.0 / -15.0 / -40.0 | -35.0 |" in text
    assert long_tail_text([]) == ""


def test_finished_run_is_not_recomputed(finished, monkeypatch):
    out, m = finished
    monkeypatch.setattr(stages, "_distill", lambda *a, **k: pytest.fail("distilled again"))
    monkeypatch.setattr(stages, "evaluate_synthetic_set", lambda *a, **k: pytest.fail("evaluated again"))
    again = pipeline.run(_cfg(out))
    assert again["results"] == m["results"]


def test_other_config_is_refused(finished):
    out, _ = finished
    with pytest.raises(RunConfigMismatch, match=r"noise: 'sym:0.4' -> 'sym:0.2'"):
        pipeline.run(_cfg(out, noise="sym:0.2"))
    with pytest.raises(RunConfigMismatch, match="ipc"):
        pipeline.run(_cfg(out, ipc=2))


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch, finished):
    ref_dir, ref = finished
    out = tmp_path / "run"
    monkeypatch.setenv("DDFAST_FAKE_FAIL_AT", "5")   # checkpoints every 3 iterations: resumes from 3
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(_cfg(out))
    assert (out / "checkpoints" / "checkpoint.pt").exists()
    assert not (out / "metrics.json").exists() and not (out / "report.md").exists()
    assert not (out / SyntheticSet.FILE_META).exists()
    monkeypatch.delenv("DDFAST_FAKE_FAIL_AT")
    m = pipeline.run(_cfg(out))
    assert m["resumed"] is True
    a, b = SyntheticSet.load(str(ref_dir)), SyntheticSet.load(str(out))
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert m["results"]["distilled"]["accs"] == ref["results"]["distilled"]["accs"]
    assert m["results"]["random_subset"]["accs"] == ref["results"]["random_subset"]["accs"]


def test_interrupt_after_distillation_keeps_finished_stages(tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = _cfg(out, overrides=TINY)
    calls = {"n": 0}
    real = stages.run_baseline

    def boom(*a, **k):
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "run_baseline", boom)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg)
    assert (out / SyntheticSet.FILE_META).exists() and (out / "stages" / "evaluate.json").exists()
    assert not (out / "metrics.json").exists()
    # the first invocation's evaluation, as its timing file records it (set long, so no wall-clock wait is needed)
    timing = json.loads((out / "stages" / "timing.json").read_text())
    timing["stages"]["evaluate"]["seconds"] = 1000.0
    (out / "stages" / "timing.json").write_text(json.dumps(timing))
    monkeypatch.setattr(stages, "run_baseline", real)
    monkeypatch.setattr(stages, "_distill", lambda *a, **k: pytest.fail("distilled again"))
    monkeypatch.setattr(stages, "evaluate_synthetic_set", lambda *a, **k: pytest.fail("evaluated again"))
    m = pipeline.run(cfg)
    assert m["stages"]["distill"]["resumed"] and m["stages"]["evaluate"]["resumed"]
    assert "random_subset" in m["results"]
    # the run's wall time counts the first invocation's stages too; this invocation's total_seconds does not
    assert m["stages"]["evaluate"]["seconds"] == 1000.0
    this_invocation = sum(s["seconds"] for k, s in m["stages"].items() if "." not in k and not s.get("resumed"))
    assert this_invocation <= m["total_seconds"]
    assert run_wall_seconds(m) >= m["stages"]["evaluate"]["seconds"] + this_invocation
    text = (out / "report.md").read_text()
    assert f"total wall time {run_wall_seconds(m):.0f} s" in text and "over its invocations" in text


def test_run_wall_seconds_of_a_run_in_one_invocation(finished):
    _, m = finished
    assert not m["resumed"] and run_wall_seconds(m) == m["total_seconds"]
    assert sum(s["seconds"] for k, s in m["stages"].items() if "." not in k) <= m["total_seconds"]


def test_baseline_results_are_cached_across_runs(tmp_path, monkeypatch):
    m1 = pipeline.run(_cfg(tmp_path / "a", overrides=TINY))
    monkeypatch.setattr(stages, "run_baseline", lambda *a, **k: pytest.fail("baseline recomputed"))
    m2 = pipeline.run(_cfg(tmp_path / "b", overrides={"distill": {"iterations": 1}}))
    assert m2["stages"]["baseline:random_subset"]["cached"] is True
    assert m2["results"]["random_subset"] == m1["results"]["random_subset"]


def test_bad_arguments_raise_usage_errors(tmp_path):
    cases = [
        (dict(dataset="no-such-set"), "unknown dataset"),
        (dict(noise="sym:1.5"), "rate"),
        (dict(noise="sym:-0.1"), "rate"),
        (dict(noise="file", label_file=str(tmp_path / "missing.npy")), "no such file"),
        (dict(ipc=500), "larger than"),
        (dict(method="nope"), "unknown method"),
        (dict(preset="huge"), "unknown preset"),
        (dict(baselines=("oracle",)), "unknown baseline"),
        (dict(overrides={"baseline": {"epoch": 3}}), "unknown baseline option"),
    ]
    if not torch.cuda.is_available():  # a CUDA-only setting is refused before the run directory is created
        cases.append((dict(method="datm", overrides={"distill": {"cuda_graph": True}}),
                      r"-O distill\.cuda_graph: needs a CUDA device"))
    for kw, msg in cases:
        out = tmp_path / ("x" + str(abs(hash(msg))))
        with pytest.raises(UsageError, match=msg):
            pipeline.run(_cfg(out, **kw))
        assert not out.exists(), kw   # nothing written for a bad argument


def test_label_file_noise(tmp_path):
    import numpy as np
    from ddfast.data import load_dataset

    clean = load_dataset("digits", "train").labels
    noisy = clean.clone()
    noisy[:100] = (noisy[:100] + 1) % 10
    np.save(tmp_path / "labels.npy", noisy.numpy())
    m = pipeline.run(_cfg(tmp_path / "run", noise="file", label_file=str(tmp_path / "labels.npy"),
                          baselines=(), overrides={"distill": {"iterations": 1}, "eval": {"epochs": 1}}))
    assert m["noise"]["spec"] == "file:labels.npy"
    assert m["noise"]["n_flipped"] == 100
    np.save(tmp_path / "short.npy", noisy[:10].numpy())
    with pytest.raises(UsageError, match="expected 1437 integer labels"):
        pipeline.run(_cfg(tmp_path / "run2", noise="file", label_file=str(tmp_path / "short.npy")))


def test_evaluate_dir_reproduces_the_run(finished):
    out, m = finished
    r = pipeline.evaluate_dir(str(out), device="cpu", quiet=True, write=True)
    assert r["accs"] == m["results"]["distilled"]["accs"]
    assert (out / "evaluations" / "convnet-2runs.json").exists()
    with pytest.raises(UsageError, match="no synthetic set"):
        pipeline.evaluate_dir(str(out / "plots"), device="cpu")


def test_parse_overrides():
    got = pipeline.parse_overrides(["distill.iterations=20", "eval.epochs=5", "lr_img=0.5", "baseline.width=8",
                                    "data.train_per_class=[1, 2]"])
    assert got == {"distill": {"iterations": 20, "lr_img": 0.5}, "eval": {"epochs": 5}, "baseline": {"width": 8},
                   "data": {"train_per_class": [1, 2]}}
    with pytest.raises(UsageError):
        pipeline.parse_overrides(["nokey"])
    with pytest.raises(UsageError):
        pipeline.parse_overrides(["bogus.x=1"])


def test_sweep_runs_grid_and_skips_finished_cells(tmp_path, monkeypatch):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(f"""
dataset: digits
methods: [fake]
noise: ["sym:0.2", "sym:0.4"]
ipc: [2]
tad: [false]
seeds: [0]
preset: quick
device: cpu
quiet: true
out: {tmp_path / 'sw'}
baselines: [random_subset]
overrides:
  distill: {{iterations: 2}}
  eval: {{epochs: 2}}
""")
    spec = sweep.load_sweep(str(cfg))
    s1 = sweep.run_sweep(spec)
    assert s1["n_cells"] == 2 and s1["n_done"] == 2 and s1["n_failed"] == 0
    md = open(tmp_path / "sw" / "results.md").read()
    assert "| FAKE |" in md and "sym:0.2 @ IPC 2" in md and "sym:0.4 @ IPC 2" in md
    assert "random real subset, FAKE protocol" in md
    rows = open(tmp_path / "sw" / "results.csv").read().splitlines()
    assert rows[0] == "row,noise,ipc,mean,std,n" and len(rows) == 1 + 4
    m = json.load(open(tmp_path / "sw" / "fake" / "sym0.4" / "ipc2" / "seed0" / "metrics.json"))
    assert m["distill"]["iterations"] == 2
    # a rerun skips every finished cell
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: pytest.fail("a finished cell ran again"))
    s2 = sweep.run_sweep(spec)
    assert s2["n_done"] == 2
    assert open(tmp_path / "sw" / "results.md").read() == md
    dry = sweep.run_sweep(spec, dry_run=True)
    assert [c["state"] for c in dry["cells"]] == ["done", "done"]


def test_sweep_file_errors(tmp_path):
    with pytest.raises(UsageError, match="no such sweep file"):
        sweep.load_sweep(str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("methodz: [datm]\n")
    with pytest.raises(UsageError, match="unknown key"):
        sweep.load_sweep(str(bad))
    for text, match in (("overrides: [1, 2]\n", "'overrides' must map"),
                        ("method_overrides: {datm: 3}\n", "'method_overrides' must map"),
                        ("ipc: [abc]\n", "'ipc' entries must be integers"),
                        ("extra:\n  - {seeds: [x]}\n", "'seeds' entries must be integers")):
        bad.write_text(text)
        with pytest.raises(UsageError, match=match):
            sweep.load_sweep(str(bad))


def test_sweep_cell_folders_stay_inside_out(tmp_path):
    y = tmp_path / "s.yaml"
    y.write_text(f"noise: ['human:/../../../x', 'sym:0.4']\ntad: [false]\nout: {tmp_path / 'out'}\n")
    for c in sweep.expand_cells(sweep.load_sweep(str(y))):
        out = os.path.realpath(c["out"])
        assert out.startswith(os.path.realpath(tmp_path / "out") + os.sep), out
        assert ".." not in c["name"].split("/")


def test_sweep_table_shape():
    from ddfast.report import sweep_table

    def cell(method, tad, noise, d, r, f):
        return {"method": method, "tad": tad, "noise": noise, "ipc": 10, "seed": 0,
                "metrics": {"results": {"distilled": {"mean": d, "std": 1.0},
                                        "random_subset": {"mean": r, "std": 0.5},
                                        "full_noisy": {"mean": f, "std": 0.0}}}}

    cells = [cell("datm", False, "sym:0.4", 70.0, 60.0, 80.0), cell("datm", True, "sym:0.4", 75.0, 60.0, 80.0),
             cell("datm", False, "asym:0.4", 65.0, 55.0, 78.0)]
    md, rows = sweep_table(cells)
    lines = md.strip().splitlines()
    assert lines[0] == "| training data | sym:0.4 @ IPC 10 | asym:0.4 @ IPC 10 |"
    assert lines[2].startswith("| DATM | 70.00 ± 1.00 | **65.00 ± 1.00** |")
    assert lines[3].startswith("| DATM + TAD | **75.00 ± 1.00** | — |")
    assert any(l.startswith("| full noisy training set, last epoch | 80.00 ± 0.00 | 78.00 ± 0.00 |") for l in lines)
    assert sum(1 for l in lines if l.startswith("| random real subset, DATM protocol")) == 1


def test_full_data_baselines_match_ddfast_baselines(tmp_path):
    """The pipeline's full-data baselines (with per-epoch progress) are exactly ddfast.baselines.full_noisy / gce
    without it (the plain evaluation harness)."""
    from ddfast import baselines as bl
    from ddfast.augment import Normalize
    from ddfast.data import load_dataset
    from ddfast.noise import corrupt_labels

    ov = {"baseline": {"epochs": 1, "width": 8, "num_runs": 2}, "distill": {"iterations": 1},
          "eval": {"epochs": 1, "num_runs": 1}}
    m = pipeline.run(_cfg(tmp_path / "r", baselines=("full_noisy", "gce"), overrides=ov))
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    noisy = corrupt_labels(train.labels, "sym:0.4", 10, seed=0)
    ec = pipeline.BaselineConfig(epochs=1, width=8, num_runs=2).full_eval_config("cpu", 10, 0)
    norm = Normalize(train.mean, train.std)
    ref = bl.full_noisy(train, noisy, test, config=ec, transform=norm, holdout=0.1)
    assert m["results"]["full_noisy"]["accs"] == ref.accs
    ref = bl.gce(train, noisy, test, config=ec, transform=norm, q=0.7, holdout=0.1)
    assert m["results"]["gce"]["accs"] == ref.accs


def test_evaluation_during_distillation_is_plotted(tmp_path):
    m = pipeline.run(_cfg(tmp_path / "r", overrides={"distill": {"iterations": 4, "eval_every": 2},
                                                      "eval": {"progress_epochs": 2}}))
    h = json.load(open(tmp_path / "r" / "stages" / "distill.json"))["history"]
    assert [e["iteration"] for e in h if "test_acc" in e] == [2, 4]
    assert (tmp_path / "r" / "plots" / "accuracy.png").exists()
    assert m["files"]["plots"]["accuracy"] == os.path.join("plots", "accuracy.png")


def test_synset_grid_rows_by_distilled_class_and_frames_drifted_labels(tmp_path):
    """Soft labels whose argmax moved to another class stay in the row of the class they were distilled for
    (no blank cells, no hidden images) and are framed in red; hard labels are their own row."""
    from torchvision.io import read_image

    from ddfast.report import save_synset_grid, synset_grid_rows

    C, ipc, s = 3, 2, 16
    images = torch.zeros(C * ipc, 1, s, s)
    for i in range(C * ipc):
        images[i, :, 4:12, 4:12] = (i + 1) / (C * ipc)  # a distinct grey square per image
    logits = torch.full((C * ipc, C), -5.0)
    logits[torch.arange(C * ipc), torch.arange(C * ipc) // ipc] = 5.0
    logits[1] = torch.tensor([0.0, 0.0, 9.0])  # image 1 was distilled for class 0; its argmax is now class 2
    syn = SyntheticSet(images=images, labels=logits, num_classes=C, ipc=ipc, method="fake")
    assert synset_grid_rows(syn).tolist() == [0, 0, 1, 1, 2, 2]
    hard = SyntheticSet(images=images, labels=torch.tensor([0, 2, 1, 1, 2, 0]), num_classes=C, ipc=ipc,
                        method="fake")
    assert synset_grid_rows(hard).tolist() == [0, 2, 1, 1, 2, 0]

    img = read_image(save_synset_grid(syn, str(tmp_path / "g.png"))).float() / 255  # [3, H, W]
    scale = 64 // s
    cell, pad = s * scale, 2
    assert img.shape[1:] == (pad + C * (cell + pad), pad + ipc * (cell + pad))

    def cell_at(r, c):
        y0, x0 = pad + r * (cell + pad), pad + c * (cell + pad)
        return img[:, y0:y0 + cell, x0:x0 + cell]

    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1)
    for r in range(C):
        for c in range(ipc):
            i = r * ipc + c
            px = cell_at(r, c)
            centre = px[:, cell // 2, cell // 2]
            assert torch.allclose(centre, torch.full((3,), float(int((i + 1) / (C * ipc) * 255 + 0.5)) / 255), atol=1e-6)
            framed = bool(torch.allclose(px[:, 0, :], red.expand(3, cell)))
            assert framed == (i == 1), (r, c)


def test_sweep_extra_cells_and_the_noise_study_example(tmp_path):
    """``extra`` adds partial grids (missing axes from the main grid), without duplicates, a method's cells
    together; the shipped noise-study YAML expands to the study's 30 cells."""
    y = tmp_path / "s.yaml"
    y.write_text("methods: [datm, dance]\nnoise: ['sym:0.4', 'sym:0.8']\nipc: [10]\ntad: [false]\n"
                 f"out: {tmp_path / 'out'}\nextra:\n  - {{ipc: [50], noise: ['sym:0.8']}}\n"
                 "  - {ipc: [10], noise: ['sym:0.4']}\n")
    cells = sweep.expand_cells(sweep.load_sweep(str(y)))
    names = [c["name"] for c in cells]
    assert names == ["datm/sym0.4/ipc10/seed0", "datm/sym0.8/ipc10/seed0", "datm/sym0.8/ipc50/seed0",
                     "dance/sym0.4/ipc10/seed0", "dance/sym0.8/ipc10/seed0", "dance/sym0.8/ipc50/seed0"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("extra:\n  - {ipcs: [50]}\n")
    with pytest.raises(UsageError, match="unknown key"):
        sweep.load_sweep(str(bad))
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    study = sweep.expand_cells(sweep.load_sweep(os.path.join(here, "examples", "noise_study_fmnist.yaml")))
    assert len(study) == 3 * 8 + 3 * 2
    assert all(c["config"].baselines == ("full_noisy", "random_subset", "gce", "coteaching") for c in study)


def test_a_run_directory_is_locked_while_a_process_works_in_it(tmp_path):
    """A second process in the same --out gets one line naming the holder and the directory is left as it was; the
    lock goes with its holder; a failed claim of a new directory leaves nothing behind."""
    import subprocess
    import sys

    from ddfast.pipeline.stages import LOCK_FILE, RunDirLock

    out = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from ddfast.pipeline.stages import RunDirLock; "
        f"lock = RunDirLock({str(out)!r}).acquire(); print('locked', flush=True); sys.stdin.read()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # the holder lives until its stdin closes
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(os.listdir(out))
        with pytest.raises(UsageError, match=r"in use by another ddfast process \(pid \d+"):
            pipeline.run(_cfg(out))
        assert sorted(os.listdir(out)) == before  # nothing written
    finally:
        holder.kill()
        holder.wait()
    m = pipeline.run(_cfg(out))  # the lock died with its holder
    assert m["complete"] and not os.path.exists(out / (LOCK_FILE + ".owner"))
    # a directory that cannot be created: one line naming --out
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="cannot write there"):
        RunDirLock(str(blocker / "sub")).acquire()
    # a failed claim of a new directory removes it
    lock = RunDirLock(str(tmp_path / "new")).acquire()
    lock.release(failed=True)
    assert not (tmp_path / "new").exists()


def test_multi_formation_sets_report_both_sizes_and_an_equal_storage_decoded_baseline(tmp_path):
    """A set that decodes each stored image into f^2 training images: metrics and report give stored and training
    sizes, the headline compares at equal storage, and the random subset gets a decoded twin (same storage, same
    decoding)."""
    m = pipeline.run(_cfg(tmp_path / "f2", overrides={"distill": {"factor": 2, "iterations": 1},
                                                       "eval": {"epochs": 2, "num_runs": 1}}))
    res = m["results"]
    assert res["distilled"]["n_stored"] == 30 and res["distilled"]["n_images"] == 120
    assert res["random_subset"]["n_stored"] == 30 and res["random_subset"]["n_images"] == 30
    dec = res["random_subset_decoded"]
    assert dec["n_stored"] == 30 and dec["n_images"] == 120 and dec["eval"]["factor"] == 2
    text = open(tmp_path / "f2" / "report.md").read()
    assert "a random real subset of the same storage (30 images)" in text
    assert "random real images decoded as the distilled set is" in text
    assert "| stored images | training images |" in text
    m1 = pipeline.run(_cfg(tmp_path / "f1", overrides={"distill": {"iterations": 1},
                                                       "eval": {"epochs": 2, "num_runs": 1}}))
    assert "random_subset_decoded" not in m1["results"]
    assert m1["results"]["distilled"]["n_stored"] == m1["results"]["distilled"]["n_images"] == 30
