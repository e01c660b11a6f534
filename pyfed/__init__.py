"""PyFed: federated learning for Keras models over ZeroMQ.

The library's pieces, each in one module: ``protocol`` (the wire format), ``transport`` (ZeroMQ
sockets), ``aggregate`` and ``strategy`` (how updates combine), ``server`` and ``client`` (the two
roles), ``tracking`` (TensorBoard and summary.json), ``data`` (datasets and shards), ``config``
and ``cli``. ``pyfed.components`` keeps the original PyFed API (FL_Server, FL_Client).
"""

__version__ = "0.1.0"
