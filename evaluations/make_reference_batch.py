"""Turn a folder of images or an .npz of images into a reference batch for evaluator.py: arr_0 (uint8
N x H x W x 3), the FID and sFID statistics (mu, sigma, mu_s, sigma_s) and the pool_3 activations, so the
Inception pass over the references runs once.

    python evaluations/make_reference_batch.py path/to/images ref_batch.npz --image_size 256
"""

import argparse

from guided_diffusion.cli import run
from guided_diffusion.evaluator import Evaluator, make_reference_batch
from guided_diffusion.flags import FlagParser


def main(argv=None):
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a folder of images (searched recursively) or an .npz with arr_0")
    parser.add_argument("out", help="the reference batch .npz to write")
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="center-crop folder images to this size, as training does (needed when sizes differ)",
    )
    parser.add_argument("--max_images", type=int, default=None, help="use at most this many images")
    parser.add_argument("--inception_path", default=None, help="Inception weights (see evaluator.py --help)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per Inception forward pass")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    args = parser.parse_args(argv)
    evaluator = Evaluator(args.inception_path, device=args.device, batch_size=args.batch_size)
    path = make_reference_batch(evaluator, args.source, args.out, args.image_size, args.max_images)
    print(f"wrote {path}")


if __name__ == "__main__":
    run(main)
