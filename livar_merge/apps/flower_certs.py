"""``livar-flower-certs OUT``: the credentials of a secure Flower deployment of LIVAR.

    livar-flower-certs creds --nodes 3 --san superlink.example.org

writes ``creds/`` with a CA (``ca.crt``, ``ca.key``), the SuperLink's TLS certificate
(``server.crt``, ``server.key``; subject alternative names ``127.0.0.1``, ``localhost``, ``::1``
and each ``--san``) and one authentication key pair per SuperNode (``supernode-<m>.key``,
``supernode-<m>.pub``), plus ``bundle.json`` (fingerprints, SANs, validity). Keep ``ca.key``
offline; give each SuperNode ``ca.crt`` and its own ``.key`` only. It then prints the
deployment's commands (:mod:`livar_merge.flower.certs` has the details).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from livar_merge.errors import LivarError
from livar_merge.flower.certs import DEFAULT_SANS, write_bundle


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="livar-flower-certs",
        description="Write a CA, the SuperLink's TLS certificate and SuperNode key pairs.",
    )
    parser.add_argument("out", type=Path, help="new folder for the credentials")
    parser.add_argument("--nodes", type=int, default=1, help="SuperNode key pairs (default 1)")
    parser.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="HOST",
        help="another address the SuperLink is reached at (IP or DNS name; repeatable)",
    )
    parser.add_argument(
        "--no-default-sans",
        action="store_true",
        help=f"leave out the loopback names {', '.join(DEFAULT_SANS)}",
    )
    parser.add_argument("--days", type=int, default=365, help="validity (default 365 days)")
    return parser


def next_steps(out: Path, nodes: int, address: str) -> list[str]:
    """The commands of the secure deployment with the credentials in ``out``."""
    o = out
    lines = [
        f"wrote the credentials to {out}/ (keep ca.key offline)",
        "SuperLink:",
        f"  flower-superlink --host 0.0.0.0 --port {address.rsplit(':', 1)[1]} "
        f"--ssl-ca-certfile {o}/ca.crt --ssl-certfile {o}/server.crt "
        f"--ssl-keyfile {o}/server.key --enable-supernode-auth",
        "register each SuperNode's public key (flwr CLI, root-certificates in its config.toml):",
    ]
    lines += [f"  flwr supernode register {o}/supernode-{m}.pub <federation>" for m in range(nodes)]
    lines.append("SuperNode m:")
    lines.append(
        f"  flower-supernode --superlink {address} --root-certificates {o}/ca.crt "
        f"--auth-supernode-private-key {o}/supernode-<m>.key "
        "--node-config 'partition-id=<m> num-partitions=<M>'"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Exit status 0; 2 for refused arguments or an existing folder."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sans = [*([] if args.no_default_sans else DEFAULT_SANS), *args.san]
    try:
        record = write_bundle(args.out, args.nodes, sans, args.days)
    except (LivarError, OSError) as err:
        print(f"livar-flower-certs: error: {err}", file=sys.stderr)
        return 2
    address = f"{sans[0]}:9092" if ":" not in sans[0] else f"[{sans[0]}]:9092"
    for line in next_steps(args.out, args.nodes, address):
        print(line)
    print(f"server certificate valid until {record['not_valid_after']} for {', '.join(sans)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
