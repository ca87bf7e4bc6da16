"""Partial FC: two gloo ranks with the classes sharded equal one process with the whole classifier."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import free_port

from facetool.pipeline.errors import FacetoolError
from facetool.train.heads import class_shard, create_head

torch.set_num_threads(1)

E, C, B_LOCAL, WORLD = 8, 7, 3, 2  # C = 7 over 2 ranks: rank 0 holds classes 0-3, rank 1 classes 4-6
CONFIGS = [
    ("softmax", {}),
    ("cosface", {}),
    ("arcface", {}),
    ("curricularface", {}),
    ("magface", {}),
    ("multiface", {"spheres": 2, "base": "arcface", "m": 0.3}),
    ("multiface", {"spheres": 4, "base": "cosface"}),
    ("multiface", {"spheres": 2, "base": "softmax"}),
]
STEPS = 2  # two steps: CurricularFace's t must stay in sync
SAMPLED_C = 40


def problem(name: str, opts: dict, seed: int, step: int):
    """The global batch (labels from both ranks' classes) and the whole class weights, the same on every rank."""
    gen = torch.Generator().manual_seed(1000 * seed + step)
    x = torch.randn(WORLD * B_LOCAL, E, generator=gen)
    if name == "magface":
        x = F.normalize(x, dim=1) * torch.linspace(5.0, 120.0, x.shape[0])[:, None]
    y = torch.tensor([0, 5, 3, 6, 4, 1]).roll(step)  # rank 0's rows hold classes of rank 1 and back
    spheres = opts.get("spheres", 1)
    weights = [torch.randn(C, E // spheres, generator=gen) for _ in range(spheres)]
    return x, y, weights


def run_steps(head, name, opts, seed, rank, world):
    """Loss, logits and gradients of each step; ``rank``'s rows of the global batch only."""
    out = []
    for step in range(STEPS):
        x, y, _ = problem(name, opts, seed, step)
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL) if world > 1 else slice(None)
        xl = x[rows].clone().requires_grad_()
        logits = head.logits(xl, y[rows])
        logits = logits if isinstance(logits, list) else [logits]
        loss = head(xl, y[rows])
        loss.backward()
        out.append(
            {
                "loss": loss.detach(),
                "logits": [z.detach() for z in logits],
                "x_grad": xl.grad,
                "w_grad": [p.grad.clone() for p in head.class_weights()],
                "t": head.t.clone() if hasattr(head, "t") else None,
            }
        )
        for p in head.class_weights():
            p.grad = None
    return out


def load_weights(head, weights):
    shard = head.shard
    with torch.no_grad():
        for p, w in zip(head.class_weights(), weights, strict=True):
            p.copy_(w[shard.start : shard.start + shard.size])


def sampled_run(rank: int, seed: int, sample_rate: float):
    head = create_head("arcface", E, SAMPLED_C, partial_fc=True, sample_rate=sample_rate, seed=seed)
    gen = torch.Generator().manual_seed(7)
    full = torch.randn(SAMPLED_C, E, generator=gen)
    x = torch.randn(WORLD * B_LOCAL, E, generator=gen)
    y = torch.tensor([0, 25, 3, 39, 3, 21])
    load_weights(head, [full])
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    loss = head(x[rows].clone().requires_grad_(), y[rows])
    return {
        "loss": loss.detach(),
        "index": head.last_index + head.shard.start,
        "start": head.shard.start,
        "size": head.shard.size,
        "x": x,
        "y": y,
        "full": full,
    }


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for seed, (name, opts) in enumerate(CONFIGS):
            head = create_head(name, E, C, partial_fc=True, **opts)
            load_weights(head, problem(name, opts, seed, 0)[2])
            results[seed] = {
                "start": head.shard.start,
                "size": head.shard.size,
                "steps": run_steps(head, name, opts, seed, rank, WORLD),
            }
        results["sampled"] = [sampled_run(rank, seed=3, sample_rate=0.5) for _ in range(2)]
        results["sampled_other_seed"] = sampled_run(rank, seed=4, sample_rate=0.5)
        results["positives_only"] = sampled_run(rank, seed=3, sample_rate=0.0)
        results["swap"] = {optim: swap_run(rank, optim) for optim in OPTIMIZERS}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def swap_run(rank: int, optim: str) -> dict:
    """One swap step at r = 0.2 on this rank's shard of SWAP_C classes (5 of 25 kept)."""
    head, optimizer = trained_head("arcface", optim, {"sample_rate": 0.2, "update": "swap"})
    x, _ = swap_problem(0, rows=WORLD * B_LOCAL)
    y = torch.tensor([0, 30, 3, 41, 3, 22])
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    before = swap_state(head)
    head_step(head, optimizer, x[rows], y[rows])
    return {"index": head.last_index, "start": head.shard.start, "before": before, "after": swap_state(head),
            "x": x, "y": y}  # fmt: skip


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("pfc")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("seed", range(len(CONFIGS)), ids=[f"{n}-{o}" for n, o in CONFIGS])
def test_two_ranks_equal_one_process(two_ranks, seed):
    name, opts = CONFIGS[seed]
    head = create_head(name, E, C, **opts)
    load_weights(head, problem(name, opts, seed, 0)[2])
    whole = run_steps(head, name, opts, seed, 0, 1)
    for rank, result in enumerate(two_ranks):
        start, size = result[seed]["start"], result[seed]["size"]
        assert (start, size) == ((0, 4) if rank == 0 else (4, 3))
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        for got, want in zip(result[seed]["steps"], whole, strict=True):
            torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-5, atol=1e-5)
            for zg, zw in zip(got["logits"], want["logits"], strict=True):
                torch.testing.assert_close(zg, zw[:, start : start + size], rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(got["x_grad"], want["x_grad"][rows], rtol=1e-4, atol=1e-6)
            for wg, ww in zip(got["w_grad"], want["w_grad"], strict=True):
                torch.testing.assert_close(wg, ww[start : start + size], rtol=1e-4, atol=1e-6)
            if want["t"] is not None:
                torch.testing.assert_close(got["t"], want["t"])


def test_sampling_keeps_positives_and_is_exact_on_the_sampled_classes(two_ranks):
    first = [two_ranks[r]["sampled"][0] for r in range(WORLD)]
    again = [two_ranks[r]["sampled"][1] for r in range(WORLD)]
    x, y, full = first[0]["x"], first[0]["y"], first[0]["full"]
    kept = []
    for run in first:
        start, size = run["start"], run["size"]
        assert run["index"].numel() == int(0.5 * size)  # 20 classes per rank, 10 sampled
        positives = {int(c) for c in y if start <= c < start + size}
        assert positives <= set(run["index"].tolist())
        kept.append(run["index"])
        assert torch.isfinite(run["loss"])
    # deterministic for a seed; another seed samples otherwise
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["loss"], b["loss"])
    other = [two_ranks[r]["sampled_other_seed"]["index"] for r in range(WORLD)]
    assert any(not torch.equal(a, b) for a, b in zip(kept, other, strict=True))
    # the loss is ArcFace's cross-entropy over exactly the sampled classes
    classes = torch.cat(kept)
    head = create_head("arcface", E, classes.numel())
    with torch.no_grad():
        head.weight.copy_(full[classes])
    remap = {int(c): i for i, c in enumerate(classes)}
    torch.testing.assert_close(head(x, torch.tensor([remap[int(c)] for c in y])), first[0]["loss"])
    for r in range(WORLD):
        assert torch.equal(first[r]["loss"], first[0]["loss"])


def test_sample_rate_zero_keeps_positives_only(two_ranks):
    for run in (two_ranks[r]["positives_only"] for r in range(WORLD)):
        start, size = run["start"], run["size"]
        positives = sorted({int(c) for c in run["y"] if start <= c < start + size})
        assert run["index"].tolist() == positives
        assert torch.isfinite(run["loss"])


def test_class_shard_remainder_rule():
    shards = [class_shard(2_059_906, r, 8) for r in range(8)]
    assert [s.size for s in shards] == [257_489] * 2 + [257_488] * 6
    assert [s.start for s in shards] == [0, 257_489, 514_978, 772_466, 1_029_954, 1_287_442, 1_544_930, 1_802_418]
    assert shards[-1].start + shards[-1].size == 2_059_906
    with pytest.raises(FacetoolError, match="cannot be sharded"):
        class_shard(3, 0, 4)


def test_one_rank_partial_fc_sampling():
    """Without torch.distributed, Partial FC is one rank: exact at r = 1, positives kept at r < 1."""
    torch.manual_seed(0)
    whole = create_head("cosface", E, 50)
    pfc = create_head("cosface", E, 50, partial_fc=True)
    pfc.load_state_dict(whole.state_dict())
    x, y = torch.randn(6, E), torch.tensor([1, 7, 7, 30, 49, 0])
    torch.testing.assert_close(pfc(x, y), whole(x, y))
    sampled = create_head("cosface", E, 50, partial_fc=True, sample_rate=0.2, seed=1)
    index = sampled.sample_classes(y)
    assert index.numel() == 10 and set(y.tolist()) <= set(index.tolist())
    assert torch.equal(index, torch.sort(index).values)
    logits = sampled.logits(x, y)
    assert logits.shape == (6, 10)
    sampled.eval()  # evaluation uses every class
    assert sampled.logits(x, y).shape == (6, 50)


def test_class_sampler_travels_in_the_head_state_dict():
    """A head loaded from another's state_dict draws the classes that one would have drawn next (exact resume)."""
    y = torch.tensor([1, 7, 30])
    first = create_head("arcface", E, 50, partial_fc=True, sample_rate=0.2, seed=3)
    assert first.state_dict()["_extra_state"] == {}  # nothing drawn yet: the seed decides
    first.sample_classes(y)
    state = first.state_dict()
    assert set(state["_extra_state"]) == {"sampler"}
    going_on = [first.sample_classes(y) for _ in range(3)]
    resumed = create_head("arcface", E, 50, partial_fc=True, sample_rate=0.2, seed=3)
    resumed.sample_classes(y)  # its own draws are replaced by the loaded state
    resumed.load_state_dict(state)
    assert resumed.state_dict()["_extra_state"]["sampler"].equal(state["_extra_state"]["sampler"])
    again = [resumed.sample_classes(y) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(going_on, again, strict=True))
    assert not torch.equal(going_on[0], going_on[1])  # the draws do change from step to step
    fresh = create_head("arcface", E, 50, partial_fc=True, sample_rate=0.2, seed=3)
    fresh.load_state_dict(create_head("arcface", E, 50, partial_fc=True, sample_rate=0.2, seed=3).state_dict())
    assert torch.equal(fresh.sample_classes(y), create_head("arcface", E, 50, partial_fc=True, sample_rate=0.2,
                                                             seed=3).sample_classes(y))  # fmt: skip


# -- the swap update (update = "swap") ------------------------------------------------------------------------------
SWAP_C, SWAP_STEPS = 50, 3
OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=5e-4),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.05),
}


def swap_problem(step: int, rows: int = 4):
    gen = torch.Generator().manual_seed(50 + step)
    return torch.randn(rows, E, generator=gen), torch.randint(0, SWAP_C, (rows,), generator=gen)


def trained_head(name: str, optim: str, opts: dict, classes: int = SWAP_C, start=None):
    """A head (weights copied from ``start`` when given) and its bound optimiser."""
    head = create_head(name, E, classes, partial_fc=True, seed=2, **opts)
    if start is not None:
        with torch.no_grad():
            for p, w in zip(head.class_weights(), start.class_weights(), strict=True):
                p.copy_(w)
    optimizer = OPTIMIZERS[optim]([p for p in head.parameters() if p.requires_grad])
    head.bind_optimizer(optimizer)
    return head, optimizer


def head_step(head, optimizer, x, y) -> None:
    optimizer.zero_grad(set_to_none=True)
    head(x, y).backward()
    optimizer.step()


def swap_state(head) -> dict[str, torch.Tensor]:
    """Every per-class tensor of the head: the rows and their optimiser state."""
    return {k: v.clone() for k, v in head.state_dict().items() if torch.is_tensor(v) and v.dim() == 2}


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_swap_leaves_unsampled_rows_and_their_optimiser_state_bitwise_alone(optim):
    """At r = 0.1 only the sampled rows and their state move; with the dense update the others move too."""
    swap, opt_swap = trained_head("arcface", optim, {"sample_rate": 0.1, "update": "swap"})
    dense, opt_dense = trained_head("arcface", optim, {"sample_rate": 0.1}, start=swap)
    keys = {"weight", "weight_momentum_buffer"} if optim == "sgd" else {"weight", "weight_exp_avg", "weight_exp_avg_sq"}
    assert set(swap_state(swap)) == keys  # the placeholders are no state
    for step in range(SWAP_STEPS):
        x, y = swap_problem(step)
        before, dense_before = swap_state(swap), dense.weight.detach().clone()
        head_step(swap, opt_swap, x, y)
        head_step(dense, opt_dense, x, y)
        sampled = swap.last_index
        assert sampled.numel() == 5 and set(y.tolist()) <= set(sampled.tolist())
        assert torch.equal(sampled, dense.last_index)
        unsampled = torch.ones(SWAP_C, dtype=torch.bool)
        unsampled[sampled] = False
        after = swap_state(swap)
        for key in keys:
            assert torch.equal(after[key][unsampled], before[key][unsampled]), (step, key)
            assert not torch.equal(after[key][sampled], before[key][sampled]), (step, key)
        if step > 0:  # the dense update moves rows it did not sample (momentum, decay)
            assert not torch.equal(dense.weight.detach()[unsampled], dense_before[unsampled])
    assert int(swap.swap_steps) == SWAP_STEPS and swap.weight_active.numel() == 0
    assert opt_swap.state.get(swap.weight_active) is None  # all the state lives in the head between steps


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
@pytest.mark.parametrize(("name", "opts"), [("arcface", {}), ("multiface", {"spheres": 2, "base": "cosface"})])
def test_swap_and_dense_at_rate_one_equal_the_whole_softmax(optim, name, opts):
    """r = 1: both updates give bitwise the weights (and optimiser state) of one whole classifier."""
    whole = create_head(name, E, SWAP_C, **opts)
    opt_whole = OPTIMIZERS[optim](whole.parameters())
    heads = [trained_head(name, optim, {**opts, "update": u}, start=whole) for u in ("dense", "swap")]
    for step in range(SWAP_STEPS):
        x, y = swap_problem(step)
        head_step(whole, opt_whole, x, y)
        for head, optimizer in heads:
            head_step(head, optimizer, x, y)
    key = "momentum_buffer" if optim == "sgd" else "exp_avg_sq"
    swap = heads[1][0]
    for i, w in enumerate(whole.class_weights()):
        for head, _ in heads:
            assert torch.equal(head.class_weights()[i], w), (head.update, i)
        slot = swap.swap.slots[i]
        assert torch.equal(getattr(slot.owner, f"weight_{key}"), opt_whole.state[w][key])


@pytest.mark.parametrize("swap_step, counts", [("counter", [0, 1, 2]), ("reset", [0, 0, 0])])
def test_swap_adamw_step_count(swap_step, counts):
    """AdamW's step before each update: the head's count (as a dense optimiser's) or FaceT's fresh 0."""
    head, optimizer = trained_head("arcface", "adamw", {"sample_rate": 0.1, "update": "swap", "swap_step": swap_step})
    seen = []
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append(int(opt.state[head.weight_active]["step"])))
    for step in range(SWAP_STEPS):
        head_step(head, optimizer, *swap_problem(step))
    assert seen == counts


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_swap_resumes_exactly_from_the_head_and_optimiser_state(optim, tmp_path):
    """The rows, their optimiser state, the step count and the sampler travel in the head's state_dict."""
    opts = {"sample_rate": 0.1, "update": "swap"}
    going, opt_going = trained_head("cosface", optim, opts)
    for step in range(2):
        head_step(going, opt_going, *swap_problem(step))
    torch.save({"head": going.state_dict(), "optim": opt_going.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed, opt_resumed = trained_head("cosface", optim, opts)  # binds before it loads, as the trainer does
    resumed.load_state_dict(saved["head"])
    opt_resumed.load_state_dict(saved["optim"])
    for step in range(2, 4):
        for head, optimizer in ((going, opt_going), (resumed, opt_resumed)):
            head_step(head, optimizer, *swap_problem(step))
    a, b = going.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and "swap_steps" in a and int(b["swap_steps"]) == 4
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k


def test_swap_needs_a_bound_sgd_or_adamw():
    head = create_head("arcface", E, SWAP_C, update="swap", sample_rate=0.1)
    with pytest.raises(RuntimeError, match="bind_optimizer"):
        head(*swap_problem(0))
    with pytest.raises(FacetoolError, match="SGD and AdamW"):
        head.bind_optimizer(torch.optim.Adagrad(head.parameters()))
    with pytest.raises(FacetoolError, match="does not hold"):
        head.bind_optimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_swap_over_two_ranks_is_one_step_on_the_sampled_classes(two_ranks, optim):
    """Each rank moves only its sampled rows, and by what one whole classifier of the sampled classes moves them."""
    runs = [two_ranks[r]["swap"][optim] for r in range(WORLD)]
    for run in runs:
        unsampled = torch.ones(run["before"]["weight"].shape[0], dtype=torch.bool)
        unsampled[run["index"]] = False
        assert unsampled.sum() == 20
        for key, value in run["after"].items():
            assert torch.equal(value[unsampled], run["before"][key][unsampled]), key
    classes = torch.cat([run["index"] + run["start"] for run in runs])
    whole, optimizer = trained_head("arcface", optim, {}, classes=classes.numel())
    with torch.no_grad():
        whole.weight.copy_(torch.cat([run["before"]["weight"][run["index"]] for run in runs]))
    remap = {int(c): i for i, c in enumerate(classes)}
    head_step(whole, optimizer, runs[0]["x"], torch.tensor([remap[int(c)] for c in runs[0]["y"]]))
    got = torch.cat([run["after"]["weight"][run["index"]] for run in runs])
    torch.testing.assert_close(got, whole.weight.detach(), rtol=1e-4, atol=1e-6)


def test_trainer_swap_run_resumes_bitwise(tmp_path):
    """The trainer binds the swap update to its optimiser; 2 steps + resume to 4 == 4 steps (head and backbone)."""
    from facetool.train.engine import load_config, to_toml
    from facetool.train.engine.trainer import train

    cfg = {"run": {"seed": 1, "steps": 4, "threads": 1, "checkpoint_every": 2},
           "data": {"source": "synthetic", "synthetic_classes": SWAP_C, "synthetic_samples": 64, "batch_size": 4},
           "model": {"name": "tinynet", "width": 4},
           "head": {"name": "arcface", "s": 32.0, "sample_rate": 0.1, "update": "swap"},
           "optim": {"name": "adamw", "lr": 0.01}, "schedule": {"kind": "constant"}}  # fmt: skip
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    train(load_config(path), tmp_path / "full")
    train(load_config(path, ["run.steps=2"]), tmp_path / "part")
    train(load_config(path), tmp_path / "part", resume=True, allow_change=["run.steps"])
    a, b = (torch.load(tmp_path / run / "checkpoints/step-00000004/rank-00000.pt", weights_only=True)
            for run in ("full", "part"))  # fmt: skip
    assert {"weight", "weight_exp_avg", "weight_exp_avg_sq", "swap_steps"} <= set(a["head"])
    assert int(a["head"]["swap_steps"]) == 4
    for key, value in a["head"].items():
        if torch.is_tensor(value):
            assert torch.equal(value, b["head"][key]), key
    for key, value in a["backbone"]["state_dict"].items():
        assert torch.equal(value, b["backbone"]["state_dict"][key]), key


def test_swap_state_of_another_optimiser_starts_fresh():
    """Resuming with another optimiser (an allowed optim.name change): the rows load, the optimiser state is new."""
    opts = {"sample_rate": 0.1, "update": "swap"}
    sgd, opt_sgd = trained_head("arcface", "sgd", opts)
    head_step(sgd, opt_sgd, *swap_problem(0))
    adamw, _ = trained_head("arcface", "adamw", opts)
    adamw.load_state_dict(sgd.state_dict())
    assert torch.equal(adamw.weight, sgd.weight) and int(adamw.swap_steps) == 0
    assert not adamw.weight_exp_avg.any() and not hasattr(adamw, "weight_momentum_buffer")
    with pytest.raises(RuntimeError, match="weight_exp_avg_sq"):  # a state missing its own buffers is damaged
        adamw.load_state_dict({k: v for k, v in adamw.state_dict().items() if k != "weight_exp_avg_sq"})
