"""fairseq ``--user-dir``: importing this package registers SoftAdam with fairseq.

Empty until the fairseq adapter lands; pass ``--user-dir fairseq_plugins`` to
``fairseq-train`` to load it.
"""
