"""PyFed: federated learning for Keras models over ZeroMQ.

The package's folders are its layers, each importing only those below it:

* ``pyfed.wire`` - the wire contract (``protocol``: messages, the plan, error codes and event
  kinds, every validation), ZeroMQ sockets (``transport``) and CurveZMQ keys and admission
  (``security``);
* ``pyfed.persistence`` - state files and the one atomic write (``files``), the run store and the
  background persister (``store``), TensorBoard events and summary.json (``tracking``);
* ``pyfed.learning`` - Keras models and their safe wire form (``model``), local training
  (``training``), datasets, partitions and shards (``data``);
* ``pyfed.federation`` - the round engine (``engine``) over a client pool (``pool``: the interface
  and the in-process pool; ``network``: the ZeroMQ pool), the two roles (``server``, ``client``),
  in-process simulation (``simulation``), admission (``registry``), aggregation arithmetic
  (``aggregate``) and the strategies (``strategy``);
* the entry points at the top: ``cli`` and ``config``, and the original PyFed API in
  ``components`` (FL_Server, FL_Client) and ``experiment`` (FL_Experiment).

``pyfed.ranges`` is the one range check every layer uses.
"""

__version__ = "0.1.0"
