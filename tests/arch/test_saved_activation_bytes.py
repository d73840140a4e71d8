"""benchmarks/_memory.saved_activation_bytes on graphs whose saved tensors are known by hand."""

import importlib.util
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "_memory.py"
_spec = importlib.util.spec_from_file_location("bench_memory", _PATH)
_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_memory)
saved_activation_bytes = _memory.saved_activation_bytes

F32 = 4  # bytes per float32


def _inputs(x_grad: bool, w_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(4, 3, requires_grad=x_grad), torch.randn(3, 5, requires_grad=w_grad)


def test_mm_then_relu_saves_both_operands_and_the_relu_output():
    # MmBackward saves mat2 (w, for x's gradient) and self (x, for w's gradient); ReluBackward saves its
    # result y [4, 5] (threshold_backward reads it); sum saves nothing (its backward needs the shape only)
    x, w = _inputs(True, True)
    got = saved_activation_bytes(lambda: (x @ w).relu().sum().backward())
    assert got == (4 * 3 + 3 * 5 + 4 * 5) * F32 == 188
    assert x.grad is not None and w.grad is not None  # fn really ran, backward included


def test_mm_saves_only_what_the_required_gradients_need():
    x, w = _inputs(False, True)  # an input batch: only w's gradient, which needs x
    assert saved_activation_bytes(lambda: (x @ w).relu()) == (4 * 3 + 4 * 5) * F32
    x, w = _inputs(True, False)  # only x's gradient, which needs w
    assert saved_activation_bytes(lambda: (x @ w).relu()) == (3 * 5 + 4 * 5) * F32
    x, w = _inputs(False, False)  # no graph, nothing saved
    assert saved_activation_bytes(lambda: (x @ w).relu()) == 0


def test_excluded_tensors_are_not_counted():
    x, w = _inputs(True, True)
    got = saved_activation_bytes(lambda: (x @ w).relu(), exclude=[w])  # w as a parameter
    assert got == (4 * 3 + 4 * 5) * F32


def test_a_storage_saved_twice_counts_once():
    x, _ = _inputs(True, False)
    # MulBackward saves self and other, here the same tensor x: one storage of 48 bytes
    assert saved_activation_bytes(lambda: x * x) == 4 * 3 * F32
    # ExpBackward saves its result a; MulBackward saves two views of a: a's storage, once, whole
    assert saved_activation_bytes(lambda: (lambda a: a[:2] * a[2:])(x.exp())) == 4 * 3 * F32
    # r = relu(x) is saved by ReluBackward (its result) and by MmBackward (self, for w's gradient):
    # counted once, next to w (mat2, for r's gradient)
    x, w = _inputs(True, True)
    assert saved_activation_bytes(lambda: x.relu() @ w) == (4 * 3 + 3 * 5) * F32
