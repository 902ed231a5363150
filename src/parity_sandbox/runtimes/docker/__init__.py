"""The Docker runtime: one fresh, hardened container per task, through the Engine API.

- ``executor``: ``DockerExecutor``: preparation, images (pull policy, allow-list, import, the
  derived image with our init), warm containers, background removal, reaping.
- ``run``: one task's container, from take-or-create to removal (``Run``).
- ``daemon``: access to the daemon: its errors mapped to ours, best-effort calls, removal.
- ``pool``: warm containers per profile.
- ``spec``: a task's translation into a container (pure), with the hardened defaults.
- ``seccomp``: the containers' seccomp allow-list, and its variant for runsc.
- ``streams``: the attach-stream demultiplexer, input and output archives (pure).
- ``host``: ownership labels, cgroup usage, block devices, the ``/etc/hosts`` file.
- ``init`` (and ``init.c``): parity-init, process 1 of every container.
"""
