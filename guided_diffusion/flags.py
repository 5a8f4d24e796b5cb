"""Command-line flags: every flag's one definition, and the parsers built from them.

Every flag is defined once, in a FlagGroup below: its name, default, help and value check.
The *_defaults() dicts of script_util, the scripts' parsers (parse_flags) and the factories'
keyword names all come from these groups (tests/test_script_util.py checks the factories).
"""

import argparse
import difflib
from dataclasses import dataclass, replace

from .errors import UsageError

NUM_CLASSES = 1000  # the original's ImageNet classes: the default of --num_classes


@dataclass(frozen=True)
class Flag:
    """A command-line flag; `check(value)` returns what is wrong with a parsed value, or None."""

    name: str
    default: object
    help: str
    check: object = None


def _at_least(low, strict=False):
    def check(value):
        if value < low or (strict and value == low):
            return f"must be {'above' if strict else 'at least'} {low}"
        return None

    return check


POSITIVE, NON_NEGATIVE = _at_least(0, strict=True), _at_least(0)


def _one_of(*choices):
    def check(value):
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _probability(value):
    return None if 0 <= value < 1 else "must be in [0, 1)"


def _ema_rates(value):
    try:
        rates = [float(x) for x in str(value).split(",") if x.strip()]
    except ValueError:
        return "must be comma-separated numbers, e.g. 0.9999 or 0.999,0.9999"
    return None if rates and all(0 <= r < 1 for r in rates) else "must be decay rates in [0, 1), e.g. 0.9999"


class FlagGroup:
    """An ordered set of flags; defaults() gives a fresh {name: default} dict."""

    def __init__(self, *flags):
        self.flags = flags

    def defaults(self):
        return {f.name: f.default for f in self.flags}

    def __iter__(self):
        return iter(self.flags)


DIFFUSION_FLAGS = FlagGroup(
    Flag("learn_sigma", False, "predict the variance too (interpolated, IDDPM Eq. 15); doubles the output channels"),
    Flag("diffusion_steps", 1000, "number of diffusion steps T used in training", check=POSITIVE),
    Flag("noise_schedule", "linear", "beta schedule: linear or cosine"),
    Flag("timestep_respacing", "", "steps to keep for sampling: '' (all), '250', '10,15,20' or 'ddim25'"),
    Flag("use_kl", False, "train on the variational bound (rescaled KL) instead of MSE"),
    Flag("predict_xstart", False, "the model predicts x_0 instead of the noise"),
    Flag("rescale_timesteps", False, "pass timesteps to the model scaled to 0..1000"),
    Flag("rescale_learned_sigmas", False, "use RESCALED_MSE: weight the vb term by T/1000"),
)

# Flags that the diffusion model and the classifier share (one value for both in classifier_sample.py).
_IMAGE_SIZE = Flag(
    "image_size", 64, "image resolution (16, 32, 64, 128, 256 or 512 with the default channel_mult)", check=POSITIVE
)
_NUM_CLASSES = Flag(
    "num_classes",
    NUM_CLASSES,
    "number of classes of a class-conditional model or classifier (beyond the original)",
    check=POSITIVE,
)

_MODEL_FLAGS = (
    _IMAGE_SIZE,
    Flag("num_channels", 128, "base width of the UNet (model_channels)", check=POSITIVE),
    Flag("num_res_blocks", 2, "residual blocks per resolution", check=POSITIVE),
    Flag("num_heads", 4, "attention heads (ignored when num_head_channels is set)"),
    Flag("num_heads_upsample", -1, "attention heads in the decoder; -1 means num_heads"),
    Flag("num_head_channels", -1, "channels per attention head; -1 means use num_heads"),
    Flag("attention_resolutions", "16,8", "comma-separated resolutions (in pixels) that get attention"),
    Flag("channel_mult", "", "comma-separated width multipliers per level; '' picks one from image_size"),
    Flag("dropout", 0.0, "dropout in the residual blocks", check=_probability),
    Flag("class_cond", False, "class-conditional model (label embedding)"),
    _NUM_CLASSES,
    Flag(
        "p_uncond",
        0.0,
        "classifier-free guidance: training replaces each label by a null class with this "
        "probability; > 0 gives the model the null class (label num_classes), so sample such a "
        "model with the same value (any > 0); 0: the original's layout",
    ),
    Flag("use_checkpoint", False, "gradient checkpointing: recompute activations in backward to save memory"),
    Flag("use_scale_shift_norm", True, "AdaGN: the timestep embedding scales and shifts the GroupNorm"),
    Flag("resblock_updown", False, "BigGAN-style residual blocks for up/downsampling"),
    Flag("use_fp16", False, "run the network body in float16"),
    Flag("use_new_attention_order", False, "split q, k, v before heads (QKVAttention) instead of after"),
)
MODEL_FLAGS = FlagGroup(*_MODEL_FLAGS)

CLASSIFIER_FLAGS = FlagGroup(
    _IMAGE_SIZE,
    Flag("classifier_use_fp16", False, "run the classifier body in float16"),
    Flag("classifier_width", 128, "base width of the classifier", check=POSITIVE),
    Flag("classifier_depth", 2, "residual blocks per resolution in the classifier", check=POSITIVE),
    Flag("classifier_attention_resolutions", "32,16,8", "resolutions (in pixels) with attention in the classifier"),
    Flag("classifier_use_scale_shift_norm", True, "AdaGN in the classifier's residual blocks"),
    Flag("classifier_resblock_updown", True, "BigGAN-style downsampling blocks in the classifier"),
    Flag("classifier_pool", "attention", "classifier head: adaptive, attention, spatial or spatial_v2"),
    _NUM_CLASSES,
)

SR_FLAGS = FlagGroup(
    Flag("large_size", 256, "output resolution of the super-resolution model", check=POSITIVE),
    Flag("small_size", 64, "input (low) resolution of the super-resolution model", check=POSITIVE),
)

# Flags of the training scripts (the original's names and defaults), and ours beyond them.
RUN_FLAGS = FlagGroup(
    Flag("log_dir", "", "where logs, checkpoints and outputs go ('' : $OPENAI_LOGDIR, else a new temporary folder)"),
    Flag(
        "compile",
        False,
        "compile the networks with torch.compile on their first call (for GPUs; on a CPU it "
        "took 100 s to save 4 percent); runs eagerly where no compiler works",
    ),
)

_LABEL_SOURCE = Flag(
    "label_source",
    "filename",
    "where a labeled image's class comes from: filename (its name's "
    "prefix, 'dog_123.png', as the original) or folder (its parent "
    "folder's name, 'dog/123.png')",
    check=_one_of("filename", "folder"),
)

TRAIN_FLAGS = FlagGroup(
    Flag("data_dir", "", "folder of training images ('' : the built-in toy shapes dataset)"),
    _LABEL_SOURCE,
    Flag("schedule_sampler", "uniform", "timestep sampler: uniform or loss-second-moment"),
    Flag("lr", 1e-4, "learning rate (AdamW)", check=NON_NEGATIVE),
    Flag("weight_decay", 0.0, "AdamW weight decay", check=NON_NEGATIVE),
    Flag(
        "lr_anneal_steps",
        0,
        "anneal the learning rate to 0 over this many steps, then stop (0: train until stopped)",
        check=NON_NEGATIVE,
    ),
    Flag("batch_size", 1, "images per step on each process", check=POSITIVE),
    Flag("microbatch", -1, "images per forward pass; -1 disables gradient accumulation"),
    Flag("ema_rate", "0.9999", "comma-separated EMA decay rates, one ema_*.pt file each", check=_ema_rates),
    Flag("log_interval", 10, "steps between log dumps", check=POSITIVE),
    Flag("save_interval", 10000, "steps between checkpoints", check=POSITIVE),
    Flag("resume_checkpoint", "", "modelNNNNNN.pt to resume from (its ema_* and opt files are found beside it)"),
    Flag("use_fp16", False, "train in float16 with a float32 master copy and dynamic loss scaling"),
    Flag("fp16_scale_growth", 1e-3, "log2 growth of the fp16 loss scale per step"),
    Flag("use_bf16", False, "train under bfloat16 autocast (no loss scale)"),
    Flag("seed", -1, "seed the run's random number generators (-1: unseeded)"),
)

CLASSIFIER_TRAIN_FLAGS = FlagGroup(
    Flag("data_dir", "", "folder of labeled training images ('' : the built-in toy shapes dataset)"),
    Flag("val_data_dir", "", "folder of labeled validation images (with the toy dataset: a held-out toy set)"),
    _LABEL_SOURCE,
    Flag("noised", True, "train on noised images x_t (the guidance classifier) instead of clean ones"),
    Flag("iterations", 150000, "optimizer steps in total", check=NON_NEGATIVE),
    Flag("lr", 3e-4, "learning rate (AdamW)", check=NON_NEGATIVE),
    Flag("weight_decay", 0.0, "AdamW weight decay", check=NON_NEGATIVE),
    Flag("anneal_lr", False, "anneal the learning rate linearly to 0 over the iterations"),
    Flag("batch_size", 4, "images per step on each process", check=POSITIVE),
    Flag("microbatch", -1, "images per forward pass; -1 disables gradient accumulation"),
    Flag("schedule_sampler", "uniform", "timestep sampler for the noise levels"),
    Flag("resume_checkpoint", "", "modelNNNNNN.pt to resume from (its opt file is found beside it)"),
    Flag("log_interval", 10, "steps between log dumps", check=POSITIVE),
    Flag("eval_interval", 5, "steps between validation batches", check=POSITIVE),
    Flag("save_interval", 10000, "steps between checkpoints", check=POSITIVE),
    Flag("use_bf16", False, "train under bfloat16 autocast"),
    Flag("seed", -1, "seed the run's random number generators (-1: unseeded)"),
)

SAMPLE_FLAGS = FlagGroup(
    Flag("clip_denoised", True, "clip the predicted x_0 to [-1, 1] at every step"),
    Flag("num_samples", 10000, "number of images to generate (over all processes)", check=POSITIVE),
    Flag("batch_size", 16, "images per batch on each process", check=POSITIVE),
    Flag("use_ddim", False, "sample with DDIM (use with --timestep_respacing ddimN) instead of DDPM"),
    Flag(
        "sampler",
        "",
        "ddpm, ddim, dpm++2m (DPM-Solver++ 2M, the fast one), dpm++3m or dpm++2m_sde "
        "('' : ddim with --use_ddim True, else ddpm, as the original)",
    ),
    Flag(
        "sampling_steps",
        0,
        "model evaluations per sample: for ddpm/ddim the same as --timestep_respacing N; "
        "for the dpm++ solvers taken from the diffusion's timesteps (0: 20)",
    ),
    Flag("step_schedule", "time", "dpm++ solvers: space the steps uniformly in time (time) or in log-SNR (logsnr)"),
    Flag(
        "dynamic_threshold",
        0.0,
        "dpm++ solvers: clip x_0 per sample at this percentile of abs(x_0) and "
        "rescale (Imagen's dynamic thresholding, e.g. 0.995) instead of clipping to "
        "[-1, 1]; 0: off",
    ),
    Flag(
        "cfg_scale",
        0.0,
        "classifier-free guidance weight w: eps = (1 + w) eps(x, y) - w eps(x, null) "
        "(Ho & Salimans 2022; other libraries' guidance scale s is 1 + w); needs a model trained "
        "with --p_uncond > 0; 0: off",
    ),
    Flag("model_path", "", "the diffusion model checkpoint"),
    Flag(
        "seed",
        -1,
        "seed of per-sample random generators: the same images for any batch size or number of "
        "processes (-1: unseeded, torch's global RNG as in the original)",
    ),
    Flag("balanced_classes", False, "target class of sample i is i mod num_classes instead of random"),
)

GUIDANCE_FLAGS = FlagGroup(
    Flag("classifier_path", "", "the noisy classifier checkpoint"),
    Flag("classifier_scale", 1.0, "guidance scale s: the classifier gradient is multiplied by s (ADM, Alg. 1 and 2)"),
)

SUPER_RES_SAMPLE_FLAGS = FlagGroup(
    Flag("base_samples", "", "npz of low-resolution samples (arr_0 uint8 NHWC, arr_1 labels) to upsample")
)

NLL_FLAGS = FlagGroup(
    Flag("data_dir", "", "folder of images to evaluate ('' : the built-in toy shapes dataset)"),
    _LABEL_SOURCE,
    Flag("clip_denoised", True, "clip the predicted x_0 to [-1, 1]"),
    Flag("num_samples", 1000, "number of images to evaluate", check=POSITIVE),
    Flag("batch_size", 1, "images per batch on each process", check=POSITIVE),
    Flag("model_path", "", "the diffusion model checkpoint"),
    Flag("seed", -1, "seed of the noise draws (-1: unseeded)"),
)

_ALL_GROUPS = (
    DIFFUSION_FLAGS,
    MODEL_FLAGS,
    CLASSIFIER_FLAGS,
    SR_FLAGS,
    RUN_FLAGS,
    TRAIN_FLAGS,
    CLASSIFIER_TRAIN_FLAGS,
    SAMPLE_FLAGS,
    GUIDANCE_FLAGS,
    SUPER_RES_SAMPLE_FLAGS,
    NLL_FLAGS,
)
# Each name's Flag as the model, classifier and diffusion groups define it (the first group wins):
# defaults dicts get their help text and checks from here.
FLAG_BY_NAME = {f.name: f for group in reversed(_ALL_GROUPS) for f in group}


# --------------------------------------------------------------------------- argparse


def flags_of(*groups):
    """{name: Flag} of FlagGroups and {name: default} dicts; a later group's flag replaces an earlier one's.

    A dict's flags take their help text and check from the model, classifier and diffusion groups.
    """
    flags = {}
    for group in groups:
        if isinstance(group, dict):
            group = [
                replace(FLAG_BY_NAME.get(name, Flag(name, value, "")), default=value) for name, value in group.items()
            ]
        flags.update((flag.name, flag) for flag in group)
    return flags


def add_flags(parser, flags):
    """Add each Flag of {name: Flag} as --name, typed by its default, its help ending with the default."""
    for flag in flags.values():
        value = flag.default
        v_type = str if value is None else str2bool if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{flag.name}", default=value, type=_checked(v_type, flag.check), help=help_text(flag))


def _checked(v_type, check):
    """argparse type: v_type, then the flag's check; argparse names the flag in the error."""
    if check is None:
        return v_type

    def parse(text):
        value = v_type(text)
        problem = check(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text!r}")
        return value

    parse.__name__ = v_type.__name__  # argparse's message for a value v_type rejects names this
    return parse


def help_text(flag):
    """A flag's --help text: its description, then its default once ('%' escaped for argparse)."""
    text = f"{flag.help} (default: {flag.default!r})" if flag.help else f"default: {flag.default!r}"
    return text.replace("%", "%%")


def add_dict_to_argparser(parser, default_dict):
    """Add a --flag for every key, typed by its default (bools take yes/no/true/false/1/0)."""
    add_flags(parser, flags_of(default_dict))


def args_to_dict(args, keys):
    return {k: getattr(args, k) for k in keys}


def str2bool(v):
    """argparse type for booleans: yes/no, true/false, t/f, y/n, 1/0 (any case)."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r} (use true/false)")


# --------------------------------------------------------------------------- the scripts' command lines


def parse_flags(description, *groups, argv=None):
    """Parse --flags defined by the given FlagGroups or defaults dicts (later ones win).

    A flag defined in two groups takes its default and help text from the later one,
    so each script's --help shows the text that belongs to it. The names given on the
    command line are kept for given_flags(args).
    """
    flags = flags_of(RUN_FLAGS, *groups)
    parser = FlagParser(description=description)
    add_flags(parser, flags)
    args = parser.parse_args(argv)
    args._given = given_names(flags, argv)
    return args


def given_names(flags, argv=None):
    """The flag names that appear on the command line argv (sys.argv[1:] when None)."""
    parser = FlagParser()
    for name in flags:
        parser.add_argument(f"--{name}", default=argparse.SUPPRESS)  # absent flags stay out of the namespace
    return frozenset(vars(parser.parse_known_args(argv)[0]))


def given_flags(args):
    """The names of the flags given on the command line (empty for args not made by parse_flags)."""
    return getattr(args, "_given", frozenset())


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UsageErrors, so that cli.run() prints them once for all ranks."""

    def error(self, message):
        usage = self.format_usage()
        if usage.count("\n") > 4:  # dozens of flags: the usage would bury the message
            usage = f"usage: {self.prog} [--flag value ...] (every flag: {self.prog} --help)\n"
        raise UsageError(message + self._did_you_mean(message), usage=usage)

    def _did_you_mean(self, message):
        """For misspelt flags, the closest known ones."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        known = [option for action in self._actions for option in action.option_strings]
        hints = []
        for word in message.split(":", 1)[1].split():
            close = difflib.get_close_matches(word.split("=")[0], known, n=1) if word.startswith("-") else []
            hints += [f"{close[0]} for {word}"] if close else []
        return f"; did you mean {', '.join(hints)}?" if hints else ""
