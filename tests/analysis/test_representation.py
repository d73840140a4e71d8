"""Task representations (the input of TaskHeads per task) and their joint 2-D embedding: shapes,
the exact PCA, the optional t-SNE (run when scikit-learn is importable, the clear ImportError
always), converted TSσBN and hard-sharing models."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from torch import nn

import mtnorm
from mtnorm.analysis.representation import pca_2d, representation_embedding, task_representations
from mtnorm.models.methods import MultiTaskNet
from mtnorm.models.toy import ToyEncoder

TASKS = ["a", "b", "c"]
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None


def tssbn_model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(ToyEncoder(4, 6), mtnorm.TaskHeads({t: nn.Linear(6, 2) for t in TASKS}))
    model = mtnorm.convert(net, TASKS, norm="sigma")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "gamma", None), nn.Parameter):
                m.gamma.copy_(3 * torch.randn_like(m.gamma))
    return model


def hps_model() -> nn.Module:
    torch.manual_seed(0)
    return MultiTaskNet(ToyEncoder(4, 6), {t: nn.Linear(6, 2) for t in TASKS})


X = torch.randn(10, 4, generator=torch.Generator().manual_seed(3))


def test_representations_are_the_head_inputs_per_task():
    model = tssbn_model()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reps = task_representations(model, X)
    assert list(reps) == TASKS and all(r.shape == (10, 6) for r in reps.values())
    assert model.training  # flags restored; eval mode inside: no running-statistic update
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    model.eval()
    with torch.no_grad(), mtnorm.use_task(model, "b"):
        expected = model[0](X)
    assert torch.equal(reps["b"], expected)
    assert not torch.allclose(reps["a"], reps["b"])  # different gates, different representations
    hps = task_representations(hps_model(), X, tasks=["c", "a"])
    assert list(hps) == ["c", "a"] and torch.equal(hps["c"], hps["a"])  # hard sharing: one encoder


def test_feature_maps_are_flattened_and_models_without_heads_refused():
    torch.manual_seed(0)
    head = {t: nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 1)) for t in TASKS}
    conv = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), mtnorm.TaskHeads(head))
    model = mtnorm.convert(conv, TASKS, norm="sigma")
    reps = task_representations(model, torch.randn(5, 1, 4, 4))
    assert all(r.shape == (5, 48) for r in reps.values())
    with pytest.raises(ValueError, match="no mtnorm.TaskHeads"):
        representation_embedding(mtnorm.convert(ToyEncoder(4, 6), TASKS), X, method="pca")


def test_pca_is_exact_and_deterministic():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(30, 5, generator=gen, dtype=torch.float64) * torch.tensor([5.0, 3, 1, 0.5, 0.1])
    coords = pca_2d(feats)
    assert coords.shape == (30, 2) and np.array_equal(coords, pca_2d(feats))
    centred = (feats - feats.mean(0)).numpy()
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs(coords), np.abs(centred @ vt[:2].T), atol=1e-10)
    np.testing.assert_allclose(coords.std(0) * np.sqrt(30), s[:2], rtol=1e-10)  # variance order
    np.testing.assert_allclose(coords.mean(0), 0, atol=1e-10)
    # the sign rule: each axis's largest loading is positive, so a flipped input flips nothing else
    np.testing.assert_allclose(pca_2d(-feats), -coords, atol=1e-10)
    assert np.array_equal(pca_2d(torch.ones(4, 3)), np.zeros((4, 2)))  # constant: defined, zeros
    line = pca_2d(torch.arange(4.0)[:, None])
    assert line[:, 1].tolist() == [0.0] * 4 and np.ptp(line[:, 0]) > 0  # D = 1: one axis


@pytest.mark.parametrize("build", [tssbn_model, hps_model])
def test_pca_embedding_of_converted_and_hard_sharing_models(build):
    emb = representation_embedding(build(), X, method="pca")
    assert list(emb) == TASKS and all(e.shape == (10, 2) and e.dtype == np.float64 for e in emb.values())
    joint = np.concatenate([emb[t] for t in TASKS])
    np.testing.assert_allclose(joint.mean(0), 0, atol=1e-5)  # one embedding of all tasks together
    again = representation_embedding(build(), X, method="pca")
    assert all(np.array_equal(emb[t], again[t]) for t in TASKS)
    with pytest.raises(ValueError, match="unknown method"):
        representation_embedding(build(), X, method="umap")


def test_tsne_without_scikit_learn_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        representation_embedding(tssbn_model(), X)


def test_tsne_embedding_when_scikit_learn_is_installed():
    if not HAS_SKLEARN:  # the optional dependency is missing: the clear error, not a silent pass
        with pytest.raises(ImportError, match="pip install scikit-learn"):
            representation_embedding(tssbn_model(), X, seed=0)
        return
    emb = representation_embedding(tssbn_model(), X, seed=0)
    assert list(emb) == TASKS and all(e.shape == (10, 2) for e in emb.values())
    assert all(np.isfinite(e).all() for e in emb.values())
    again = representation_embedding(tssbn_model(), X, seed=0)
    assert all(np.allclose(emb[t], again[t]) for t in TASKS)  # seeded: reproducible
    with pytest.raises(ValueError, match="perplexity"):
        representation_embedding(tssbn_model(), X, perplexity=100.0)


@pytest.mark.parametrize("method", ["mtan", "mmoe", "cross_stitch"])
def test_architectures_give_each_task_its_own_head_input(method):
    from mtnorm.analysis.affinity import lookahead_affinity
    from mtnorm.models import ToyEncoder, build_method, linear_heads, make_toy

    torch.manual_seed(0)
    tasks = ("a", "b")
    x, y = make_toy(16, tasks)
    model = build_method(method, lambda norm: ToyEncoder(8, 6, norm), tasks, linear_heads(tasks, 6, 3),
                         example_input=x[:2])
    reps = task_representations(model, x)
    assert set(reps) == set(tasks) and all(r.shape == (16, 6) for r in reps.values())
    assert not torch.equal(reps["a"], reps["b"])  # each task reads its own mixture / attention
    loss = {t: torch.nn.functional.cross_entropy for t in tasks}
    z = lookahead_affinity(model, [(x, y)], loss, lr=0.1)
    assert z.shape == (2, 2) and torch.isfinite(z).all()
