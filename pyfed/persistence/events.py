"""TensorBoard event files, written with TensorBoard's own protobufs and record framing: no TensorFlow.

TensorBoard reads these scalars exactly as it reads ``tf.summary.scalar``'s (float32 tensor
summaries carrying the scalars plugin's metadata, from ``scalar_pb``). Writing them without
TensorFlow matters with many clients: ``tf.summary`` cost ~1.4 ms a client a round plus a TF file
writer (and an open descriptor) per client for the whole run. Here a write builds its records in
memory, then opens the file, appends them and closes it: ~0.3 ms a client, no descriptor held
between rounds, and a failed write (a full disk, no free descriptor) loses only that write.
"""

from __future__ import annotations

import io
import itertools
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams.summary_v2 import hparams_pb
from tensorboard.plugins.histogram.summary_v2 import histogram_pb
from tensorboard.plugins.scalar.summary_v2 import scalar_pb
from tensorboard.plugins.text.summary_v2 import text_pb
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util.tensor_util import make_tensor_proto

FILE_VERSION = "brain.Event:2"
_HOST = socket.gethostname()  # part of every file name, as tf.summary names its files
# two files opened in the same second still get distinct names, in the order they were opened:
# TensorBoard reads a run's files in the order of their names, so the number is zero-padded
# (unpadded, a process's 10th file sorted before its 9th and its points were read out of order)
_file_numbers = itertools.count(1)


class EventFile:
    """One TensorBoard event file in ``directory`` (a run, in TensorBoard's terms), created on the
    first write; the directory is created then too."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._new_file()

    def _new_file(self) -> None:
        self.path = self.directory / (f"events.out.tfevents.{int(time.time()):010d}.{_HOST}."
                                      f"{os.getpid()}.{next(_file_numbers):06d}.v2")
        self._started = False

    def write_scalars(self, scalars: Iterable[tuple[str, float, int]]) -> None:
        """Append ``(tag, value, step)`` scalars; raises OSError if the file cannot be written."""
        self.write((scalar_pb(tag, float(value)), step) for tag, value, step in scalars)

    def write(self, summaries: Iterable[tuple[summary_pb2.Summary, int]]) -> None:
        """Append ``(summary, step)`` pairs (see the builders below); raises OSError if the file
        cannot be written."""
        now = time.time()
        events = [] if self._started else [event_pb2.Event(wall_time=now, file_version=FILE_VERSION)]
        events.extend(event_pb2.Event(wall_time=now, step=int(step), summary=summary) for summary, step in summaries)
        buffer = io.BytesIO()
        records = RecordWriter(buffer)
        for event in events:
            records.write(event.SerializeToString())
        try:
            if not self._started:  # the directory is made with the file, not checked on every write
                self.directory.mkdir(parents=True, exist_ok=True)
            # appended, never through a link: an event file that became a symlink is not written into
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
            with os.fdopen(os.open(self.path, flags, 0o644), "ab") as handle:
                handle.write(buffer.getvalue())
        except OSError:
            self._new_file()  # never append after a record a failed write may have cut short
            raise
        self._started = True


# --- what else TensorBoard shows, built from TensorBoard's own summary functions -----------------

def text(tag: str, markdown: str) -> summary_pb2.Summary:
    """The Text dashboard (markdown)."""
    return text_pb(tag, markdown)


def histogram(tag: str, values: Any, buckets: int = 30) -> summary_pb2.Summary:
    """The Histograms and Distributions dashboards."""
    return histogram_pb(tag, np.asarray(values, np.float64).reshape(-1), buckets=buckets)


def keras_model_graph(model_json: str, tag: str = "keras") -> summary_pb2.Summary:
    """The Graphs dashboard's conceptual graph of a Keras model, as the Keras TensorBoard callback
    writes it (the model's JSON under the ``graph_keras_model`` plugin)."""
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="graph_keras_model", content=b"1"))
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(
        tag=tag, metadata=metadata, tensor=make_tensor_proto(model_json.encode()))])


def hyperparameters(settings: dict[str, Any]) -> summary_pb2.Summary:
    """The HParams dashboard: the run's settings that are plain numbers, strings or booleans."""
    plain = {name: value for name, value in settings.items()
             if isinstance(value, (bool, int, float, str)) and not (isinstance(value, float) and not np.isfinite(value))}
    return hparams_pb(plain)
