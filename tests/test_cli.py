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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    (["run", "--dataset", "digits", "--device", "cuda:0"] if not torch.cuda.is_available()
     else ["run", "--dataset", "digits", "--device", "tpu"], "device"),
    (["run", "--bogus-flag"], "unrecognized arguments"),
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
def test_run_end_to_end_on_digits(tmp_path):
    p = _ddfast(tmp_path, "run", "--dataset", "digits", "--noise", "sym:0.4", "--method", "fake", "--ipc", "3",
                "--seed", "1", "--out", "d", "--baselines", "random_subset,full_noisy,noisy_learner",
                "-O", "baseline.epochs=1", "-O", "baseline.width=8", fake=True)
    assert p.returncode == 0, p.stderr[-2000:]
    out = tmp_path / "d"
    m = json.load(open(out / "metrics.json"))
    for k in ("distilled", "random_subset", "full_noisy", "noisy_learner"):
        assert 0 <= m["results"][k]["mean"] <= 100 and m["results"][k]["accs"]
    assert m["noise"]["spec"] == "sym:0.4" and m["config"]["seed"] == 1
    assert "distilled set" in p.stdout and "report:" in p.stdout
    assert "%|" in p.stderr            # tqdm progress bars on stderr
    report = (out / "report.md").read_text()
    assert "noisy-label learner" in report and "GCE" in report
    # --quiet: nothing on stdout/stderr
    q = _ddfast(tmp_path, "run", "--dataset", "digits", "--noise", "sym:0.4", "--method", "fake", "--ipc", "3",
                "--seed", "1", "--out", "d", "--baselines", "random_subset,full_noisy,noisy_learner",
                "-O", "baseline.epochs=1", "-O", "baseline.width=8", "--quiet", fake=True)
    assert q.returncode == 0 and q.stdout == "" and q.stderr == ""
    # evaluate the saved set again: same protocol, same numbers
    e = _ddfast(tmp_path, "evaluate", "d", "--json")
    assert e.returncode == 0, e.stderr
    assert json.loads(e.stdout)["accs"] == m["results"]["distilled"]["accs"]


@pytest.mark.skipif(not FMNIST, reason="Fashion-MNIST files not installed")
def test_run_end_to_end_on_a_fashion_mnist_slice(tmp_path):
    p = _ddfast(tmp_path, "run", "--dataset", "fashion-mnist", "--noise", "asym:0.4", "--method", "fake", "--ipc",
                "2", "--out", "f", "--baselines", "random_subset", "-O", "data.train_per_class=40",
                "-O", "data.test_limit=300", "-O", "distill.iterations=3", "--quiet", fake=True)
    assert p.returncode == 0, p.stderr[-2000:]
    m = json.load(open(tmp_path / "f" / "metrics.json"))
    assert m["dataset"]["name"] == "fashion-mnist" and m["dataset"]["n_train"] == 400 and m["dataset"]["n_test"] == 300
    T = torch.tensor(m["noise"]["transition"])
    # Fashion-MNIST pairs: T-shirt<->Shirt, Pullover<->Coat, Sandal<->Sneaker; Trouser untouched
    assert T[0, 6] > 0.2 and T[6, 0] > 0.2 and T[1, 1] == 1.0
    syn = SyntheticSet.load(str(tmp_path / "f"))
    assert syn.images.shape == (20, 1, 28, 28)


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


def test_info(tmp_path):
    p = _ddfast(tmp_path, "info", "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["environment"]["torch"] == torch.__version__
    assert {d["dataset"] for d in info["datasets"]} >= {"fashion-mnist", "digits"}
    assert next(d for d in info["datasets"] if d["dataset"] == "digits")["found"] is True
    assert set(info["presets"]) >= {"datm", "dance", "rcig"}
    assert "has_cuda_kernels" in info and "extension" in info
    p = _ddfast(tmp_path, "info")
    assert p.returncode == 0 and "datasets:" in p.stdout and "presets:" in p.stdout


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
