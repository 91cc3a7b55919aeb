"""ddfast.privacy: nearest neighbours against brute force, the attack's AUC and TPR against independent
computations, and ``ddfast privacy DIR`` end to end on digits."""
import json

import pytest
import torch
from sklearn.metrics import roc_auc_score

import _ddfast_fake
from ddfast import privacy as P

_ddfast_fake.register()


def test_nearest_neighbours_against_brute_force():
    g = torch.Generator().manual_seed(0)
    refs = torch.rand(300, 1, 6, 6, generator=g)
    queries = torch.cat([torch.rand(40, 1, 6, 6, generator=g), refs[[7, 123]] + 1e-4])  # two near copies
    d, i = P.nearest_neighbours(queries, refs, chunk=16)
    for k in range(queries.shape[0]):  # float64 loop over every reference
        dd = torch.stack([(queries[k].double() - r.double()).pow(2).sum().sqrt() for r in refs])
        assert int(i[k]) == int(dd.argmin()) and float(d[k]) == pytest.approx(float(dd.min()), rel=1e-12)
    assert i[-2:].tolist() == [7, 123] and float(d[-1]) < 1e-3
    dup = torch.cat([refs[:5], refs[:5]])  # exact ties: the lower index
    assert P.nearest_neighbours(refs[:5], dup)[1].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="empty"):
        P.nearest_neighbours(queries, refs[:0])
    with pytest.raises(ValueError, match="NaN"):
        P.nearest_neighbours(queries * float("nan"), refs)


def test_membership_attack_against_references():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(500, generator=g) + 0.7
    n = torch.randn(400, generator=g)
    n[:20] = m[:20]  # some ties
    r = P.membership_attack(m, n)
    y = [1] * 500 + [0] * 400
    assert r["auc"] == pytest.approx(roc_auc_score(y, torch.cat([m, n]).numpy()), abs=1e-12)
    # AUC = P(member score > non-member score) + P(tie) / 2, by counting all pairs
    diff = m.view(-1, 1) - n.view(1, -1)
    assert r["auc"] == pytest.approx(float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean()), abs=1e-12)
    # TPR at <= 1 % FPR by a slow sweep over every threshold
    best = 0.0
    for t in torch.cat([m, n]).unique():
        fpr = float((n >= t).double().mean())
        if fpr <= 0.01:
            best = max(best, float((m >= t).double().mean()))
    assert r["tpr_at_fpr"] == pytest.approx(best, abs=1e-12)
    assert P.membership_attack(n, n)["auc"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        P.membership_attack(m[:0], n)


def test_privacy_command_on_digits(tmp_path, monkeypatch, capsys):
    from ddfast import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DDFAST_CACHE", str(tmp_path / "cache"))
    assert cli.main(["run", "--dataset", "digits", "--method", "fake", "--ipc", "2", "--baselines", "none",
                     "--out", "r", "-O", "distill.iterations=1", "-O", "eval.epochs=1", "--quiet"]) == 0
    rc = cli.main(["privacy", "r", "--samples", "50", "--reference-epochs", "1", "--quiet"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    res = json.loads((tmp_path / "r" / "privacy.json").read_text())
    assert res["n_samples"] == 50 and res["attack"]["distilled"]["n_members"] == 50
    assert 0.0 <= res["attack"]["full_noisy"]["auc"] <= 1.0 and res["feature"] is not None
    assert len(res["pairs"]) == 8 and (tmp_path / "r" / "privacy_pairs.png").stat().st_size > 0
    report = (tmp_path / "r" / "report.md").read_text()
    assert report.count("## Privacy") == 1 and "## Reproduce" in report  # the section is added once
    assert cli.main(["privacy", "r", "--samples", "50", "--no-reference", "--quiet"]) == 0
    report = (tmp_path / "r" / "report.md").read_text()
    assert report.count("## Privacy") == 1 and "## Reproduce" in report
    assert cli.main(["privacy", str(tmp_path / "nope")]) == 2
