"""PyFed: federated learning for Keras models over ZeroMQ.

The library's pieces, each in one module: ``protocol`` (the wire format), ``transport`` (ZeroMQ
sockets and connection events), ``security`` (CurveZMQ keys and admission), ``aggregate`` and ``strategy`` (how updates combine), ``server`` and ``client`` (the two
roles), ``training`` (local training, shared with ``simulation``), ``tracking`` (TensorBoard and
summary.json), ``checkpoint`` (saved state and the server's per-round checkpoints), ``data`` (datasets, partitions and shards), ``config``
and ``cli``. ``pyfed.components`` and ``pyfed.experiment`` keep the original PyFed API
(FL_Server, FL_Client, FL_Experiment).
"""

__version__ = "0.1.0"
