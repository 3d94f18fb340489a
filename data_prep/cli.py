"""`distill prep RECIPE [k=v...] [--ray-address ADDR] [--workers N]` and
`distill prep verify DIR`."""

from __future__ import annotations

import argparse

VERIFY_EPILOG = """\
also:
  distill prep verify DIR   re-hash the shards of DIR against its manifest.json and name
                            any that differ (exit 1) -- `verify` is taken as this action,
                            so a recipe file named `verify` must be given as ./verify
"""


def register(sub, add_recipe_args) -> None:
    p = sub.add_parser(
        "prep", help="tokenize and pack a corpus into WebDataset shards (Ray)",
        description="Tokenize the recipe's `prep.sources` with the teacher's tokenizer and\n"
                    "pack them into WebDataset shards with a manifest.json, in parallel on a\n"
                    "local Ray or a cluster. Reruns reuse the shards already finished.",
        epilog=VERIFY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(p)
    p.add_argument("--ray-address", default=None,
                   help="an existing Ray cluster (default: $RAY_ADDRESS, else a local Ray "
                        "on this machine's cores)")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray tasks in flight (default: prep.workers, else all CPUs); 0 runs "
                        "in this process without Ray")
    p.set_defaults(func=_prep)


def _prep(args: argparse.Namespace) -> int:
    if args.recipe == "verify":
        return _verify(args.overrides)
    from data_prep.run import run_prep

    recipe = args.load_recipe()
    manifest = run_prep(recipe.prep, recipe.teacher.path, ray_address=args.ray_address,
                        workers=args.workers)
    train, val = manifest["splits"]["train"], manifest["splits"]["validation"]
    print(f"{recipe.prep.output_dir}: {train['samples']} train and {val['samples']} "
          f"validation sequences of {manifest['seq_len']} tokens "
          f"({train['tokens'] + val['tokens']} tokens)")
    return 0


def _verify(rest: list[str]) -> int:
    from data_prep.errors import PrepError
    from data_prep.manifest import verify

    if len(rest) != 1:
        raise PrepError("usage: distill prep verify DIR (one prep output folder)")
    bad = verify(rest[0])
    if bad:
        print(f"{rest[0]}: {len(bad)} file(s) differ from manifest.json: {', '.join(bad)}")
        return 1
    print(f"{rest[0]}: ok")
    return 0
