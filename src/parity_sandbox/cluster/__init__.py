"""Distributed execution on a Ray cluster (extra ``[ray]``); the package imports nothing itself.

- ``_ray``: importing Ray, connecting to a cluster (a loopback address kept loopback), the
  names nodes and agents are known by, what a task needs of a node.
- ``agent``: ``NodeAgent``, the long-lived actor on each node that owns its executors and
  runs the chunks of tasks sent to it.
- ``executor``: ``RayExecutor``, the executor contract over a cluster.
- ``node``: ``parity-sandbox node start|stop``: a node that advertises what it can run.
- ``launch``: Ray's own ``ray`` command with a loopback address kept loopback.
"""
