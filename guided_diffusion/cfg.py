"""Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598).

Training drops each example's label with probability p_uncond, replacing it by
an extra "null" class (index num_classes; the model's label embedding has
num_classes + 1 rows). Sampling mixes the conditional and unconditional
predictions of the same model:

    eps = (1 + w) eps(x, y) - w eps(x, null)          (Ho & Salimans, Eq. 6)

w = 0 is plain conditional sampling. Other libraries write the same mix as
eps(x, null) + s (eps(x, y) - eps(x, null)) with s = 1 + w.
"""

import torch as th


def drop_labels(y, p_uncond, null_label, generator=None):
    """y (N,) with each label replaced by null_label with probability p_uncond (torch's RNG or generator)."""
    if p_uncond <= 0:
        return y
    drop = th.rand(y.shape, generator=generator, device=y.device) < p_uncond
    return th.where(drop, th.full_like(y, null_label), y)


def label_dropout(data, p_uncond, null_label):
    """Wrap a (batch, cond) iterator so that cond["y"] goes through drop_labels."""
    for batch, cond in data:
        if "y" in cond:
            cond = {**cond, "y": drop_labels(th.as_tensor(cond["y"]), p_uncond, null_label)}
        yield batch, cond


def guided_model(model_fn, scale, null_label):
    """model_fn(x, t, y=..., **kwargs) mixed by classifier-free guidance of scale w = `scale`.

    The conditional and unconditional passes run as one batch of 2N. With learned
    variances (2C output channels for C input channels) only the first C channels,
    the mean's parametrisation (eps or x0), are mixed; the variance stays the
    conditional pass's.
    """

    def guided(x, t, y=None, **kwargs):
        if y is None:
            raise ValueError("classifier-free guidance needs labels y")
        both = {k: _twice(v, len(x)) for k, v in kwargs.items()}
        out = model_fn(th.cat([x, x]), th.cat([t, t]), y=th.cat([y, th.full_like(y, null_label)]), **both)
        cond, uncond = out[: len(x)], out[len(x) :]
        c = x.shape[1]
        mixed = (1 + scale) * cond[:, :c] - scale * uncond[:, :c]  # Ho & Salimans, Eq. 6
        return th.cat([mixed, cond[:, c:]], dim=1)

    return guided


def _twice(v, n):
    """A batch-shaped tensor kwarg (e.g. low_res) repeated for the two passes; anything else as it is."""
    if isinstance(v, th.Tensor) and v.ndim > 0 and v.shape[0] == n:
        return th.cat([v, v])
    return v


def has_null_class(model, num_classes):
    """Whether a class-conditional model's label embedding has the extra null row."""
    emb = getattr(model, "label_emb", None)
    return emb is not None and emb.num_embeddings == num_classes + 1
