"""Layer 6, the cluster: the verification service as Ray Serve replicas.

Each replica owns a target, its sessions' KV caches and its own batch scheduler: a
``transport.server.SpecsplitServer`` that the face deploying it builds (``spec``: the
deployment as data). Serve places and scales the replicas; its gRPC proxy answers the
handshake, which names the replica's own session port (``replica``), and its HTTP proxy
serves the HTTP face (``@serve.ingress``). Sessions stream straight to their replica, so a
round costs what it costs against a plain server, and a session stays on its replica for its
whole life. ``router`` places a joined drafter on its session's replica and a new session
on a replica with room; ``autoscale`` scales on open sessions; ``metrics`` exports every
replica's counters as Ray metrics; ``launch`` starts or joins Ray and deploys. A replica
removed on purpose tells its sessions to move before it goes; a replica that dies breaks
their streams, and clients resume elsewhere from the token ids they hold.

Nothing below this layer imports it; it needs ``ray[serve]`` (``pip install specsplit[ray]``).
"""
