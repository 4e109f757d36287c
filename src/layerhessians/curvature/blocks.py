"""The paper's "layers": the weight of every Conv2d and Linear module, in module order."""

from collections import OrderedDict

from torch import nn

from layerhessians.vocabulary import FULL  # noqa: F401  (re-exported: the whole Hessian's block name)

LAYER_TYPES = (nn.Conv2d, nn.Linear)


def layer_blocks(model: nn.Module) -> "OrderedDict[str, nn.Parameter]":
    """Ordered ``{parameter name: weight}`` of every Conv2d/Linear weight of ``model``.

    Names are the qualified parameter names (e.g. ``"conv1.weight"``), in the order of
    ``model.named_modules()``, which is the order the layers are defined (input to output).
    Biases, batch-norm affine parameters and frozen weights are not layer blocks.
    """
    blocks = OrderedDict()
    for module_name, module in model.named_modules():
        if isinstance(module, LAYER_TYPES) and module.weight.requires_grad:
            name = f"{module_name}.weight" if module_name else "weight"
            blocks[name] = module.weight
    return blocks
