"""Say what checkpoint files hold: a diffusion, super-resolution or classifier model (or its EMA weights),
or an optimizer state; their tensors, parameters and dtypes; which released checkpoint of the original
they match; and the flags to load them with (the README's for a released layout, else inferred from
the shapes)."""

import json
import sys

from guided_diffusion.cli import run
from guided_diffusion.errors import UserError
from guided_diffusion.flags import FlagParser
from guided_diffusion.released import describe, format_description


def main(argv=None):
    parser = FlagParser(description=__doc__)
    parser.add_argument("paths", nargs="+", metavar="FILE.pt", help="checkpoint files (local paths or blobfile URLs)")
    parser.add_argument("--json", action="store_true", help="print the descriptions as a JSON list")
    args = parser.parse_args(argv)
    descriptions, failed = [], False
    for path in args.paths:
        try:
            descriptions.append(describe(path))
        except UserError as exc:  # this file cannot be read: describe the others
            print(f"{parser.prog}: error: {exc}", file=sys.stderr)
            failed = True
    print(
        json.dumps(descriptions, indent=2)
        if args.json
        else "\n\n".join("\n".join(format_description(d)) for d in descriptions)
    )
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    run(main)
