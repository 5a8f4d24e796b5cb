"""Mixed precision: half-precision conversion of the networks' convolutions."""

import torch.nn as nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def convert_module_to_f16(l):  # noqa: E741 (the original's parameter name)
    """Cast a convolution's weight and bias to float16 (other modules are left alone).

    Meant for `model.apply(...)`. Only convolutions are converted, as in the
    original: linear layers (the timestep projections), norms and embeddings stay
    float32, which is the layout of the released fp16 checkpoints.
    """
    _cast_conv(l, "half")


def convert_module_to_f32(l):  # noqa: E741
    """Undo convert_module_to_f16."""
    _cast_conv(l, "float")


def _cast_conv(module, method):
    if isinstance(module, _CONVS):
        module.weight.data = getattr(module.weight.data, method)()
        if module.bias is not None:
            module.bias.data = getattr(module.bias.data, method)()
