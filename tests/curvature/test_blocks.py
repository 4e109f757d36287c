"""Blocks for any architecture: layer_blocks and select_blocks resolve to leaf parameters,
each counted once (parametrized and tied weights, transformers, explicit mappings)."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from layerhessians.curvature import (
    LAYER_TYPES,
    block_dims,
    dense_matrix,
    hessian_operator,
    layer_blocks,
    select_blocks,
)
from layerhessians.curvature.blocks import FULL
from layerhessians.errors import UserError
from layerhessians.spectra import exact_spectrum, layer_spectra


def old_spectral_norm(module):
    return torch.nn.utils.spectral_norm(module)


def old_weight_norm(module):
    with warnings.catch_warnings():  # deprecated in favour of parametrizations.weight_norm
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.utils.weight_norm(module)


def names_of(model):
    return {id(p): n for n, p in model.named_parameters()}


def assert_leaves_once(model, blocks):
    """Every block lists trainable leaf parameters of the model; no leaf twice."""
    names = names_of(model)
    seen = [id(p) for params in blocks.values() for p in params]
    assert len(seen) == len(set(seen))
    for params in blocks.values():
        assert params and all(isinstance(p, nn.Parameter) and p.is_leaf and p.requires_grad
                              and id(p) in names for p in params)


# ----------------------------------------------------------------------------- layer_blocks
@pytest.mark.parametrize("wrap, leaves", [
    (parametrizations.spectral_norm, ["2.parametrizations.weight.original"]),
    (old_spectral_norm, ["2.weight_orig"]),
    (parametrizations.weight_norm, ["2.parametrizations.weight.original0",
                                    "2.parametrizations.weight.original1"]),
    (old_weight_norm, ["2.weight_g", "2.weight_v"]),
    (parametrizations.orthogonal, ["2.parametrizations.weight.original"]),
])
def test_layer_blocks_resolve_parametrized_weights_to_leaves(wrap, leaves):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), wrap(nn.Linear(5, 5)))
    blocks = layer_blocks(model)
    assert_leaves_once(model, blocks)
    names = names_of(model)
    assert list(blocks)[0] == "0.weight" and blocks["0.weight"] == [model[0].weight]
    (name, params), = list(blocks.items())[1:]
    assert [names[id(p)] for p in params] == leaves
    if len(leaves) == 1:
        assert name == leaves[0]
    else:  # named by what holds the leaves
        assert name in ("2.parametrizations.weight", "2.weight")


def test_layer_spectra_of_a_spectral_norm_layer_equal_its_exact_block_spectrum():
    # issue 11 kind 5: this raised "a parameter of the block is not a parameter of the model"
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(),
                          parametrizations.spectral_norm(nn.Linear(5, 3))).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.arange(10) % 3
    loss = nn.CrossEntropyLoss()
    blocks = layer_blocks(model)
    leaf = model[2].parametrizations.weight.original
    assert blocks["2.parametrizations.weight.original"] == [leaf]
    dims = block_dims(blocks)
    spectra = layer_spectra(model, loss, [(x, y)], iterations=max(dims.values()) + 16,
                            layer_method="slq")
    assert list(spectra) == [FULL, *blocks]
    for name, params in blocks.items():
        exact = exact_spectrum(hessian_operator(model, loss, [(x, y)], params=params))
        values = exact.nodes
        scale = np.abs(values).max()
        nodes = spectra[name].nodes
        assert spectra[name].dim == dims[name] == values.size
        for node in nodes:  # every Ritz value is an eigenvalue
            assert np.min(np.abs(values - node)) < 1e-8 * scale
        for value in values[np.abs(values) > 1e-6 * scale]:  # every non-zero one is found
            assert np.min(np.abs(nodes - value)) < 1e-8 * scale


class TiedLM(nn.Module):
    """Embedding and LM head share one Parameter."""

    def __init__(self, vocab=7, width=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def test_a_tied_weight_is_one_block_under_its_first_name():
    model = TiedLM()
    blocks = layer_blocks(model)
    assert list(blocks) == ["mix.weight", "embed.weight"]  # the head's weight is embed.weight
    assert blocks["embed.weight"] == [model.embed.weight]
    assert_leaves_once(model, blocks)
    by_type = select_blocks(model, types=(nn.Embedding, nn.Linear))
    assert list(by_type) == ["embed.weight", "mix.weight", "mix.bias"]
    by_module = select_blocks(model, types=(nn.Embedding, nn.Linear), group="module")
    assert list(by_module) == ["embed", "mix"]  # the head has nothing left of its own
    by_pattern = select_blocks(model, patterns=["head.*", "embed.*"])
    assert list(by_pattern) == ["embed.weight"]
    assert sum(block_dims(by_type).values()) == sum(p.numel() for p in model.parameters())


def test_frozen_parameters_are_skipped_and_layer_types_kept():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Conv2d(1, 1, 2))
    model[0].weight.requires_grad_(False)
    assert LAYER_TYPES == (nn.Conv2d, nn.Linear) and FULL == "full"
    assert list(layer_blocks(model)) == ["1.weight", "2.weight"]
    assert list(select_blocks(model, by="type")) == ["0.bias", "1.weight", "1.bias",
                                                     "2.weight", "2.bias"]
    assert select_blocks(model) == layer_blocks(model)


# ----------------------------------------------------------------------------- transformer
class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            for _ in range(2))
        self.head = nn.Linear(8, 3)


def test_transformer_blocks_by_type():
    model = TinyTransformer()
    blocks = select_blocks(model, types=(nn.MultiheadAttention, nn.Linear, nn.LayerNorm,
                                         nn.Embedding), group="module")
    expected = ["embed"]
    for i in range(2):
        expected += [f"layers.{i}.{m}" for m in ("self_attn", "linear1", "linear2",
                                                  "norm1", "norm2")]
    assert list(blocks) == expected + ["head"]
    attn = model.layers[0].self_attn
    assert blocks["layers.0.self_attn"] == [attn.in_proj_weight, attn.in_proj_bias,
                                            attn.out_proj.weight, attn.out_proj.bias]
    assert_leaves_once(model, blocks)
    assert sum(block_dims(blocks).values()) == sum(p.numel() for p in model.parameters())
    per_param = select_blocks(model, types=(nn.MultiheadAttention,))
    assert list(per_param) == [f"layers.{i}.self_attn.{n}" for i in range(2) for n in
                               ("in_proj_weight", "in_proj_bias", "out_proj.weight",
                                "out_proj.bias")]
    # the paper's layers see the attention's out_proj (a Linear) but not its in_proj
    assert "layers.0.self_attn.out_proj.weight" in layer_blocks(model)
    assert "layers.0.self_attn.in_proj_weight" not in layer_blocks(model)


def test_transformer_blocks_by_pattern():
    model = TinyTransformer()
    blocks = select_blocks(model, patterns={"attention": "layers.*.self_attn.*",
                                            "mlp": ["layers.*.linear1.*", "layers.*.linear2.*"],
                                            "layernorm": "layers.*.norm*"})
    assert list(blocks) == ["attention", "mlp", "layernorm"]
    names = names_of(model)
    assert {names[id(p)] for p in blocks["attention"]} == {
        f"layers.{i}.self_attn.{n}" for i in range(2)
        for n in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")}
    assert len(blocks["mlp"]) == 8 and len(blocks["layernorm"]) == 8
    assert_leaves_once(model, blocks)
    per_module = select_blocks(model, patterns=["layers.0.*weight"], group="module")
    assert list(per_module) == ["layers.0.self_attn", "layers.0.self_attn.out_proj",
                                "layers.0.linear1", "layers.0.linear2", "layers.0.norm1",
                                "layers.0.norm2"]


def test_a_pattern_matches_a_parametrized_weight_by_its_module_name():
    model = nn.Sequential(nn.Linear(2, 3), parametrizations.weight_norm(nn.Linear(3, 2)))
    blocks = select_blocks(model, patterns=["1.weight"])
    assert list(blocks) == ["1.parametrizations.weight"]
    assert blocks["1.parametrizations.weight"] == [model[1].parametrizations.weight.original0,
                                                   model[1].parametrizations.weight.original1]


# ----------------------------------------------------------------------------- mapping
def test_mapping_blocks_are_validated():
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2))
    blocks = select_blocks(model, mapping={"first": model[0], "w2": model[2].weight})
    assert blocks == {"first": [model[0].weight, model[0].bias], "w2": [model[2].weight]}
    other = nn.Linear(2, 2)
    cases = [
        ({"a": other.weight}, "not a leaf parameter of the model"),
        ({"a": model[0].weight, "b": [model[2].bias, model[0].weight]}, "an earlier block"),
        ({"a": [model[0].weight, model[0].weight]}, "appears twice"),
        ({"a": []}, "is empty"),
        ({"full": model[0].weight}, "reserved"),
        ({"a": other}, "not a module of the model"),
        ({"a": "0.weight"}, "parameters or modules"),
    ]
    for mapping, message in cases:
        with pytest.raises(UserError, match=message):
            select_blocks(model, mapping=mapping)
    model[2].bias.requires_grad_(False)
    with pytest.raises(UserError, match="frozen"):
        select_blocks(model, mapping={"a": model[2].bias})


def test_a_computed_weight_in_a_mapping_names_its_leaves():
    model = nn.Sequential(parametrizations.spectral_norm(nn.Linear(3, 2)))
    with pytest.raises(UserError, match=r"computed from 0\.parametrizations\.weight\.original"):
        select_blocks(model, mapping={"a": model[0].weight})


def test_bad_selections_are_refused():
    model = nn.Sequential(nn.Linear(2, 3))
    with pytest.raises(UserError, match="matches no trainable parameter"):
        select_blocks(model, patterns=["blocks.*.attn.*"])
    with pytest.raises(UserError, match="selected no trainable parameter"):
        select_blocks(model, types=(nn.LayerNorm,))
    with pytest.raises(UserError, match="only one of"):
        select_blocks(model, types=(nn.Linear,), patterns=["*"])
    with pytest.raises(UserError, match="by must be one of"):
        select_blocks(model, by="modules")
    with pytest.raises(UserError, match="does not use"):
        select_blocks(model, by="type", patterns=["*"])
    with pytest.raises(UserError, match="group"):
        select_blocks(model, by="type", group="layer")
    with pytest.raises(UserError, match="nn.Module classes"):
        select_blocks(model, types=("Linear",))
    with pytest.raises(UserError, match="an earlier block"):
        select_blocks(model, patterns={"a": "0.*", "b": "*.weight"})


def test_selected_blocks_drive_layer_spectra():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.arange(8) % 2
    loss = nn.CrossEntropyLoss()
    blocks = select_blocks(model, types=(nn.Linear, nn.LayerNorm), group="module")
    spectra = layer_spectra(model, loss, [(x, y)], iterations=40, layers=blocks,
                            layer_method="slq")
    for name, params in blocks.items():
        matrix = dense_matrix(hessian_operator(model, loss, [(x, y)], params=params))
        values = torch.linalg.eigvalsh(matrix).numpy()
        scale = np.abs(values).max()
        for node in spectra[name].nodes:
            assert np.min(np.abs(values - node)) < 1e-8 * scale
