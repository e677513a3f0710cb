"""Status back to the user: agents' reports in etcd -> each policy's ``.status``.

``reports`` (what agents write), ``enforcement`` (pure: reports + intents ->
conditions and ``status.nodes``), ``validity`` (the ``Valid`` condition),
``flush_schedule`` (when a changed status may be written) and ``handover``
(the async shell that watches reports and patches policies).
"""
