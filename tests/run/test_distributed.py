"""ddfast.distributed on CPU: two processes, gloo backend (torch.multiprocessing spawn, torchrun's env vars)."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from ddfast import distributed as dd
from ddfast.evaluate import evaluate_sharded


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_data():
    g = torch.Generator().manual_seed(0)
    # two separable blobs per class in an 8x8 image, plus a held-out test set
    C, n_tr, n_te = 3, 8, 30
    proto = torch.rand(C, 1, 8, 8, generator=g)
    ytr = torch.arange(C).repeat_interleave(n_tr)
    yte = torch.arange(C).repeat_interleave(n_te // C)
    xtr = (proto[ytr] + 0.3 * torch.rand(len(ytr), 1, 8, 8, generator=g)).clamp(0, 1)
    xte = (proto[yte] + 0.3 * torch.rand(len(yte), 1, 8, 8, generator=g)).clamp(0, 1)
    return xtr, ytr, xte, yte


def _eval_cfg():
    from ddfast.evaluate import EvalConfig

    return EvalConfig(model="convnet", model_kwargs={"width": 8, "depth": 2}, lr=0.05, epochs=3, num_runs=3,
                      batch_size=8, dsa=True, dsa_strategy="color_crop_flip", vmap=False, num_classes=3, seed=5)


def _worker(rank, world, port, out_dir):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    assert dd.init_from_env("cpu") is True
    res = {"rank": dd.rank(), "world": dd.world_size(), "is_main": dd.is_main()}

    # all_reduce_mean_: coalesced over dtypes, None skipped, in place
    a = torch.full((2, 3), float(rank + 1))
    b = torch.arange(4, dtype=torch.float64) * (rank + 1)
    ret = dd.all_reduce_mean_([a, None, b])
    res["mean_a"] = a.tolist()
    res["mean_b"] = b.tolist()
    res["same_objects"] = ret[0] is a and ret[1] is b
    s = torch.tensor([float(rank)])
    dd.all_reduce_sum_([s])
    res["sum"] = float(s)

    # sharding and gathering
    res["shard"] = dd.shard(list("abcdefg"))
    res["gathered"] = dd.gather_by_index(7, {i: i * i for i in dd.shard_indices(7)})
    res["bcast"] = dd.broadcast_object({"from": rank})
    t = torch.full((3,), float(rank))
    dd.broadcast_([t])
    res["bcast_tensor"] = t.tolist()
    res["rank_gen"] = float(torch.rand(1, generator=dd.rank_generator(3)))

    # sharded evaluation == the single-process loop
    from ddfast.augment import Normalize
    from ddfast.evaluate import evaluate_synset

    xtr, ytr, xte, yte = _tiny_data()
    norm = Normalize([0.5], [0.25])
    sharded = evaluate_sharded(xtr, ytr, (xte, yte), config=_eval_cfg(), transform=norm)
    res["sharded_accs"] = sharded.accs
    res["sharded_mean"] = sharded.mean
    if rank == 0:
        single = evaluate_synset(xtr, ytr, (xte, yte), config=_eval_cfg(), transform=norm)
        res["single_accs"] = single.accs
        res["single_mean"] = single.mean
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dd.barrier()
    dd.destroy()


def _spawn_two(worker, tmp_path_factory, name: str) -> str:
    """Runs ``worker(rank, 2, port, out)`` in 2 gloo processes; returns their output folder."""
    out = str(tmp_path_factory.mktemp(name))
    mp.spawn(worker, args=(2, _free_port(), out), nprocs=2, join=True)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = _spawn_two(_worker, tmp_path_factory, "dist")
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]


def test_ranks_and_world(two_ranks):
    assert [r["rank"] for r in two_ranks] == [0, 1]
    assert all(r["world"] == 2 for r in two_ranks)
    assert [r["is_main"] for r in two_ranks] == [True, False]


def test_all_reduce_mean_averages_in_place(two_ranks):
    for r in two_ranks:
        assert r["mean_a"] == [[1.5] * 3] * 2          # (1 + 2) / 2
        assert r["mean_b"] == [0.0, 1.5, 3.0, 4.5]     # arange * (1 + 2) / 2
        assert r["same_objects"]
        assert r["sum"] == 1.0


def test_shard_partitions_round_robin(two_ranks):
    assert two_ranks[0]["shard"] == list("aceg")
    assert two_ranks[1]["shard"] == list("bdf")
    for r in two_ranks:
        assert r["gathered"] == [i * i for i in range(7)]
        assert r["bcast"] == {"from": 0}
        assert r["bcast_tensor"] == [0.0, 0.0, 0.0]
    assert two_ranks[0]["rank_gen"] != two_ranks[1]["rank_gen"]


def test_sharded_evaluation_equals_unsharded(two_ranks):
    r0, r1 = two_ranks
    assert r0["sharded_accs"] == r1["sharded_accs"]     # every rank gets all runs, in run order
    assert len(r0["sharded_accs"]) == 3
    assert r0["sharded_accs"] == r0["single_accs"]
    assert r0["sharded_mean"] == pytest.approx(r0["single_mean"], abs=1e-9)


def test_single_process_fallbacks():
    assert not dd.is_distributed()
    assert dd.rank() == 0 and dd.world_size() == 1 and dd.is_main()
    t = torch.ones(3)
    assert dd.all_reduce_mean_([t])[0] is t and t.tolist() == [1.0, 1.0, 1.0]
    assert dd.shard(range(5)) == [0, 1, 2, 3, 4]
    assert dd.shard(range(5), rank_=1, world=2) == [1, 3]
    assert dd.gather_by_index(2, {0: "a", 1: "b"}) == ["a", "b"]
    with pytest.raises(RuntimeError):
        dd.gather_by_index(3, {0: "a"})
    with pytest.raises(ValueError):
        dd.shard_indices(4, rank_=2, world=2)
    with pytest.raises(TypeError):
        dd.all_reduce_mean_([torch.arange(3)])
    assert dd.init_from_env("cpu") is False  # no WORLD_SIZE in the environment


def test_torchrun_evaluate_matches_single_process(tmp_path, monkeypatch):
    """`torchrun --nproc-per-node=2 -m ddfast evaluate DIR`: gloo on CPU, runs sharded, rank 0 prints/writes."""
    import subprocess
    import sys

    import _ddfast_fake
    from ddfast import pipeline

    _ddfast_fake.register()
    monkeypatch.setenv("DDFAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    pipeline.run(pipeline.RunConfig(dataset="digits", method="fake", tad=False, ipc=2, out=str(out), device="cpu",
                                    baselines=(), quiet=True, overrides={"distill": {"iterations": 2, "eval_runs": 3}}))
    single = pipeline.evaluate_dir(str(out), device="cpu", quiet=True, write=False, overrides={"vmap": False})
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port",
                        str(_free_port()), "-m", "ddfast", "evaluate", str(out), "--json", "--quiet"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout)                     # one JSON document: only rank 0 printed
    assert got["accs"] == single["accs"] and len(got["accs"]) == 3
    assert got["eval"]["sharded_over_ranks"] == 2
    assert os.listdir(out / "evaluations") == ["convnet-3runs.json"]


# ----------------------------------------------------------------------------------------------------------
# DATM: sharded expert buffer, trajectory-parallel distillation
# ----------------------------------------------------------------------------------------------------------
_DATM_ITERS = 4
_DATM_THRESHOLD = 0.78  # between the two segments' losses of some iterations: the per-segment gate is exercised


def _datm_train():
    from ddfast.distill.base import TrainSet

    xtr, ytr, _, _ = _tiny_data()
    return TrainSet(xtr, ytr, 3, (0.5,), (0.25,), "tiny")


def _datm_cfg(**kw):
    from ddfast.distill.datm import DATMConfig

    base = dict(ipc=2, iterations=_DATM_ITERS, preprocess="normalize",
                expert=dict(net=dict(width=8, depth=2), num_experts=3, epochs=3, batch_size=8, optimizer="gsam",
                            lr=0.05), syn_steps=3, expert_epochs=1, batch_syn=4, min_start_epoch=0, max_start_epoch=2, sequential_generation=False,
                dsa_strategy="color_crop_flip", pix_init="real", label_init="correct_experts", lr_img=10.0,
                lr_lr=1e-4, lr_y=1.0, threshold=_DATM_THRESHOLD, checkpoint_every=2, seed=3)
    base.update(kw)
    return DATMConfig.from_dict(base)


def _datm_worker(rank, world, port, out_dir):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    assert dd.init_from_env("cpu") is True
    from ddfast.distill.datm import DATM
    from ddfast.distill.experts import train_experts

    train = _datm_train()
    cfg = _datm_cfg()
    mem = train_experts(cfg.expert, train.images, train.labels, 3, dsa_strategy=cfg.dsa_strategy)
    disk = train_experts(cfg.expert, train.images, train.labels, 3, dsa_strategy=cfg.dsa_strategy,
                         directory=os.path.join(out_dir, "experts"), key={"test": 1})
    res = {"experts_mem": torch.stack([mem.trajectory(k) for k in range(3)]),
           "experts_disk": torch.stack([disk.trajectory(k) for k in range(3)])}

    d = DATM(_datm_cfg(), cache_dir=os.path.join(out_dir, "cache"), quiet=True)
    syn = d.run(train)
    res.update({"images": syn.images, "labels": syn.labels, "lr": torch.tensor(syn.lr),
                "datm_experts": torch.stack([d.experts.trajectory(k) for k in range(3)])})
    hist = d.history
    # interrupted after 2 iterations (checkpoint written by every rank, identical) and resumed to the end
    ck = os.path.join(out_dir, "ckpt")
    DATM(_datm_cfg(), cache_dir=os.path.join(out_dir, "cache"), quiet=True).run(train, iterations=2,
                                                                              checkpoint_dir=ck)
    resumed = DATM(_datm_cfg(), cache_dir=os.path.join(out_dir, "cache"), quiet=True).run(train, checkpoint_dir=ck)
    res["resumed_images"] = resumed.images
    torch.save(res, os.path.join(out_dir, f"datm{rank}.pt"))
    with open(os.path.join(out_dir, f"datm{rank}.json"), "w") as f:
        json.dump({"history": hist, "manifest": json.load(open(os.path.join(out_dir, "experts", "manifest.json")))},
                  f)
    dd.barrier()
    dd.destroy()


@pytest.fixture(scope="module")
def datm_two_ranks(tmp_path_factory):
    out = _spawn_two(_datm_worker, tmp_path_factory, "dist_datm")
    return [(torch.load(os.path.join(out, f"datm{r}.pt"), weights_only=True),
             json.load(open(os.path.join(out, f"datm{r}.json")))) for r in range(2)]


def _meta_grad(ref, X, Y, lr, expert, start, plan):
    """One segment's matching loss and its gradient w.r.t. ``(X, Y, lr)``: plain autograd through the unrolled
    inner SGD steps (MTT eq. 2, soft cross entropy), written out here rather than taken from the distiller."""
    from ddfast.augment import DSA
    from ddfast.models import functional_forward

    cfg = ref.config
    theta0 = ref.experts.snapshot(expert, start).clone()
    target = ref.experts.snapshot(expert, start + cfg.expert_epochs)
    dsa = DSA(cfg.dsa_strategy)
    cur = theta0.clone().requires_grad_(True)
    for idx, seed in plan:
        z = functional_forward(ref._template, cur, dsa(X[idx], seed))
        ce = -(torch.softmax(Y[idx], 1) * torch.log_softmax(z, 1)).sum(1).mean()
        (g,) = torch.autograd.grad(ce, cur, create_graph=True)
        cur = cur - lr * g
    loss = (cur - target).square().sum() / (theta0 - target).square().sum()
    return float(loss.detach()), torch.autograd.grad(loss, [X, Y, lr])


@pytest.fixture(scope="module")
def datm_reference():
    """One process doing both ranks' work: the two segments of every iteration, each segment's meta-gradient,
    the gate per segment, the mean of the accepted gradients and DATM's three SGD optimisers."""
    from ddfast.distill.datm import DATM

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = _datm_cfg()
        ref = DATM(cfg, quiet=True)
        ref.initialize(_datm_train())
        X = ref.image_syn.detach().clone().requires_grad_(True)
        Y = ref.label_syn.detach().clone().requires_grad_(True)
        lr = ref.syn_lr.detach().clone().requires_grad_(True)
        X0 = X.detach().clone()
        opts = [torch.optim.SGD([X], lr=cfg.lr_img, momentum=0.5), torch.optim.SGD([lr], lr=cfg.lr_lr, momentum=0.5),
                torch.optim.SGD([Y], lr=cfg.lr_y, momentum=cfg.momentum_y)]
        losses, rejected = [], []
        for it in range(_DATM_ITERS):
            ref.iteration = it
            segments, plan = ref.draw_segments(2)
            out = [_meta_grad(ref, X, Y, lr, k, t, plan) for k, t in segments]
            ok = [loss <= cfg.threshold for loss, _ in out]
            losses.append((out[0][0] + out[1][0]) / 2)
            rejected.append(1.0 - sum(ok) / 2)
            if any(ok):
                for i, p in enumerate((X, Y, lr)):
                    p.grad = sum(g[i] for (_, g), o in zip(out, ok) if o) / sum(ok)
                for o in opts:
                    o.step()
    finally:
        torch.set_num_threads(old)
    return {"images": X.detach(), "labels": Y.detach(), "lr": lr.detach(), "initial": X0, "losses": losses,
            "rejected": rejected, "experts": torch.stack([ref.experts.trajectory(k) for k in range(3)])}


def test_datm_ranks_keep_identical_synthetic_sets(datm_two_ranks, datm_reference):
    (r0, j0), (r1, j1) = datm_two_ranks
    for key in ("images", "labels", "lr", "resumed_images"):
        assert torch.equal(r0[key], r1[key]), key
    assert j0["history"] == j1["history"]                 # rank-mean metrics, the same on every rank
    assert len(j0["history"]) == _DATM_ITERS
    assert j0["history"][-1]["faults"] < _DATM_ITERS      # something was updated ...
    assert not torch.allclose(r0["images"], datm_reference["initial"], atol=1e-3)  # ... and moved the images
    assert torch.equal(r0["resumed_images"], r0["images"])  # interrupted + resumed == uninterrupted


def test_datm_two_ranks_equal_mean_of_both_meta_gradients(datm_two_ranks, datm_reference):
    (r0, j0), _ = datm_two_ranks
    ref = datm_reference
    hist = j0["history"]
    assert [h["loss"] for h in hist] == pytest.approx(ref["losses"], rel=1e-5)
    assert [h["fault"] for h in hist] == ref["rejected"]
    assert {0.0, 0.5} <= set(ref["rejected"])             # both segments kept, and only one of two kept
    torch.testing.assert_close(r0["images"], ref["images"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r0["labels"], ref["labels"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r0["lr"], ref["lr"], rtol=1e-6, atol=1e-9)


def test_sharded_expert_buffer_equals_single_process(datm_two_ranks, datm_reference):
    from ddfast.distill.experts import train_experts

    train = _datm_train()
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = _datm_cfg()
        single = train_experts(cfg.expert, train.images, train.labels, 3, dsa_strategy=cfg.dsa_strategy)
    finally:
        torch.set_num_threads(old)
    want = torch.stack([single.trajectory(k) for k in range(3)])
    for res, info in datm_two_ranks:
        assert torch.equal(res["experts_mem"], want)       # gathered in memory
        assert torch.equal(res["experts_disk"], want)      # through the cache directory
        assert torch.equal(res["datm_experts"], datm_reference["experts"])
        assert sorted(info["manifest"]["stats"]) == ["0", "1", "2"]   # rank 1's expert statistics too
        assert info["manifest"]["stats"] == {str(k): single.meta["stats"][str(k)] for k in range(3)}
