"""One DNS query from wherever it runs (a pod's namespace): ``python -m ciliary.lab.dnsprobe NAME SERVER``.

Prints ``{"rcode": "NOERROR", "ips": [...], "ttl": 30}`` as JSON and exits 0 when an
answer came (whatever its rcode), 2 when none came within ``--timeout``.
"""

from __future__ import annotations

import argparse
import json
import sys

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ciliary lab DNS probe")
    parser.add_argument("name")
    parser.add_argument("server")
    parser.add_argument("--tcp", action="store_true")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    query = dns.message.make_query(args.name, dns.rdatatype.A)
    try:
        ask = dns.query.tcp if args.tcp else dns.query.udp
        response = ask(query, args.server, timeout=args.timeout)
    except (dns.exception.Timeout, OSError) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 2
    ips = [rd.address for rrset in response.answer if rrset.rdtype == dns.rdatatype.A for rd in rrset]
    ttls = [rrset.ttl for rrset in response.answer]
    print(json.dumps({"rcode": dns.rcode.to_text(response.rcode()), "ips": ips, "ttl": min(ttls, default=0)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
