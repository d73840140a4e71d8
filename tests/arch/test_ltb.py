"""Learning to Branch's own properties (the shared grid is in test_cross_stitch.py)."""

from __future__ import annotations

import pytest
import torch
from test_cross_stitch import BACKBONES, TASKS, build, inputs, loss_of, targets
from torch import nn

import mtnorm
from mtnorm.arch.ltb import Branching, LearningToBranch
from mtnorm.arch.stages import sequential_groups, stages_of
from mtnorm.models import LeNetEncoder

pytestmark = pytest.mark.usefixtures("one_thread")


def set_tree(model: LearningToBranch, parents: list[list[int]], heads: list[int]) -> None:
    """Logits that choose ``parents[k - 1][j]`` for node j of stage k and ``heads[t]`` for task t."""
    with torch.no_grad():
        for theta, rows in zip(model.logits, [*parents, heads]):
            theta.fill_(-5.0)
            for j, i in enumerate(rows):
                theta[j, i] = 5.0


def along(model: LearningToBranch, x: torch.Tensor, task: str, path: tuple[int, ...]) -> torch.Tensor:
    """Task ``task``'s output computed by hand: the stages of the path's nodes, one carry."""
    carry: dict = {}
    for k, j in enumerate(path):
        x = stages_of(model.columns[j])[k](x, carry)
    return model.heads.heads[task](x)


def test_untrained_logits_give_the_first_node_everywhere():
    model = build("ltb", "segnet")
    tree = model.branching()
    assert tree.parents == ((-1, -1), (0, 0), (0, 0), (0, 0), (0, 0))
    assert tree.heads == {"a": 0, "b": 0} and tree.paths == {t: (0,) * 5 for t in TASKS}
    assert all(torch.allclose(p, torch.full((2, 2), 0.5, dtype=p.dtype)) for p in model.probabilities())


def test_branching_reads_the_learned_tree():
    model = build("ltb", "segnet")  # 5 stages: 4 parent choices and the heads' choice
    set_tree(model, [[0, 0], [0, 1], [1, 0], [0, 1]], heads=[0, 1])
    tree = model.branching()
    assert isinstance(tree, Branching)
    assert tree.parents == ((-1, -1), (0, 0), (0, 1), (1, 0), (0, 1))
    # a's head reads node 0 of stage 4, whose parent is node 0 of stage 3, whose parent is node 1 ...
    assert tree.paths == {"a": (0, 1, 1, 0, 0), "b": (0, 0, 0, 1, 1)}
    assert tree.shared_stages("a", "b") == 1 and tree.shared_stages("a", "a") == 5
    assert str(tree) == "a: 0 -> 1 -> 1 -> 0 -> 0; b: 0 -> 0 -> 0 -> 1 -> 1"


@pytest.mark.parametrize("backbone", BACKBONES)
def test_eval_runs_the_argmax_tree_with_the_carry_along_the_path(backbone):
    model = build("ltb", backbone).eval()
    depth = len(model.logits)
    parents = [[1, 0]] * (depth - 1)  # the two paths cross at every stage
    set_tree(model, parents, heads=[1, 0])
    x = inputs(backbone)
    out = model(x)
    for t, path in model.branching().paths.items():
        torch.testing.assert_close(out[t], along(model, x, t, path), rtol=1e-12, atol=1e-12)


def test_eval_computes_only_the_nodes_on_the_active_paths():
    model = build("ltb", "lenet").eval()
    set_tree(model, [[0, 0], [1, 1], [0, 0]], heads=[0, 1])  # a and b share stages 0-2
    assert model.branching().paths == {"a": (0, 1, 0, 0), "b": (0, 1, 0, 1)}
    ran = set()
    for j, column in enumerate(model.columns):
        for k, group in enumerate(sequential_groups(column)):
            group[0].register_forward_hook(lambda m, i, o, node=(k, j): ran.add(node))
    model(inputs("lenet"))
    assert ran == {(0, 0), (1, 1), (2, 0), (3, 0), (3, 1)}
    ran.clear()
    with mtnorm.use_task(model, "b"):
        model(inputs("lenet"))
    assert ran == {(0, 0), (1, 1), (2, 0), (3, 1)}


def test_in_eval_nodes_off_every_path_and_the_logits_get_no_gradient():
    model = build("ltb", "toy").eval()
    set_tree(model, [[1, 1]], heads=[1, 1])  # both tasks: stage 0 node 1, stage 1 node 1
    x = inputs("toy")
    loss_of(model, x, targets(model(x))).backward()
    on_path = {id(p) for p in model.columns[1].parameters()}
    for column in model.columns:
        for p in column.parameters():
            assert (p.grad is not None) == (id(p) in on_path)
    assert all(theta.grad is None for theta in model.logits)


def test_training_with_hard_samples_runs_the_sampled_tree():
    """Straight-through one-hot samples: the forward value is the sampled tree's (carry along the
    sampled path on SegNet), and the logits still get gradients."""
    model = build("ltb", "segnet", hard=True).train()
    x = inputs("segnet")
    torch.manual_seed(5)
    _, choice = model._weights()
    torch.manual_seed(5)
    out = model(x)
    for r, t in enumerate(TASKS):
        path = [choice[-1][r]]
        for k in range(len(choice) - 2, -1, -1):
            path.append(choice[k][path[-1]])
        torch.testing.assert_close(out[t], along(model, x, t, tuple(reversed(path))), rtol=1e-12, atol=1e-12)
    sum(o.sum() for o in out.values()).backward()
    assert all(theta.grad is not None and torch.any(theta.grad != 0) for theta in model.logits)


def test_training_mixes_every_parent_and_the_seed_fixes_the_sample():
    model = build("ltb", "toy").train()
    x = inputs("toy")
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(0)
    b = model(x)
    c = model(x)
    assert torch.equal(a["a"], b["a"]) and not torch.equal(a["a"], c["a"])


def test_a_low_temperature_approaches_the_hard_tree():
    model = build("ltb", "toy", tau=1e-3).train()
    weights, choice = model._weights()
    for w, rows in zip(weights, choice):
        assert torch.allclose(w, nn.functional.one_hot(torch.tensor(rows), 2).to(w.dtype), atol=1e-6)
    model.tau = 2.0  # the schedule sets it between epochs
    assert "tau=2.0" in repr(model)
    with pytest.raises(ValueError, match="tau and tau_final must be positive"):
        build("ltb", "toy", tau=0.0)


def test_nodes_and_logits_are_shared_and_count_t_backbones():
    model = build("ltb", "lenet")
    shared = {id(p) for p in mtnorm.shared_parameters(model)}
    assert all(id(p) in shared for p in [*model.columns.parameters(), *model.logits])
    backbone = sum(p.numel() for p in LeNetEncoder(1, 2, 8, 36).parameters())
    heads = sum(p.numel() for p in model.heads.parameters())
    assert mtnorm.models.count_parameters(model) == 2 * backbone + 4 * 2 * 2 + heads  # 4 stages


def test_columns_must_match_the_tasks():
    heads = {t: nn.Linear(8, 3) for t in TASKS}
    with pytest.raises(ValueError, match="T node copies per stage"):
        LearningToBranch([BACKBONES["toy"][0]("bn")], heads)


# ---------------------------------------------------------------- search, then the fixed tree
def test_the_schedule_anneals_tau_over_the_search_then_freezes_the_argmax_tree():
    model = build("ltb", "toy", tau=2.0, tau_final=0.5, search=0.6)
    assert model.search_epochs(5) == 3 and not model.frozen
    taus = []
    for epoch in range(3):
        model.on_epoch_start(epoch, 5)
        taus.append(model.tau)
    assert taus == pytest.approx([2.0, 1.0, 0.5])  # geometric from tau to tau_final
    set_tree(model, [[1, 0]], [1, 1])
    model.on_epoch_start(3, 5)
    assert model.frozen and model.branching().heads == {"a": 1, "b": 1}
    set_tree(model, [[0, 0]], [0, 0])  # the logits no longer decide
    model.on_epoch_start(4, 5)
    assert model.branching().parents[1] == (1, 0) and model.branching().heads == {"a": 1, "b": 1}
    assert "frozen=True" in repr(model)


def test_search_one_never_freezes_and_a_bad_fraction_is_refused():
    model = build("ltb", "toy", search=1.0)
    for epoch in range(4):
        model.on_epoch_start(epoch, 4)
    assert not model.frozen and model.search_epochs(4) == 4
    assert build("ltb", "toy", search=0.1).search_epochs(4) == 1  # at least one search epoch
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="fraction of the epochs spent searching"):
            build("ltb", "toy", search=bad)
    with pytest.raises(ValueError, match="tau_final must be positive"):
        build("ltb", "toy", tau_final=0.0)


def test_a_frozen_tree_trains_like_eval_with_no_gradient_off_its_paths():
    """Fine-tuning: no sampling (two forwards agree), the output is the tree's own path, and the
    logits and the unused nodes get no gradient."""
    model = build("ltb", "lenet")
    set_tree(model, [[0, 0], [1, 1], [0, 0]], heads=[0, 1])
    model.freeze()
    model.train()
    x = inputs("lenet")
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    paths = model.branching().paths
    for t in TASKS:
        assert torch.equal(a[t], b[t])
        torch.testing.assert_close(a[t], along(model, x, t, paths[t]), rtol=1e-12, atol=1e-12)
    sum(o.sum() for o in a.values()).backward()
    assert all(theta.grad is None for theta in model.logits)
    on_path = {(0, 0), (1, 1), (2, 0), (3, 0), (3, 1)}
    for j, column in enumerate(model.columns):
        for k, group in enumerate(sequential_groups(column)):
            grads = [p.grad for m in group for p in m.parameters()]
            assert grads and all((g is not None) == ((k, j) in on_path) for g in grads), (k, j)


def test_the_frozen_tree_is_in_the_state_dict():
    model = build("ltb", "toy")
    set_tree(model, [[1, 0]], [0, 1])
    model.freeze()
    fresh = build("ltb", "toy", seed=1)
    assert not fresh.frozen
    fresh.load_state_dict(model.state_dict())
    assert fresh.frozen and fresh.branching() == model.branching()


def test_the_trainer_searches_then_fine_tunes_and_resumes_after_the_freeze(tmp_path):
    """2 epochs of 4 steps, search 0.5: epoch 0 searches, epoch 1 trains the frozen tree (its
    logits stay as the search left them); a run cut in epoch 1 resumes to the same parameters."""
    from test_cross_stitch import _toy_config

    from mtnorm.train import Trainer

    logits_after_search = []

    def record(trainer):
        if trainer.global_step == 4:
            logits_after_search.extend(t.detach().clone() for t in trainer.model.logits)

    full = Trainer(_toy_config(tmp_path / "full", "ltb"), callbacks=[record], log=None)
    assert full.fit().status == "finished"
    assert full.model.frozen
    assert all(torch.equal(a, b) for a, b in zip(logits_after_search, full.model.logits))

    def stop_at_step_6(trainer):
        if trainer.global_step == 6:
            raise KeyboardInterrupt

    cut = Trainer(_toy_config(tmp_path / "cut", "ltb"), callbacks=[stop_at_step_6], log=None)
    assert cut.fit().status == "interrupted"
    resumed = Trainer(_toy_config(tmp_path / "cut", "ltb"), log=None)
    assert resumed.fit(resume=True).status == "finished"
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
