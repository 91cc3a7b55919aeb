"""The ``ddfast`` command: bad arguments (one line, exit 2, no traceback), end to end in a subprocess on digits
and a Fashion-MNIST slice, a run killed mid-way and rerun, ``evaluate`` and ``info``."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import _ddfast_fake
from ddfast import cli
from ddfast.distill.base import SyntheticSet

_ddfast_fake.register()

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.join(ROOT, "tests")
# `python -m ddfast` with the test-only `fake` method registered
FAKE_MAIN = ("import sys; sys.path.insert(0, {tests!r}); import _ddfast_fake; _ddfast_fake.register(); "
             "from ddfast.cli import main; sys.exit(main(sys.argv[1:]))").format(tests=TESTS)
FMNIST = os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz") or bool(
    os.environ.get("DDFAST_DATA"))


def _env(tmp_path, **extra):
    env = dict(os.environ)
    env.update({"DDFAST_CACHE": str(tmp_path / "cache"), "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", ""),
                "OMP_NUM_THREADS": "1"})
    env.pop("DDFAST_DEBUG", None)
    env.update(extra)
    return env


def _ddfast(tmp_path, *args, fake=False, env=None, **kw):
    cmd = [sys.executable, "-c", FAKE_MAIN] if fake else [sys.executable, "-m", "ddfast"]
    return subprocess.run(cmd + list(args), cwd=str(tmp_path), env=env or _env(tmp_path), capture_output=True,
                          text=True, timeout=kw.pop("timeout", 300), **kw)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DDFAST_DEBUG", raising=False)


# ----------------------------------------------------------------------------------------------------------
# bad arguments
# ----------------------------------------------------------------------------------------------------------
BAD = [
    (["run", "--dataset", "imagenet-22k"], "unknown dataset"),
    (["run", "--dataset", "digits", "--noise", "sym:1.0"], "rate"),
    (["run", "--dataset", "digits", "--noise", "sym:-0.2"], "rate"),
    (["run", "--dataset", "digits", "--noise", "sym:abc"], "sym:abc"),
    (["run", "--dataset", "digits", "--noise", "file", "--label-file", "missing.npy"], "no such file"),
    (["run", "--dataset", "digits", "--noise", "human:worse", "--label-file", "nope.pt"], "no such file"),
    (["run", "--dataset", "digits", "--ipc", "1000"], "larger than"),
    (["run", "--dataset", "digits", "--ipc", "0"], "ipc"),
    (["run", "--dataset", "digits", "--ipc", "ten"], "invalid integer"),
    (["run", "--dataset", "digits", "--method", "dc"], "unknown method"),
    (["run", "--dataset", "digits", "--preset", "medium"], "unknown preset"),
    (["run", "--dataset", "digits", "--baselines", "oracle"], "unknown baseline"),
    (["run", "--dataset", "digits", "--override", "nonsense"], "KEY=VALUE"),
    (["run", "--dataset", "digits", "-O", "distill.no_such_option=1"], "no_such_option"),
    (["run", "--dataset", "digits", "--tad", "-O", "tad.rounds=0"], "rounds"),
    (["run", "--dataset", "digits", "-O", "tad.rounds=2"], "without --tad"),
    (["run", "--dataset", "digits", "-O", "eval.epoch=3"], "unknown eval option"),
    (["run", "--dataset", "digits", "--device", "cuda:0"] if not torch.cuda.is_available()
     else ["run", "--dataset", "digits", "--device", "tpu"], "device"),
    (["run", "--bogus-flag"], "unrecognized arguments"),
    (["run", "--dataset", "digits", "--imbalance", "0"], "imbalance"),
    (["run", "--dataset", "digits", "--imbalance", "abc"], "imbalance"),
    (["evaluate", "no/such/dir"], "no synthetic set"),
    (["sweep", "missing.yaml"], "no such sweep file"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a[1:3]) or a[0] for a, _ in BAD])
def test_bad_arguments_one_line_error(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = cli.main(argv)
    cap = capsys.readouterr()
    assert rc == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert needle.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in cap.err and cap.out == ""
    assert not (tmp_path / "runs").exists()   # nothing written for a bad argument


def test_bad_argument_in_a_subprocess_and_debug_traceback(tmp_path):
    p = _ddfast(tmp_path, "run", "--dataset", "digits", "--noise", "sym:1.5")
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr
    assert p.stderr.startswith("ddfast: error:") and "rate" in p.stderr
    p = _ddfast(tmp_path, "run", "--dataset", "digits", "--noise", "sym:1.5", env=_env(tmp_path, DDFAST_DEBUG="1"))
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_resume_with_other_options_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["run", "--dataset", "digits", "--method", "fake", "--ipc", "2", "--out", "r", "--baselines", "none",
            "-O", "distill.iterations=1", "-O", "eval.epochs=1", "--quiet"]
    assert cli.main(args) == 0
    capsys.readouterr()
    rc = cli.main(args[:-3] + ["-O", "eval.epochs=2", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "another configuration" in err and "overrides" in err


# ----------------------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------------------
# tiny configs of the real distillers (a few seconds each) and of TAD
TINY = {
    "datm": ["distill.iterations=2", "distill.checkpoint_every=1", "distill.expert.num_experts=2", "distill.expert.epochs=2",
             "distill.syn_steps=2", "distill.current_max_start_epoch=1", "distill.max_start_epoch=1",
             "distill.expert_epochs=1", "distill.eval_epochs=2", "distill.eval_runs=2", "distill.expert.net.width=8"],
    "dance": ["distill.iterations=2", "distill.checkpoint_every=1", "distill.pool.amount=2",
              "distill.num_premodel=2", "distill.pool.epochs=1", "distill.pool.subset=200",
              "distill.pool.net.width=8", "distill.eval_width=8", "distill.eval_epochs=2", "distill.eval_runs=2",
              "distill.batch_real=16"],
    "rcig": ["distill.iterations=2", "distill.checkpoint_every=1", "distill.pool_model_count=2",
             "distill.max_online_steps=2", "distill.n_inner_steps=2", "distill.n_hinv_steps=2",
             "distill.real_batch_size=64", "distill.eval_steps=5", "distill.eval_warmup_steps=1", "distill.eval_runs=2",
             "distill.base_width=8"],
}
TINY_TAD = ["tad.rounds=2", "tad.scorer.warmup_epochs=0.5", "tad.scorer.refine_epochs=0.5", "tad.scorer.net.width=8",
            "tad.min_trusted_per_class=8"]
TINY_BASELINES = ["baseline.epochs=1", "baseline.width=8"]


def _overrides(items):
    return [a for item in items for a in ("-O", item)]


def test_run_end_to_end_on_digits_datm_tad(tmp_path):
    args = ["run", "--dataset", "digits", "--noise", "sym:0.4", "--method", "datm", "--tad", "--ipc", "2", "--seed",
            "1", "--out", "d", "--baselines", "random_subset,full_noisy,gce"]
    args += _overrides(TINY["datm"] + TINY_TAD + TINY_BASELINES)
    p = _ddfast(tmp_path, *args)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "d"
    m = json.load(open(out / "metrics.json"))
    for k in ("distilled", "random_subset", "full_noisy", "gce"):
        assert 0 <= m["results"][k]["mean"] <= 100 and m["results"][k]["accs"]
    assert m["noise"]["spec"] == "sym:0.4" and m["config"]["seed"] == 1 and m["config"]["tad"] is True
    rounds = m["tad"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1] and all(0 < r["n_trusted"] <= r["n"] for r in rounds)
    assert all(0 <= r["precision"] <= 1 for r in rounds)
    syn = SyntheticSet.load(str(out))
    assert syn.method == "datm" and syn.soft and syn.images.shape == (20, 1, 8, 8) and syn.lr is not None
    for f in ("synset_grid.png", "plots/loss.png", "plots/tad_trusted.png", "report.md"):
        assert (out / f).exists(), f
    report = (out / "report.md").read_text()
    assert "## TAD (trust-aware diversion) per round" in report and "GCE" in report
    # divert_pool="auto" (default): the posterior labels when the trusted set keeps less than 0.2 of a class (and
    # the posterior labels keep more), else DATM's experts diverted only above the estimated noise rate 0.5; said so
    summ = m["tad"]["summary"]
    assert summ["noise_rate_estimate"] == rounds[-1]["noise_rate_estimate"]
    if summ["divert_pool"] == "posterior":
        assert summ["min_class_share"] < 0.2 and f"keeps only {summ['min_class_share']:.2f}" in report
    else:
        assert summ["divert_pool"] is (summ["noise_rate_estimate"] > 0.5)
        assert f"estimated noise rate {summ['noise_rate_estimate']:.3f}" in report
    assert "distilled set" in p.stdout and "report:" in p.stdout
    assert "%|" in p.stderr            # tqdm progress bars on stderr
    # the same command again: finished, nothing recomputed, nothing printed with --quiet
    q = _ddfast(tmp_path, *args, "--quiet")
    assert q.returncode == 0 and q.stdout == "" and q.stderr == ""
    # evaluate the saved set again with its protocol: the same numbers
    e = _ddfast(tmp_path, "evaluate", "d", "--json")
    assert e.returncode == 0, e.stderr
    assert json.loads(e.stdout)["accs"] == m["results"]["distilled"]["accs"]


@pytest.mark.skipif(not FMNIST, reason="Fashion-MNIST files not installed")
@pytest.mark.parametrize("method,tad", [("dance", True), ("rcig", False)])
def test_run_end_to_end_on_a_fashion_mnist_slice(tmp_path, method, tad):
    args = ["run", "--dataset", "fashion-mnist", "--noise", "asym:0.4", "--method", method, "--ipc", "2",
            "--out", "f", "--baselines", "random_subset", "-O", "data.train_per_class=40", "-O", "data.test_limit=300",
            "--quiet"] + (["--tad"] + _overrides(TINY_TAD) if tad else []) + _overrides(TINY[method])
    p = _ddfast(tmp_path, *args)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.load(open(tmp_path / "f" / "metrics.json"))
    assert m["dataset"]["name"] == "fashion-mnist" and m["dataset"]["n_train"] == 400 and m["dataset"]["n_test"] == 300
    T = torch.tensor(m["noise"]["transition"])
    # Fashion-MNIST pairs: T-shirt<->Shirt, Pullover<->Coat, Sandal<->Sneaker; Trouser untouched
    assert T[0, 6] > 0.2 and T[6, 0] > 0.2 and T[1, 1] == 1.0
    assert m["tad"]["enabled"] is tad and (len(m["tad"]["rounds"]) == 2) is tad
    syn = SyntheticSet.load(str(tmp_path / "f"))
    assert syn.method == method and syn.num_classes == 10 and syn.images.shape[1:] == (1, 28, 28)
    assert 0 <= m["results"]["distilled"]["mean"] <= 100


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    args = ["run", "--dataset", "digits", "--method", "fake", "--ipc", "2", "--baselines", "random_subset",
            "-O", "distill.iterations=9", "--quiet"]
    ref = _ddfast(tmp_path, *args, "--out", "ref", fake=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    # slow steps; SIGKILL as soon as the first checkpoint (iteration 3) is on disk
    cmd = [sys.executable, "-c", FAKE_MAIN] + args + ["--out", "killed"]
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=_env(tmp_path, DDFAST_FAKE_STEP_SLEEP="0.4"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoints" / "checkpoint.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists()
    assert not (tmp_path / "killed" / "metrics.json").exists()
    assert not (tmp_path / "killed" / "report.md").exists()
    again = _ddfast(tmp_path, *args[:-1], "--out", "killed", fake=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resum" in again.stderr
    a, b = SyntheticSet.load(str(tmp_path / "ref")), SyntheticSet.load(str(tmp_path / "killed"))
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    ma = json.load(open(tmp_path / "ref" / "metrics.json"))
    mb = json.load(open(tmp_path / "killed" / "metrics.json"))
    assert ma["results"]["distilled"]["accs"] == mb["results"]["distilled"]["accs"]
    assert mb["resumed"] is True


def test_info(tmp_path, capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["environment"]["torch"] == torch.__version__
    assert {d["dataset"] for d in info["datasets"]} >= {"fashion-mnist", "digits"}
    assert next(d for d in info["datasets"] if d["dataset"] == "digits")["found"] is True
    assert set(info["presets"]) >= {"datm", "dance", "rcig"}
    assert all("error" not in v for v in info["presets"].values()), info["presets"]
    assert "has_cuda_kernels" in info and "extension" in info
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "datasets:" in out and "presets:" in out and "datm quick:" in out


def test_demo_configuration():
    from ddfast.pipeline import DEMO

    args = cli.build_parser().parse_args(["run"])
    cfg = cli._run_config(args)
    assert (cfg.dataset, cfg.noise, cfg.method, cfg.tad, cfg.ipc, cfg.preset, cfg.seed) == (
        "fashion-mnist", "sym:0.4", "datm", True, 10, "quick", 0)
    assert cfg.out == os.path.join("runs", "demo") and cfg.identity() == DEMO.identity()
    # any "what" argument leaves the demo: --tad is then opt-in and the out dir is derived from the options
    cfg = cli._run_config(cli.build_parser().parse_args(["run", "--method", "rcig", "--noise", "asym:0.2"]))
    assert cfg.tad is False and cfg.out == os.path.join("runs", "rcig-fashion-mnist-asym0.2-ipc10-s0")


def test_sweep_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text("""
dataset: digits
methods: [fake]
noise: ["sym:0.4"]
ipc: [2]
tad: [false]
seeds: [0, 1]
device: cpu
out: sw
baselines: [random_subset]
overrides: {distill: {iterations: 1}, eval: {epochs: 1}}
""")
    assert cli.main(["sweep", "s.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("todo") == 2 and "fake/sym0.4/ipc2/seed1" in out
    assert cli.main(["sweep", "s.yaml", "--quiet"]) == 0
    md = (tmp_path / "sw" / "results.md").read_text()
    assert "(2 seeds)" in md and "| FAKE |" in md
    assert cli.main(["sweep", "s.yaml"]) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier, skipped") == 2 and "| training data | sym:0.4 @ IPC 2 |" in out


def test_imbalance_option_reaches_the_run(tmp_path, monkeypatch, capsys):
    """--imbalance subsamples the training set to the long-tailed profile before the noise (metrics record the
    size), names the default run folder, and appears in the sweep's cell names."""
    monkeypatch.chdir(tmp_path)
    cfg = cli._run_config(cli.build_parser().parse_args(["run", "--dataset", "digits", "--imbalance", "0.25"]))
    assert cfg.imbalance == 0.25 and "-lt0.25-" in cfg.out and "--imbalance 0.25" in cfg.command()
    rc = cli.main(["run", "--dataset", "digits", "--method", "fake", "--ipc", "2", "--baselines", "none",
                   "--imbalance", "0.25", "--noise", "none", "--out", "r", "-O", "distill.iterations=1",
                   "-O", "eval.epochs=1", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    from ddfast.data import load_dataset, long_tailed_counts
    sizes = torch.bincount(load_dataset("digits").labels, minlength=10).tolist()
    assert m["dataset"]["n_train"] == sum(long_tailed_counts(sizes, 0.25))
    assert m["config"]["imbalance"] == 0.25 and "per_class" in m["results"]["distilled"]
    (tmp_path / "lt.yaml").write_text("dataset: digits\nmethods: [fake]\nnoise: [none]\nipc: [2]\ntad: [false]\n"
                                      "imbalance: [null, 0.1]\nout: sw\n")
    assert cli.main(["sweep", "lt.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "fake/none/ipc2/seed0" in out and "fake/none-lt0.1/ipc2/seed0" in out
    (tmp_path / "bad.yaml").write_text("dataset: digits\nimbalance: [2]\n")
    assert cli.main(["sweep", "bad.yaml", "--dry-run"]) == 2


def test_bad_label_files_one_line_naming_the_option(tmp_path, monkeypatch, capsys):
    """A corrupt or malicious .pt label file names --label-file and never suggests unsafe loading; an empty .txt
    file gives one line without library warnings."""
    import pickle

    monkeypatch.chdir(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil()))
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a torch file")
    (tmp_path / "empty.txt").write_text("")
    for name in ("evil.pt", "garbage.pt", "empty.txt"):
        rc = cli.main(["run", "--dataset", "digits", "--noise", "file", "--label-file", name, "--out", "r"])
        cap = capsys.readouterr()
        lines = cap.err.strip().splitlines()
        assert rc == 2 and len(lines) == 1, cap.err
        assert "--label-file" in lines[0] and "weights_only=False" not in lines[0] and "pwned" not in cap.out
        assert not (tmp_path / "r").exists()


def test_unwritable_out_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    rc = cli.main(["run", "--dataset", "digits", "--method", "fake", "--ipc", "2", "--baselines", "none",
                   "--out", "afile/sub", "-O", "distill.iterations=1", "-O", "eval.epochs=1", "--quiet"])
    cap = capsys.readouterr()
    assert rc == 2 and len(cap.err.strip().splitlines()) == 1 and "afile/sub" in cap.err


def test_corrupt_synthetic_set_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "run"
    d.mkdir()
    (d / "synset.json").write_text("{garbage")
    (d / "synset.safetensors").write_bytes(b"\x00")
    rc = cli.main(["evaluate", str(d)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "synset.json" in err[0] and "corrupt" in err[0], err


def test_images_too_small_for_the_network_fail_before_any_file(tmp_path, monkeypatch, capsys):
    """A dataset of 1x1-pixel images is refused with one line before the run directory is created."""
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    save_file({"images": torch.rand(40, 1, 1, 1, generator=g), "labels": torch.arange(40) % 2},
              str(tmp_path / "pixels.safetensors"))
    rc = cli.main(["run", "--dataset", "pixels.safetensors", "--method", "fake", "--ipc", "2", "--baselines", "none",
                   "--out", "r", "-O", "distill.iterations=1", "-O", "eval.epochs=1", "--quiet"])
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, cap.err
    assert "1x1 pixels" in lines[0] and "too small" in lines[0]
    assert not (tmp_path / "r").exists()
    # an empty dataset: one line naming the file, no library warning
    save_file({"images": torch.zeros(0, 1, 28, 28), "labels": torch.zeros(0, dtype=torch.long)},
              str(tmp_path / "empty.safetensors"))
    rc = cli.main(["run", "--dataset", "empty.safetensors", "--method", "fake", "--out", "r", "--quiet"])
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "empty.safetensors: no images" in lines[0], cap.err
    assert not (tmp_path / "r").exists()
