"""Mixed precision: half-precision conversion of the networks and the fp16/bf16 trainer."""

import torch as th
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import logger
from .errors import UsageError

INITIAL_LOG_LOSS_SCALE = 20.0

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


# --------------------------------------------------------------------------- master parameters
#
# With fp16 the optimizer steps float32 "master" copies of the weights. As in the
# original, they are two flat tensors: every parameter with ndim <= 1 (biases,
# norms) in one, shaped (-1,), and every matrix or kernel in the other, shaped
# (1, -1). The optimizer state saved in opt*.pt has that layout.


def get_param_groups_and_shapes(named_model_params):
    """Split (name, param) pairs into [(ndim <= 1 pairs, -1), (ndim > 1 pairs, (1, -1))], in order.

    Each shape is what that group's flat master tensor is viewed as. The first is
    the int -1, not (-1,): the original writes `(-1)`, and code written for it may
    compare or unpack the shapes.
    """
    named_model_params = list(named_model_params)
    scalar_vector = [(n, p) for (n, p) in named_model_params if p.ndim <= 1]
    matrix = [(n, p) for (n, p) in named_model_params if p.ndim > 1]
    return [(scalar_vector, -1), (matrix, (1, -1))]


def make_master_params(param_groups_and_shapes):
    """Flat float32 copies of each group, as trainable parameters."""
    master_params = []
    for param_group, shape in param_groups_and_shapes:
        flat = _flatten_dense_tensors([p.detach().float() for (_, p) in param_group]).view(shape)
        master_params.append(nn.Parameter(flat, requires_grad=True))
    return master_params


def model_grads_to_master_grads(param_groups_and_shapes, master_params):
    """Copy the model's (fp16) gradients into the master parameters' (fp32) .grad."""
    for master_param, (param_group, shape) in zip(master_params, param_groups_and_shapes):
        master_param.grad = _flatten_dense_tensors([param_grad_or_zeros(p) for (_, p) in param_group]).view(shape)


def master_params_to_model_params(param_groups_and_shapes, master_params):
    """Copy the master values back into the model's (fp16) parameters."""
    for master_param, (param_group, _) in zip(master_params, param_groups_and_shapes):
        unflat = unflatten_master_params(param_group, master_param.view(-1))
        for (_, param), value in zip(param_group, unflat):
            param.detach().copy_(value)


def unflatten_master_params(param_group, master_param):
    return _unflatten_dense_tensors(master_param, [p for (_, p) in param_group])


def master_params_to_state_dict(model, param_groups_and_shapes, master_params, use_fp16):
    """A float32 state dict of the model with the values of `master_params`."""
    state_dict = model.state_dict()
    if use_fp16:
        for master_param, (param_group, _) in zip(master_params, param_groups_and_shapes):
            for (name, _), value in zip(param_group, unflatten_master_params(param_group, master_param.view(-1))):
                state_dict[name] = value
    else:
        for (name, _), value in zip(model.named_parameters(), master_params):
            state_dict[name] = value
    return state_dict


def state_dict_to_master_params(model, state_dict, use_fp16):
    """Master parameters holding the values of a state dict (inverse of the above)."""
    if use_fp16:
        named = [(name, state_dict[name]) for name, _ in model.named_parameters()]
        return make_master_params(get_param_groups_and_shapes(named))
    return [state_dict[name] for name, _ in model.named_parameters()]


def check_overflow(value):
    """True when value (a float or a 0-d tensor) is +inf, -inf or NaN: an fp16 step to skip."""
    # The original's test, kept verbatim: for a tensor it returns a bool tensor.
    return (value == float("inf")) or (value == -float("inf")) or (value != value)


def zero_master_grads(master_params):
    for param in master_params:
        param.grad = None


def zero_grad(model_params):
    for param in model_params:
        if param.grad is not None:
            param.grad.detach_()
            param.grad.zero_()


def param_grad_or_zeros(param):
    if param.grad is not None:
        return param.grad.data.detach()
    return th.zeros_like(param)


# --------------------------------------------------------------------------- trainer


class MixedPrecisionTrainer:
    """Backward and optimizer steps in float32, float16 with loss scaling, or bfloat16.

    use_fp16 (Micikevicius et al. 2018): float16 model weights, float32 master
    weights, and a dynamic loss scale 2^lg_loss_scale that grows by
    fp16_scale_growth per good step and halves on a step whose gradients
    overflow (that step is skipped). use_bf16: the forward runs under
    torch.autocast(bfloat16) and needs no loss scale.
    """

    def __init__(
        self,
        *,
        model,
        use_fp16=False,
        fp16_scale_growth=1e-3,
        initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE,
        use_bf16=False,
    ):
        if use_fp16 and use_bf16:
            raise UsageError("--use_fp16 and --use_bf16 exclude each other: pick one")
        self.model = model
        self.use_fp16 = use_fp16
        self.use_bf16 = use_bf16
        self.fp16_scale_growth = fp16_scale_growth
        self.model_params = list(self.model.parameters())
        self.master_params = self.model_params
        self.param_groups_and_shapes = None
        self.lg_loss_scale = initial_lg_loss_scale
        if self.use_fp16:
            self.param_groups_and_shapes = get_param_groups_and_shapes(self.model.named_parameters())
            self.master_params = make_master_params(self.param_groups_and_shapes)
            self.model.convert_to_fp16()

    def autocast(self):
        """The context the forward pass runs in: bfloat16 autocast, or nothing."""
        device_type = self.model_params[0].device.type
        return th.autocast(device_type=device_type, dtype=th.bfloat16, enabled=self.use_bf16)

    def zero_grad(self):
        # Freed rather than zeroed: backward then writes the gradients instead of adding to zeros.
        zero_master_grads(self.model_params)

    def backward(self, loss):
        if self.use_fp16:
            (loss * 2**self.lg_loss_scale).backward()
        else:
            loss.backward()

    def optimize(self, opt):
        """Step the optimizer; returns False when an fp16 step was skipped for overflow."""
        return self._optimize_fp16(opt) if self.use_fp16 else self._optimize_normal(opt)

    def _optimize_fp16(self, opt):
        logger.logkv_mean("lg_loss_scale", self.lg_loss_scale)
        model_grads_to_master_grads(self.param_groups_and_shapes, self.master_params)
        grad_norm, param_norm = self._compute_norms(grad_scale=2**self.lg_loss_scale)
        if check_overflow(grad_norm):
            self.lg_loss_scale -= 1
            logger.log(f"Found NaN, decreased lg_loss_scale to {self.lg_loss_scale}")
            zero_master_grads(self.master_params)
            return False
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        for p in self.master_params:
            p.grad.mul_(1.0 / 2**self.lg_loss_scale)
        opt.step()
        zero_master_grads(self.master_params)
        master_params_to_model_params(self.param_groups_and_shapes, self.master_params)
        self.lg_loss_scale += self.fp16_scale_growth
        return True

    def _optimize_normal(self, opt):
        grad_norm, param_norm = self._compute_norms()
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        opt.step()
        return True

    def _compute_norms(self, grad_scale=1.0):
        """Global L2 norms of the gradients (unscaled) and parameters, with one device sync."""
        with th.no_grad():
            params = th._foreach_norm(self.master_params)  # one kernel loop, not one call per tensor
            grads = th._foreach_norm([p.grad for p in self.master_params if p.grad is not None])
            param_norm = th.stack(params).double().square().sum().sqrt()
            grad_norm = th.stack(grads).double().square().sum().sqrt() if grads else th.zeros((), dtype=th.float64)
            grad_norm, param_norm = th.stack([grad_norm, param_norm.to(grad_norm.device)]).tolist()
        return grad_norm / grad_scale, param_norm

    def master_params_to_state_dict(self, master_params):
        return master_params_to_state_dict(self.model, self.param_groups_and_shapes, master_params, self.use_fp16)

    def state_dict_to_master_params(self, state_dict):
        return state_dict_to_master_params(self.model, state_dict, self.use_fp16)
