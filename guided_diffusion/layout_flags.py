"""Which flags a checkpoint's state-dict layout reveals, and the search for the flags that build it.

A UNet's or classifier's layout ({key: shape}) shows some flags directly (its width, the label
embedding's rows, the output channels); others only through the keys a model built with them
has, so they are searched; and some never change the layout (LAYOUT_FREE_FLAGS). checkpoints.py
stays generic: load_model_state uses suggest_flags to name the flags a mismatching checkpoint fits.
"""

import torch as th

from .checkpoints import layout_differences, layout_of
from .script_util import MODEL_KINDS

# Flags that leave the state-dict layout unchanged, so a checkpoint cannot reveal them.
LAYOUT_FREE_FLAGS = (
    "num_heads",
    "num_head_channels",
    "num_heads_upsample",
    "use_new_attention_order",
    "dropout",
    "use_fp16",
    "classifier_use_fp16",
    "use_checkpoint",
)
# Flags of the diffusion a model was trained with that sampling must repeat; no shape shows them.
_UNREADABLE_DIFFUSION_FLAGS = ("diffusion_steps", "noise_schedule", "predict_xstart", "rescale_timesteps")
# Layout-free flags that are choices of each run, not properties of the trained model.
_RUN_TIME_FLAGS = ("use_fp16", "classifier_use_fp16", "use_checkpoint")

# Values tried, one flag at a time, when searching for the flags a checkpoint was built with.
_CANDIDATES = {
    "image_size": (16, 32, 64, 128, 256, 512),
    "large_size": (16, 32, 64, 128, 256, 512),
    "num_res_blocks": (1, 2, 3, 4, 5, 6),
    "classifier_depth": (1, 2, 3, 4, 5, 6),
    "attention_resolutions": ("32,16,8", "16,8", "32,16", "16", "8", "64,32,16,8", ""),
    "classifier_attention_resolutions": ("32,16,8", "16,8", "32,16", "16", "8", "64,32,16,8", ""),
    "resblock_updown": (False, True),
    "classifier_resblock_updown": (False, True),
    "classifier_pool": ("adaptive", "attention", "spatial", "spatial_v2"),
}


def shape_flags(found, flags):
    """Flags that can be read directly off the checkpoint's shapes (found: {key: shape}); only names in flags."""
    out = {}
    width = found.get("time_embed.0.weight")
    for name in ("num_channels", "classifier_width"):
        if width and name in flags:
            out[name] = width[1]
    if "class_cond" in flags:
        out["class_cond"] = "label_emb.weight" in found
    classes = found.get("label_emb.weight") or found.get("out.2.c_proj.weight")  # UNet embedding, attention-pool head
    if "num_classes" in flags and classes:
        out["num_classes"] = classes[0]
        if "p_uncond" in flags and "label_emb.weight" in found:
            out.update(_null_class_flags(classes[0], flags))
    head = found.get("out.2.weight")
    if "learn_sigma" in flags and head and len(head) >= 3 and head[0] in (3, 6):
        out["learn_sigma"] = head[0] == 6
    emb, conv = found.get("input_blocks.1.0.emb_layers.1.weight"), found.get("input_blocks.1.0.in_layers.2.weight")
    for name in ("use_scale_shift_norm", "classifier_use_scale_shift_norm"):
        if name in flags and emb and conv:
            out[name] = emb[0] == 2 * conv[0]
    return out


def _null_class_flags(rows, flags):
    """num_classes and p_uncond of a label embedding with `rows` rows: one more than --num_classes is the
    null class of classifier-free guidance (any p_uncond > 0 builds it; 0.1 stands for them)."""
    if rows == flags["num_classes"] + 1:
        return {"num_classes": flags["num_classes"], "p_uncond": flags["p_uncond"] or 0.1}
    if rows == flags["num_classes"]:
        return {"p_uncond": 0.0}
    return {}


def suggest_flags(found, flags, build):
    """The flag values (that differ from `flags`) under which build(**flags) has the layout `found`.

    Values readable from shapes are inferred directly; the others are searched
    greedily, one flag at a time, keeping each change that brings the layout closer.
    Returns {} when no match is found.
    """
    current = dict(flags)
    current.update(shape_flags(found, flags))
    score = _distance(found, current, build)
    while score:
        scored = [(_distance(found, cand, build), i, cand) for i, cand in enumerate(_neighbours(current))]
        if not scored or min(scored)[0] >= score:
            return {}
        score, _, current = min(scored)
    return {k: v for k, v in current.items() if flags.get(k) != v}


def _neighbours(flags):
    for name, values in _CANDIDATES.items():
        if name in flags:
            for value in values:
                if value != flags[name]:
                    yield {**flags, name: value}


def _distance(found, flags, build):
    """Number of differing keys between `found` and the model build(**flags) (on the meta device)."""
    try:
        with th.device("meta"):
            expected = layout_of(build(**flags).state_dict())
    except Exception:  # an impossible combination of flags
        return float("inf")
    missing, unexpected, mis_shaped = layout_differences(expected, found)
    return len(missing) + len(unexpected) + len(mis_shaped)


def unreadable_flags(kind):
    """Flags of that kind ("diffusion", "super_res", "classifier") that no layout shows: the values the model
    was trained with must be passed."""
    defaults = MODEL_KINDS[kind][0]()
    names = [f for f in LAYOUT_FREE_FLAGS if f in defaults and f not in _RUN_TIME_FLAGS]
    if kind != "classifier":
        names += _UNREADABLE_DIFFUSION_FLAGS
    if kind == "super_res":
        names.append("small_size")  # only the forward pass's upsampling depends on it
    return names
