"""One run across processes (torch.distributed, gloo on 127.0.0.1) and the engine's memory
planning.

- 2 processes vs 1 over the same data, float64: every rank's spectra identical, and equal to
  one process's within 1e-8 relative; DDP training (uneven and empty shards) equal to one
  process's within 1e-12; sharded evaluation equal.
- ``torchrun -m layerhessians train`` with 2 processes: only rank 0 writes the run
  directory (checked with an audit hook), the trajectory and spectra match one process
  within the documented float32 tolerance, and a SIGKILLed 2-process run resumes to
  bit-identical results.
- Micro-batched products and spectra equal single-batch ones (float64, 1e-10); the
  budget decisions (micro-batch size, graph reuse, ``reorthogonalize="auto"``); the Hessian
  set's size options.
"""

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from data_fixtures import mnist_arrays, write_mnist
from layerhessians import load_run
from layerhessians.cli.main import main
from layerhessians.curvature import (
    GraphCost,
    hessian_operator,
    measure_graph_cost,
    split_batches,
)
from layerhessians.curvature.memory import parse_budget, plan_micro_batches
from layerhessians.data import TensorData, hessian_subset
from layerhessians.errors import UserError
from layerhessians.spectra import lanczos, layer_operators, layer_spectra, start_vector
from layerhessians.spectra.plan import basis_bytes, choose_reorthogonalize, plan_memory
from layerhessians.training.config import HessianConfig, TrainConfig
from layerhessians.training.distributed import (
    SINGLE,
    Context,
    process_group,
    shard_indices,
)
from layerhessians.training.loop import CRASH_ENV, evaluate, train_epoch
from layerhessians.training.setup import Setup, make_optimizer

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]  # tests/: the shared problem registry
HERE = Path(__file__).resolve().parent  # this module, imported by the worker processes
CE = nn.CrossEntropyLoss()
TIMEOUT = 180  # seconds for a whole multi-process launch
SECONDS = ["train_seconds", "spectra_seconds", "eval_seconds"]
#: documented float32 tolerance of a 2-process run against one process (LeNet, 2 epochs
#: of 4 steps at lr 0.02): relative difference of losses and of spectra nodes (observed:
#: ~1.5e-7; float32 rounding of the reduction order, growing with steps and learning rate)
TRAJECTORY_RTOL = 1e-5



# ----------------------------------------------------------------------------- launching
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(TESTS), str(HERE),
                                          os.environ.get("PYTHONPATH", "")]),
           "TQDM_DISABLE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", CRASH_ENV):
        env.pop(key, None)
    if Path("/sys/class/net/lo").exists():  # gloo on loopback whatever the hostname resolves to
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _wait(procs, timeout=TIMEOUT):
    """Wait for all; on a timeout kill every process group started here and fail."""
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        pytest.fail(f"a distributed launch did not finish within {timeout} s")
    return [(proc.returncode, out) for proc, out in zip(procs, outputs)]


def launch_ranks(argv, world=2, **env) -> list:
    """Start ``world`` processes as torchrun would (env:// on 127.0.0.1); ``[(rc, output)]``."""
    port = free_port()
    procs = [subprocess.Popen(argv, env=_env(RANK=r, WORLD_SIZE=world, LOCAL_RANK=r,
                                             LOCAL_WORLD_SIZE=world, MASTER_PORT=port, **env),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True, cwd=REPO)
             for r in range(world)]
    return _wait(procs)


def torchrun(args, nproc=2, **env):
    """``torchrun --nproc_per_node NPROC ... -m layerhessians ARGS``: ``(rc, output)``."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "layerhessians", *args]
    proc = subprocess.Popen(argv, env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            cwd=REPO)
    return _wait([proc])[0]


# ----------------------------------------------------------------------------- float64 case
class SmallNet(nn.Module):
    """[N, 1, 8, 8] -> conv 3x3 (3 channels) -> tanh -> max-pool 2 -> linear -> [N, 3];
    no batch norm, so splitting data changes nothing but rounding. 114 parameters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(27, 3)

    def forward(self, x):
        return self.fc(torch.max_pool2d(torch.tanh(self.conv(x)), 2).flatten(1))


def small_net(seed=0):
    torch.manual_seed(seed)
    return SmallNet().double()


def small_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g))


def engine_case(ctx: Context) -> dict:
    """Spectra, one product, two DDP epochs and an evaluation, on this rank's shards (all
    of the data on one process)."""
    x, y = small_data(24, seed=1)
    index = shard_indices(len(y), ctx.rank, ctx.world_size)
    local = (x[index], y[index])
    reduction = ctx.reduction()
    model = small_net()
    # rank 0 also cuts its shard into micro-batches: sharding and micro-batching compose
    micro = 5 if ctx.rank == 0 else None
    spectra = layer_spectra(model, CE, local, iterations=30, vectors=1, seed=3,
                            reduction=reduction, micro_batch_size=micro, reorthogonalize=True,
                            layer_method="slq")  # as the sharded runs (SLQ on every block)
    op = hessian_operator(model, CE, local, reduction=reduction)
    product = op.matvec(start_vector(op.dim, 5, 0, "v"))

    # DDP: 26 examples in global batches of 5: shards 3/2 and a last batch of 1 (rank 1 empty)
    train_x, train_y = small_data(26, seed=2)
    test_x, test_y = small_data(11, seed=4)
    data = TensorData(name="small", train_x=train_x, train_y=train_y, test_x=test_x,
                      test_y=test_y, num_classes=3, in_channels=1, mean=(0.0,), std=(1.0,),
                      checksum="0" * 64)
    config = TrainConfig(batch_size=5, learning_rate=0.05, seed=1).validated()
    net = small_net(seed=7)
    ddp = nn.parallel.DistributedDataParallel(net) if ctx.active else None
    setup = Setup(config=config, device=torch.device("cpu"), data=data, model=net,
                  optimizer=make_optimizer(config, net), scheduler=None, loss_fn=CE,
                  hessian_batch=None, blocks=None, dist=ctx, ddp=ddp)
    rows = [train_epoch(setup, epoch, disable_progress=True) for epoch in (1, 2)]
    return {"nodes": {k: m.nodes for k, m in spectra.items()},
            "weights": {k: m.weights for k, m in spectra.items()},
            "product": product, "rows": rows,
            "params": {k: p.detach().clone() for k, p in net.named_parameters()},
            "evaluation": evaluate(net, test_x, test_y, 4, ctx),
            "reductions": 0 if reduction is None else reduction.calls}


def engine_worker(out_dir):
    """Entry point of each spawned rank: ``engine_case`` under a gloo process group."""
    torch.set_num_threads(1)
    with process_group("gloo", "cpu") as ctx:
        assert ctx.active and ctx.backend == "gloo"
        result = engine_case(ctx)
    torch.save(result, Path(out_dir) / f"rank{ctx.rank}.pt")


def _relative(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_two_processes_equal_one_in_float64(tmp_path):
    code = f"import test_distributed as t; t.engine_worker({str(tmp_path)!r})"
    for rc, out in launch_ranks([sys.executable, "-c", code]):
        assert rc == 0, out[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    alone = engine_case(SINGLE)

    # every rank holds the same spectra, bit for bit (identical reduced products and seeds)
    for block in alone["nodes"]:
        assert np.array_equal(ranks[0]["nodes"][block], ranks[1]["nodes"][block])
        assert np.array_equal(ranks[0]["weights"][block], ranks[1]["weights"][block])
        # ... equal to one process's over the same data up to float64 rounding
        assert _relative(ranks[0]["nodes"][block], alone["nodes"][block]) < 1e-8, block
        assert _relative(ranks[0]["weights"][block], alone["weights"][block]) < 1e-8, block
    assert torch.equal(ranks[0]["product"], ranks[1]["product"])
    assert _relative(ranks[0]["product"], alone["product"]) < 1e-12
    assert ranks[0]["reductions"] == ranks[1]["reductions"] > 0

    # DDP training: same trajectory as one process over the same global batches
    for rank in ranks:
        for got, want in zip(rank["rows"], alone["rows"]):
            assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-12)
            assert got["train_acc"] == want["train_acc"]
        for name, want in alone["params"].items():
            assert _relative(rank["params"][name], want) < 1e-12, name
        assert rank["evaluation"][0] == pytest.approx(alone["evaluation"][0], rel=1e-12)
        assert rank["evaluation"][1] == alone["evaluation"][1]
    assert all(torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]) for k in alone["params"])


# ----------------------------------------------------------------------------- the command
AUDIT = textwrap.dedent('''
    """Test hook (sitecustomize): record every write a rank makes under $LH_AUDIT_DIR."""
    import os
    import sys

    _watch, _rank = os.environ.get("LH_AUDIT_DIR"), os.environ.get("RANK")
    if _watch and _rank is not None:
        _log = os.path.join(os.environ["LH_AUDIT_LOG"], f"rank{_rank}.txt")
        _busy = []
        _flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

        def _hook(event, args):
            if _busy:
                return
            if event == "open":
                path, mode, flags = args
                writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \\
                    (isinstance(flags, int) and flags & _flags)
                if not writes or isinstance(path, int) or path is None:
                    return
            elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir",
                           "shutil.rmtree", "os.truncate"):
                path = args[0]
            else:
                return
            path = os.path.abspath(os.fsdecode(path))
            if path.startswith(_watch):
                _busy.append(1)
                try:
                    with open(_log, "a") as fh:
                        fh.write(f"{event} {path}\\n")
                finally:
                    _busy.pop()

        sys.addaudithook(_hook)
''')


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    write_mnist(root / "MNIST" / "raw", mnist_arrays(n_train=60, n_test=20, seed=3))
    return root


def flags(root, *extra):
    return ["-d", "mnist", "--dataset_root", str(root), "-m", "LeNet", "-n", "2",
            "-lr", "0.02", "-b", "16", "--hessian-iterations", "8", "--examples_per_class",
            "2", "--seed", "1", "--no-progress", *extra]


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    """``(environment, log folder)``: writes under the watched folder are logged per rank."""
    hook = tmp_path_factory.mktemp("hook")
    (hook / "sitecustomize.py").write_text(AUDIT)
    logs = tmp_path_factory.mktemp("audit")
    runs = tmp_path_factory.mktemp("runs")
    path = os.pathsep.join([str(hook), str(REPO / "src"), str(TESTS), str(HERE)])
    return {"PYTHONPATH": path, "LH_AUDIT_DIR": str(runs), "LH_AUDIT_LOG": str(logs)}, logs, runs


@pytest.fixture(scope="module")
def two_process_run(mnist_root, audit):
    env, logs, runs = audit
    run = runs / "two"
    rc, out = torchrun(["train", "-r", str(run), *flags(mnist_root)], **env)
    assert rc == 0, out[-3000:]
    return run, logs


def test_torchrun_two_processes_match_one_and_only_rank0_writes(two_process_run, mnist_root,
                                                                 tmp_path):
    run, logs = two_process_run
    writes = (logs / "rank0.txt").read_text()
    assert ".lock" in writes and "metrics.csv" in writes and "last.pt" in writes
    assert not (logs / "rank1.txt").exists(), (logs / "rank1.txt").read_text()
    two = load_run(run)
    assert two.record.facts["world_size"] == 2 and two.record.facts["backend"] == "gloo"
    assert two.record.facts["hessian_examples"] == 20
    assert two.record.spectra["reorthogonalize"] is True  # "auto", resolved and recorded
    log_text = (run / "logs" / "train.log").read_text()
    assert log_text.count("epoch 2/2") == 1 and "2 processes (gloo)" in log_text

    # SLQ layer blocks, as the sharded run (the Gram route runs on one process)
    assert main(["train", "-r", str(tmp_path / "one"), *flags(mnist_root),
                 "--layer-spectra", "slq"]) == 0
    one = load_run(tmp_path / "one")
    assert one.record.facts["world_size"] == 1 and one.record.facts["backend"] is None
    columns = ["train_loss", "test_loss"]
    np.testing.assert_allclose(two.metrics[columns], one.metrics[columns], rtol=TRAJECTORY_RTOL)
    np.testing.assert_array_equal(two.metrics["train_acc"], one.metrics["train_acc"])
    assert list(two.spectra["block"]) == list(one.spectra["block"])
    assert set(two.spectra["method"]) == set(one.spectra["method"]) == {"slq"}
    for block, rows in one.spectra.groupby("block"):
        other = two.spectra[two.spectra["block"] == block]
        assert _relative(other["node"], rows["node"]) < TRAJECTORY_RTOL, block


def test_killed_two_process_run_resumes_to_identical_results(two_process_run, mnist_root,
                                                             audit):
    env, logs, runs = audit
    run = runs / "killed"
    argv = [sys.executable, "-m", "layerhessians", "train", "-r", str(run), *flags(mnist_root)]
    killed = launch_ranks(argv, **env, **{CRASH_ENV: "2:spectra"})
    assert all(rc == -signal.SIGKILL for rc, _ in killed), [o[-2000:] for _, o in killed]
    assert load_run(run).metrics["epoch"].tolist() == [1]
    resumed = launch_ranks([*argv, "--resume"], **env)
    assert all(rc == 0 for rc, _ in resumed), [o[-2000:] for _, o in resumed]
    assert not (logs / "rank1.txt").exists()
    a, b = load_run(two_process_run[0]), load_run(run)
    pd.testing.assert_frame_equal(a.metrics.drop(columns=SECONDS),
                                  b.metrics.drop(columns=SECONDS), check_exact=True)
    pd.testing.assert_frame_equal(a.spectra, b.spectra, check_exact=True)
    wa = torch.load(two_process_run[0] / "checkpoints" / "last.pt", weights_only=True)
    wb = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    assert "resuming after epoch 1 of 2 on 2 processes" in (run / "logs" / "train.log").read_text()


# ----------------------------------------------------------------------------- micro-batches
def conv_model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 4)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(1)
    return model, (torch.randn(11, 2, 6, 6, generator=g, dtype=torch.float64),
                   torch.randint(0, 4, (11,), generator=g))


@pytest.mark.parametrize("kind", ["hessian", "ggn", "residual"])
@pytest.mark.parametrize("reuse_graph", [True, False])
def test_micro_batched_products_equal_single_batch(kind, reuse_graph):
    model, data = conv_model_and_data()
    whole = hessian_operator(model, CE, data, kind=kind)
    for micro in (1, 3, 4):
        pieces = hessian_operator(model, CE, split_batches([data], micro), kind=kind,
                                  reuse_graph=reuse_graph)
        assert len(pieces.graph._data) == -(-11 // micro)
        for index in range(2):
            v = start_vector(whole.dim, index, 0, "v")
            expected = whole.matvec(v)
            assert float((pieces.matvec(v) - expected).norm() / expected.norm()) < 1e-10


def test_micro_batched_spectra_equal_single_batch():
    model, data = conv_model_and_data()
    whole = layer_spectra(model, CE, data, iterations=15, seed=1, layer_method="slq")
    for micro, reuse in ((2, True), (5, False)):
        pieces = layer_spectra(model, CE, data, iterations=15, seed=1, layer_method="slq",
                               micro_batch_size=micro, reuse_graph=reuse)
        for block, measure in whole.items():
            assert _relative(pieces[block].nodes, measure.nodes) < 1e-10, block
            assert _relative(pieces[block].weights, measure.weights) < 1e-10, block
    # a budget too small for the kept graphs: micro-batches rebuilt per product, same result
    cost = measure_graph_cost(model, CE, *data)
    small = cost.per_batch + 2 * cost.per_example * 3  # room for one graph of 3 examples
    plan = plan_memory(model, CE, data, dims=[10], iterations=15, reorthogonalize=False,
                       budget=small, cost=cost)
    assert (plan.micro_batch_size, plan.reuse_graph, plan.fits) == (3, False, True)
    tight = layer_spectra(model, CE, data, iterations=15, seed=1, layer_method="slq",
                          micro_batch_size="auto", reuse_graph="auto", memory_budget=small)
    for block, measure in whole.items():
        assert _relative(tight[block].nodes, measure.nodes) < 1e-10, block


def test_rebuilt_graphs_are_shared_by_all_blocks_of_a_lanczos_step():
    """Without kept graphs, one Lanczos step builds each micro-batch's graph once for the
    full operator and every layer block, not once per operator; same recurrences."""
    model, data = conv_model_and_data()
    pieces = split_batches([data], 4)  # 3 micro-batches
    kept = layer_operators(model, CE, pieces)
    rebuilt = layer_operators(model, CE, pieces, reuse_graph=False)
    starts = [start_vector(op.dim, 0, 0, name) for name, op in kept.items()]
    want = lanczos(list(kept.values()), starts, 6)
    got = lanczos(list(rebuilt.values()), starts, 6)
    # 6 steps and the symmetry probe (all blocks together): one pass over 3 micro-batches each
    assert rebuilt["full"].graph.forward_passes == (6 + 1) * 3
    for a, b in zip(got, want):
        assert _relative(a.alphas, b.alphas) < 1e-10 and _relative(a.betas, b.betas) < 1e-10
    # one float32 operator twice (two recurrences, float64 vectors) in one shared pass
    model.float()
    pieces = [(x.float(), y) for x, y in pieces]
    block = layer_operators(model, CE, pieces, reuse_graph=False)["0.weight"]
    firsts = [starts[1], starts[0][: block.dim]]
    twice = lanczos([block, block], firsts, 6)
    single = layer_operators(model, CE, pieces)["0.weight"]
    for a, first in zip(twice, firsts):
        assert _relative(a.alphas, lanczos([single], [first], 6)[0].alphas) < 1e-5


def test_graph_cost_is_measured_per_example_and_per_batch():
    model, (x, y) = conv_model_and_data()
    dim = sum(p.numel() for p in model.parameters())
    small = measure_graph_cost(model, CE, x, y, probe=2)
    large = measure_graph_cost(model, CE, x, y, probe=8)
    assert small.per_batch == large.per_batch == dim * 8  # the kept float64 gradient
    assert large.per_example == pytest.approx(small.per_example, rel=0.2)
    assert large.per_example > x[0].numel() * 8  # at least the first activations
    residual = measure_graph_cost(model, CE, x, y, kind="residual")
    assert residual.per_batch == 2 * dim * 8  # gradient and J^T u


def test_budget_decisions():
    cost = GraphCost(per_example=1000, per_batch=500)
    # plenty: one batch, graph kept
    assert plan_micro_batches([100], cost, 10**9) == (100, True, 500 + 1000 * 200)
    # the graphs fit only in micro-batches of 50 (2 x 500 + 1000 x (100 + 50) = 151,000)
    micro, reuse, peak = plan_micro_batches([100], cost, 151_000)
    assert (micro, reuse, peak) == (50, True, 151_000)
    # kept graphs never fit: rebuilt per product, the largest micro-batch that fits
    micro, reuse, peak = plan_micro_batches([100], cost, 20_500)
    assert (micro, reuse, peak) == (10, False, 20_500)
    # an explicit size is kept; reuse decided by the budget
    assert plan_micro_batches([100], cost, 10**9, micro_batch_size=7)[:2] == (7, True)
    assert plan_micro_batches([100], cost, 20_500, micro_batch_size=7)[:2] == (7, False)
    assert plan_micro_batches([100], cost, None) == (100, True, 500 + 1000 * 200)
    with pytest.raises(UserError, match="bn_mode"):
        plan_micro_batches([100], cost, 10**9, micro_batch_size=7, splittable=False)
    assert plan_micro_batches([100], cost, 20_500, splittable=False)[:2] == (100, False)


def test_reorthogonalize_auto_follows_the_budget(caplog):
    dims, steps = [61706, 150, 2400], 128
    need = basis_bytes(dims, steps)
    assert need == 8 * (128 * 61706 + 128 * 150 + 128 * 2400)
    assert choose_reorthogonalize("auto", dims, steps, budget=2 * need) is True
    assert choose_reorthogonalize("auto", dims, steps, budget=None) is True
    with caplog.at_level("WARNING", logger="layerhessians.spectra"):
        assert choose_reorthogonalize("auto", dims, steps, budget=2 * need - 1) is False
    assert "re-orthogonalisation" in caplog.text and "--memory-budget" in caplog.text
    assert choose_reorthogonalize(True, dims, steps, budget=1) is True
    assert choose_reorthogonalize(False, dims, steps, budget=None) is False
    assert parse_budget("8GB") == ("bytes", 8e9) and parse_budget("2 GiB") == ("bytes", 2**31)
    assert parse_budget("40%") == ("fraction", 0.4) and parse_budget("auto") is None
    for bad in ("8 gigs", "0%", "-1GB", "GB"):
        with pytest.raises(UserError, match="memory budget"):
            parse_budget(bad)


def test_trainer_records_reorthogonalize_used_and_plan(mnist_root, tmp_path):
    run = tmp_path / "tiny-budget"
    assert main(["train", "-r", str(run), *flags(mnist_root), "-n", "1",
                 "--memory-budget", "100KB", "--hessian-batch-size", "4"]) == 0
    record = load_run(run).record
    config = {**record.training_settings(), **record.facts}
    assert config["hessian"]["reorthogonalize"] is False  # bases do not fit 100 kB
    assert config["micro_batch_size"] == 4 and config["reuse_graph"] is False
    assert config["memory_budget"] == "100KB" and config["memory_budget_bytes"] == 100_000
    log_text = (run / "logs" / "train.log").read_text()
    assert "running without it" in log_text and "micro-batches of 4" in log_text


# ----------------------------------------------------------------------------- Hessian set
def test_hessian_set_size_options():
    targets = torch.tensor([0] * 5 + [1] * 9 + [2] * 2 + [3] * 7)
    for epc in (1, 2):  # K * epc examples: exactly the per-class subset
        assert torch.equal(hessian_subset(targets, total=4 * epc, seed=3),
                           hessian_subset(targets, epc, seed=3))
    index = hessian_subset(targets, total=11, seed=0)  # 3, 3, 2 (all of class 2), 3
    assert targets[index].bincount().tolist() == [3, 3, 2, 3]
    index = hessian_subset(targets, total=18, seed=0)  # 2 + 16 shared: 5, 6, 2, 5
    assert targets[index].bincount().tolist() == [5, 6, 2, 5]
    assert len(set(index.tolist())) == 18
    assert torch.equal(hessian_subset(targets, total="all").sort().values, torch.arange(23))
    with pytest.raises(UserError, match="--hessian-examples all"):
        hessian_subset(targets, total=24)
    config = TrainConfig(hessian_total="ALL", hessian=HessianConfig(reorthogonalize="none"))
    config = config.validated()
    assert config.hessian_total == "all" and config.hessian.reorthogonalize is False
    with pytest.raises(UserError, match="--hessian-examples"):
        TrainConfig(hessian_total=0).validated()
    assert main(["train", "--hessian-examples", "30", "--examples_per_class", "3"]) == 2
