"""``python -m parity_sandbox.cluster.launch ARGS``: Ray's ``ray`` command, unchanged but for
one thing: a loopback address (``--node-ip-address 127.0.0.1``, ``--address 127.0.0.1:PORT``)
stays loopback, so that the node's servers listen on loopback only (see
``parity_sandbox.cluster._ray.loopback_kept``). ``parity-sandbox node start`` runs it.
"""

from __future__ import annotations

import sys


def main() -> int:
    from ray.scripts.scripts import main as ray_main

    from parity_sandbox.cluster._ray import loopback_kept

    sys.argv[0] = "ray"
    with loopback_kept():
        ray_main()  # type: ignore[no-untyped-call]
    return 0


if __name__ == "__main__":
    sys.exit(main())
