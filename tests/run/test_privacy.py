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


def test_class_matched_members_and_non_members():
    g = torch.Generator().manual_seed(4)
    mem_idx = torch.randperm(200, generator=g)[:90]
    mem_lab = torch.cat([torch.zeros(80), torch.ones(5), torch.full((5,), 3)]).long()  # a long-tailed mix
    test_lab = torch.cat([torch.zeros(50), torch.ones(50), torch.full((40,), 2)]).long()[torch.randperm(140, generator=g)]
    m, n = P.class_matched(mem_idx, mem_lab, test_lab, g)
    lab_of = dict(zip(mem_idx.tolist(), mem_lab.tolist()))
    m_lab = torch.tensor([lab_of[i] for i in m.tolist()])
    assert m.numel() == n.numel() == 55  # 50 of class 0 (the test set has 50), 5 of class 1, none of class 3
    for c, k in ((0, 50), (1, 5), (2, 0), (3, 0)):  # the same count per class on both sides
        assert int((m_lab == c).sum()) == k and int((test_lab[n] == c).sum()) == k
    assert m[:50].tolist() == mem_idx[:80].tolist()[:50]  # members kept in their given (random) order
    assert n.unique().numel() == n.numel()


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
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["privacy"] == res  # replaced the run's audit
    assert res["n_samples"] == 50 and res["attack"]["distilled"]["n_members"] == 50
    assert 0.0 <= res["attack"]["full_noisy"]["auc"] <= 1.0 and res["feature"] is not None
    assert len(res["pairs"]) == 8 and (tmp_path / "r" / "privacy_pairs.png").stat().st_size > 0
    report = (tmp_path / "r" / "report.md").read_text()
    assert report.count("## Privacy") == 1 and "## Reproduce" in report  # the run's section is replaced
    assert cli.main(["privacy", "r", "--samples", "50", "--no-reference", "--quiet"]) == 0
    report = (tmp_path / "r" / "report.md").read_text()
    assert report.count("## Privacy") == 1 and "## Reproduce" in report
    assert cli.main(["privacy", str(tmp_path / "nope")]) == 2


def test_audit_member_pool(monkeypatch):
    from ddfast.data import load_dataset
    from ddfast.distill.base import SyntheticSet

    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test")
    syn = SyntheticSet(images=train.images[:20].clone(), labels=train.labels[:20].clone(), ipc=2,
                       num_classes=10, method="fake", eval_config={"model": "convnet", "epochs": 1, "model_kwargs": {"width": 4}})
    pool = torch.arange(30)
    res = P.audit(syn, train, train.labels, test, n_samples=50, member_pool=pool)
    assert res["n_samples"] == 30 and res["attack"]["distilled"]["n_members"] == 30
    with pytest.raises(ValueError, match="member_pool"):
        P.audit(syn, train, train.labels, test, n_samples=5, member_pool=torch.tensor([0, len(train)]))


def test_reference_network_is_the_full_noisy_baselines_run_0():
    from ddfast import baselines as B
    from ddfast.data import load_dataset
    from ddfast.noise import corrupt_labels

    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test")
    noisy = corrupt_labels(train.labels, "sym:0.4", num_classes=10, seed=3)
    cfg = B.BaselineConfig(epochs=2, width=8)
    keep = []
    B.run_baseline("full_noisy", train, noisy, test, config=cfg, ipc=1, subset_config=None, keep_model=keep,
                   seed=1)
    model, norm, members = B.reference_network(train, noisy, config=cfg, seed=1)
    a, b = keep[0].state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same network, retrained
    tr, ho = B.holdout_split(len(train), cfg.holdout, 1)
    assert torch.equal(members, tr) and ho.numel() == round(cfg.holdout * len(train))
    again, _, _ = B.reference_network(train, noisy, config=cfg, seed=1, state=a)  # rebuilt from the state dict
    x = norm(test.images[:64].float())
    with torch.no_grad():
        assert torch.equal(again(x), keep[0](x))


def test_every_run_has_a_privacy_section_and_shares_the_reference(tmp_path, monkeypatch):
    from ddfast import cli
    from ddfast.pipeline import stages

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DDFAST_CACHE", str(tmp_path / "cache"))
    calls = []
    real = stages.reference_network
    monkeypatch.setattr(stages, "reference_network",
                        lambda *a, **k: calls.append(k.get("state") is not None) or real(*a, **k))
    common = ["--dataset", "digits", "--method", "fake", "--ipc", "2", "--quiet", "-O", "distill.iterations=1",
              "-O", "eval.epochs=1", "-O", "baseline.epochs=2", "-O", "baseline.width=8"]
    assert cli.main(["run", *common, "--baselines", "full_noisy", "--out", "a"]) == 0
    assert calls == [True]  # the baseline saved its network; the audit read it
    assert list((tmp_path / "cache" / "baselines").glob("full_noisy-*.model.safetensors"))
    ra = json.loads((tmp_path / "a" / "privacy.json").read_text())
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert ma["privacy"]["attack"] == ra["attack"] and ra["reference"]["epochs"] == 2
    assert "## Privacy" in (tmp_path / "a" / "report.md").read_text() and (tmp_path / "a" / "privacy_pairs.png").exists()
    # another run on the same noisy labels without the baseline: the cached network again
    assert cli.main(["run", *common, "--baselines", "none", "--seed", "0", "--out", "b", "-O",
                     "eval.lr=0.02"]) == 0
    assert calls == [True, True]
    rb = json.loads((tmp_path / "b" / "privacy.json").read_text())
    assert rb["attack"]["full_noisy"] == ra["attack"]["full_noisy"] and rb["feature"]["test"] == ra["feature"]["test"]
    # without the cache entry the network is trained, and is the same network
    for f in (tmp_path / "cache" / "baselines").glob("*.model.safetensors"):
        f.unlink()
    assert cli.main(["run", *common, "--baselines", "none", "--out", "c", "-O", "eval.lr=0.03"]) == 0
    assert calls == [True, True, False]
    rc = json.loads((tmp_path / "c" / "privacy.json").read_text())
    assert rc["attack"]["full_noisy"] == ra["attack"]["full_noisy"]
    # --no-privacy: no audit, no section
    assert cli.main(["run", *common, "--baselines", "none", "--out", "d", "--no-privacy"]) == 0
    assert not (tmp_path / "d" / "privacy.json").exists()
    assert "## Privacy" not in (tmp_path / "d" / "report.md").read_text() and calls == [True, True, False]
