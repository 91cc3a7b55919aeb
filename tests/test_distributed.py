"""ddfast.distributed on CPU: two processes, gloo backend (torch.multiprocessing spawn, torchrun's env vars)."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from ddfast import distributed as dd


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
    sharded = dd.evaluate_sharded(xtr, ytr, (xte, yte), config=_eval_cfg(), transform=norm)
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


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist"))
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
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
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port",
                        str(_free_port()), "-m", "ddfast", "evaluate", str(out), "--json", "--quiet"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout)                     # one JSON document: only rank 0 printed
    assert got["accs"] == single["accs"] and len(got["accs"]) == 3
    assert got["eval"]["sharded_over_ranks"] == 2
    assert os.listdir(out / "evaluations") == ["convnet-3runs.json"]
