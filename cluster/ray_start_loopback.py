"""`ray start` for a node that joins a loopback-only head on this machine.

Run as `python cluster/ray_start_loopback.py start --address 127.0.0.1:<port>
--node-ip-address 127.0.0.1 ...` (the arguments of `ray start`).

Ray 2.60 has no listen-address setting and rewrites a loopback address to
the machine's own one, both the node's and the GCS address it joins
(ray._private.services.resolve_ip_for_localhost). Its only way around that,
clusters disabled (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, as start_local.sh
sets for the head), also refuses to start a worker node. So for the one
process that starts this node the rewrite is turned off, and the node,
like the head, listens on 127.0.0.1.
"""

import sys

from ray._private import services
from ray.scripts.scripts import main


def keep_the_address(host: str) -> str:
    return host


if __name__ == "__main__":
    services.resolve_ip_for_localhost = keep_the_address
    sys.argv[0] = "ray"
    sys.exit(main())
