"""The library's dense references (``reference_matrix``) against the independent ones of
tests/references.py (torch.func and plain torch, nothing from layerhessians), on every problem
of the shared registry and every kind; and the independent references against their
definitions."""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from layerhessians.curvature import KINDS, reference_matrix
from problems import CE, PROBLEMS, counter_examples, rel_error, zoo
from references import REFERENCE_KINDS, Setup, dense_reference, mean_loss

RTOL = 1e-10


def test_the_references_import_nothing_from_layerhessians():
    source = (Path(__file__).parents[1] / "references.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported and not any(name.split(".")[0] == "layerhessians" for name in imported)
    assert set(REFERENCE_KINDS) == set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_library_reference_is_the_independent_one(problem, kind):
    model, data = PROBLEMS[problem].build(sizes=(4, 5, 3))  # several unequal batches
    expected = dense_reference(model, CE, data, kind, reduction="mean")
    assert torch.linalg.norm(expected) > 0
    assert rel_error(reference_matrix(model, CE, data, kind=kind), expected) < RTOL
    # a parameter block, out of model order
    named = list(model.named_parameters())
    block = [named[-1][1], named[0][1]]
    assert rel_error(reference_matrix(model, CE, data, params=block, kind=kind),
                     dense_reference(model, CE, data, kind, block, reduction="mean")) < RTOL


@pytest.mark.parametrize("kind", ["hessian", "ggn", "residual"])
@pytest.mark.parametrize("sizes", [(10,), (6, 4)])
def test_library_reference_with_batch_statistics(sizes, kind):
    # bn_mode="train": each batch normalised by its own statistics, batches weighted by size
    model, data = PROBLEMS["conv"].build(sizes=sizes)
    expected = dense_reference(model, CE, data, kind, reduction="mean", bn_mode="train")
    assert rel_error(expected, dense_reference(model, CE, data, kind, reduction="mean")) > 1e-3
    got = reference_matrix(model, CE, data, kind=kind, bn_mode="train")
    assert rel_error(got, expected) < RTOL


@pytest.mark.parametrize("name", list(counter_examples()))
def test_library_reference_on_the_counter_examples(name):
    model, data, bn_mode = counter_examples()[name]
    for kind in ("hessian", "ggn"):
        expected = dense_reference(model, CE, data, kind, reduction="mean", bn_mode=bn_mode)
        got = reference_matrix(model, CE, data, kind=kind, bn_mode=bn_mode)
        assert rel_error(got, expected) < RTOL, kind


@pytest.mark.parametrize("name", ["LeNet", "ResNet18"])
def test_library_reference_on_the_zoo(name):
    model, data = zoo()[name]
    for kind in KINDS:
        expected = dense_reference(model, CE, data, kind, reduction="mean")
        assert rel_error(reference_matrix(model, CE, data, kind=kind), expected) < RTOL, kind


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_the_stated_loss_reduction(problem):
    model, data = PROBLEMS[problem].build()
    summed = nn.CrossEntropyLoss(reduction="sum")
    for kind in KINDS:
        mean = dense_reference(model, CE, data, kind, reduction="mean")
        assert rel_error(dense_reference(model, summed, data, kind, reduction="sum"),
                         mean) < RTOL
        assert rel_error(reference_matrix(model, summed, data, kind=kind), mean) < RTOL
        if kind != "ef":  # a wrongly stated reduction changes the matrix (ef: per example)
            wrong = dense_reference(model, CE, data, kind, reduction="sum")
            assert rel_error(wrong, mean) > 1e-3


@pytest.mark.parametrize("name", ["train-mode batch norm",
                                  "batch norm without running statistics", "layer norm",
                                  "GELU"])
def test_independent_hessian_agrees_with_forward_over_reverse(name):
    # the reference's double backward against another AD mode, where torch.func.hessian is
    # wrong in torch 2.13 (batch statistics, affine LayerNorm)
    model, data, bn_mode = counter_examples()[name]
    setup = Setup(model, None, data, "mean", bn_mode)
    forward_over_reverse = torch.func.jacfwd(torch.func.grad(mean_loss(setup, CE)))(setup.flat0)
    got = dense_reference(model, CE, data, "hessian", reduction="mean", bn_mode=bn_mode)
    assert rel_error(got, forward_over_reverse) < RTOL


def test_independent_empirical_fisher_refuses_batch_statistics():
    model, data = PROBLEMS["conv"].build()
    with pytest.raises(ValueError, match="batch statistics"):
        dense_reference(model, CE, data, "ef", reduction="mean", bn_mode="train")
