"""Issue 21 items 14-16: Hugging Face transformers (tiny configs built here, float64, no
weights downloaded) through the engine, against dense float64 references."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from layerhessians.curvature import (
    BatchLoss,
    hessian_operator,
    layer_blocks,
    reference_matrix,
)
from layerhessians.errors import UserError
from layerhessians.spectra import layer_spectra
from references import dense_reference

transformers = pytest.importorskip("transformers")
V, T = 11, 6


def _dense(op):
    eye = torch.eye(op.dim, dtype=torch.float64)
    return torch.stack([op.matvec(eye[:, j]) for j in range(op.dim)], dim=1)


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=V, n_positions=8, n_embd=8, n_layer=1,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).double().eval()


def bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=12,
                                     max_position_embeddings=8, pad_token_id=0)
    return transformers.BertForMaskedLM(config).double().eval()


def llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1,
                                      intermediate_size=12, max_position_embeddings=8,
                                      pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(config).double().eval()


class Logits(nn.Module):
    """``model(ids).logits`` [B, T, V]: the (inputs, targets) route's model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).logits


def lm_loss(logits, targets):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       targets.reshape(-1))


def tokens(seed=1, batch=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, V, (batch, T), generator=g)


def test_gpt2_through_a_batch_loss_matches_the_dense_hessian():
    model = gpt2()
    assert model.config._attn_implementation == "sdpa"  # fused attention by default
    ids = [tokens(1), tokens(2)]
    block = model.transformer.h[0].attn.c_attn.weight
    loss = BatchLoss(lambda m, b: (m(b, labels=b).loss, b.shape[0] * (T - 1)))
    op = hessian_operator(model, loss, ids, params=[block])
    flat0 = block.detach().reshape(-1).clone()

    def mean_loss(flat):
        values = {"transformer.h.0.attn.c_attn.weight": flat.view_as(block)}
        total = sum(torch.func.functional_call(model, values, (b,), {"labels": b}).loss
                    * b.shape[0] * (T - 1) for b in ids)
        return total / sum(b.shape[0] * (T - 1) for b in ids)

    with sdpa_kernel([SDPBackend.MATH]):
        dense = torch.autograd.functional.hessian(mean_loss, flat0)
    assert torch.allclose(_dense(op), dense, atol=1e-10)


def test_layer_blocks_find_gpt2_conv1d_layers():
    names = list(layer_blocks(gpt2()))
    assert names == ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                     "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight",
                     "transformer.wte.weight"]  # the LM head, tied to the embedding


def test_exact_route_treats_conv1d_as_a_transposed_linear():
    model = Logits(gpt2())
    data = [(x[:, :-1], x[:, 1:]) for x in (tokens(1), tokens(2))]
    layers = {n: p for n, p in layer_blocks(model).items() if "h.0" in n}
    assert len(layers) == 4
    spectra = layer_spectra(model, lm_loss, data, kind="ggn", layers=layers, iterations=4,
                            layer_method="exact")
    for name, (param,) in layers.items():
        assert spectra.methods[name] == "exact"
        reference = torch.linalg.eigvalsh(reference_matrix(model, lm_loss, data, [param],
                                                           kind="ggn"))
        nodes = np.sort(np.asarray(spectra[name].nodes).reshape(-1))
        assert np.allclose(nodes, reference.numpy(), atol=1e-10)
        independent = torch.linalg.eigvalsh(dense_reference(model, lm_loss, data, "ggn",
                                                            [param], reduction="mean"))
        assert np.allclose(nodes, independent.numpy(), atol=1e-10)


@pytest.mark.parametrize("make", [gpt2, bert, llama])
def test_transformer_products_match_dense_references(make):
    model = Logits(make())
    data = [(x[:, :-1], x[:, 1:]) for x in (tokens(1), tokens(2))]
    blocks = list(layer_blocks(model).values())
    params = [blocks[1][0]] if len(blocks) > 1 else blocks[0]
    for kind in ("hessian", "ggn"):
        op = hessian_operator(model, lm_loss, data, params=params, kind=kind)
        assert torch.allclose(_dense(op), reference_matrix(model, lm_loss, data, params,
                                                           kind=kind), atol=1e-10)
        assert torch.allclose(_dense(op), dense_reference(model, lm_loss, data, kind, params,
                                                          reduction="mean"), atol=1e-10)


class TokenRows(nn.Module):
    """A language model whose loss rows are token positions: logits [B*T, V]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        logits = self.model(ids).logits
        return logits.reshape(-1, logits.shape[-1])


def test_token_position_loss_rows_map_to_their_examples():
    model = TokenRows(gpt2())
    data = [(x[:, :-1], x[:, 1:].reshape(-1)) for x in (tokens(1), tokens(2))]
    ce = nn.CrossEntropyLoss()
    param = model.model.transformer.h[0].mlp.c_proj.weight
    spectra = layer_spectra(model, ce, data, kind="ggn", layers={"proj": param},
                            iterations=4, layer_method="exact")
    reference = torch.linalg.eigvalsh(reference_matrix(model, ce, data, [param], kind="ggn"))
    assert spectra.methods["proj"] == "exact"
    assert np.allclose(np.sort(np.asarray(spectra["proj"].nodes).reshape(-1)),
                       reference.numpy(), atol=1e-10)
    op = hessian_operator(model, ce, data, params=[param])
    assert torch.allclose(_dense(op), reference_matrix(model, ce, data, [param]), atol=1e-10)
    assert torch.allclose(_dense(op), dense_reference(model, ce, data, params=[param],
                                                      reduction="mean"), atol=1e-10)
    independent = torch.linalg.eigvalsh(dense_reference(model, ce, data, "ggn", [param],
                                                        reduction="mean"))
    assert np.allclose(np.sort(np.asarray(spectra["proj"].nodes).reshape(-1)),
                       independent.numpy(), atol=1e-10)


def test_outputs_without_whole_rows_per_example_are_refused():
    class Ragged(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x).reshape(-1)[:-1].reshape(-1, 1)  # 2n - 1 rows for n examples

    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(11, 1, dtype=torch.float64)
    with pytest.raises(UserError, match="same number of rows for every example"):
        hessian_operator(Ragged().double(), nn.MSELoss(), [(x[:3], y[:5]), (x[3:], y[5:])])
