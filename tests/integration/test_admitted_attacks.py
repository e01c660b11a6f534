"""What one admitted client could still do after the first hardening (issue "Hardening II"): each
attack of the second adversarial review run through the wire, as a client would send it, against
a live server on loopback, with the expected behaviour asserted. ``pytest -s`` prints the figures.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from pyfed.wire import protocol
from pyfed.wire.protocol import Message, MessageType
from tests.integration.support import chunked_update, mallory_round
from tests.integration.support import update as _update

pytestmark = pytest.mark.integration


def _ready(fit: Message, weights) -> list:
    return protocol.encode(Message(MessageType.UPLOAD_READY, round=fit.round, client_id="mallory",
                                   body={"attempt": 1, "bytes": sum(w.nbytes for w in weights)}))


def _until_finished(mallory, every_s: float, action, limit_s: float = 120) -> float:
    """Do ``action()`` every ``every_s`` until the server ends the run (FINISH); the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        action()
        deadline = time.monotonic() + every_s
        while time.monotonic() < deadline:
            if mallory.socket.poll(50):
                message = protocol.decode(mallory.socket.recv_multipart())
                if message.type is MessageType.FINISH:
                    mallory.leave("mallory")
                    return time.monotonic() - started
    raise AssertionError(f"the run did not end within {limit_s}s")


# --- 1. an upload slot held --------------------------------------------------------------------------

def test_a_granted_client_that_says_ready_again_and_again_loses_its_slot_at_its_allowance(
        tmp_path, processes, shards):
    """The review kept round 1 open for 40 s and counting (round timeout 8 s) by repeating
    UPLOAD_READY every few seconds while holding the only slot. Now each repeat is answered with the
    grant, due when it first was: mallory is dropped 15 s (the grace; its update is 8 kB) after its
    grant, and the two sites, waiting in line, upload."""
    grants = []

    def act(mallory, fit, weights):
        mallory.send(_ready(fit, weights))
        grant = mallory.receive(timeout_s=30, skip=(MessageType.EVALUATE,))
        assert grant.type is MessageType.UPLOAD_GRANT
        grants.append(time.monotonic())
        held = _until_finished(mallory, 1.0, lambda: mallory.send(_ready(fit, weights)))
        print(f"\nmallory repeated UPLOAD_READY every 1 s while granted; the run ended {held:.1f}s after its grant")

    log, record = mallory_round(processes, shards, tmp_path / "logs", act, "--epochs", "20",
                                "--max-inflight-updates", "1", "--round-timeout", "60")
    assert record["clients"] == ["site-1", "site-2"]
    assert record["dropped"]["mallory"].startswith("its granted upload did not arrive within 15.")
    assert record["duration_s"] < 50  # not the round timeout (60 s), and not forever
    assert "Traceback" not in log


def test_chunks_dripped_slowly_do_not_extend_an_upload(tmp_path, processes, shards):
    """One chunk every 4 s, each well before any deadline of its own: the upload as a whole is due
    15 s after its grant and is dropped then; what mallory sends after that is not kept."""
    def act(mallory, fit, weights):
        mallory.send(_ready(fit, weights))
        grant = mallory.receive(timeout_s=30, skip=(MessageType.EVALUATE,))
        assert grant.type is MessageType.UPLOAD_GRANT
        drip = iter(chunked_update(fit, weights))
        _until_finished(mallory, 4.0, lambda: mallory.send(next(drip, _ready(fit, weights))))

    log, record = mallory_round(processes, shards, tmp_path / "logs", act, "--epochs", "20",
                                "--max-inflight-updates", "1", "--round-timeout", "60")
    assert record["clients"] == ["site-1", "site-2"]
    assert record["dropped"]["mallory"].startswith("its granted upload did not arrive within 15.")
    assert record["duration_s"] < 50
    assert "Traceback" not in log


# --- 2. int8 scales past the norm bound and DP clipping ---------------------------------------------

def _int8_update(fit: Message, weights, scale: float) -> list:
    """An int8 UPDATE whose every value is 127 at ``scale`` (its frames well-formed for the model)."""
    from pyfed.wire.compression import int8_blocks

    frames = []
    for w in weights:
        frames += [np.full(w.shape, 127, np.int8), np.full(int8_blocks(w.size), scale, np.float32)]
    return protocol.encode(Message(MessageType.UPDATE, round=fit.round, client_id="mallory", arrays=frames,
                                   body={"attempt": 1, "num_examples": 100, "fit_s": 0.1, "history": {},
                                         "encoding": "int8"}))


@pytest.mark.parametrize("scale, flags, reason", [
    (3e38, ("--max-update-norm", "5"),
     "array 0: an int8 scale of 3e+38 stands for values beyond float32 (at most 2.68e+36)"),
    (2.6e36, ("--dp-noise-multiplier", "0.3"),  # decodes to 3.3e38, finite in float32: the probe sees it
     "its update is unusable: its outputs on 64 test examples are not finite"),
], ids=["beyond-float32-norm-bound", "finite-but-unusable-dp"])
def test_an_int8_update_whose_scales_blow_up_is_refused_before_it_touches_a_clip_or_the_sum(
        tmp_path, processes, shards, scale, flags, reason):
    """The review's int8 update (q = 127, scale 3e38) decoded to infinity: the norm bound logged
    "norm inf; scaled to 5", clipping gave NaN, and every round's model was refused, while DP
    charged epsilon for each. Now each update is checked before it is folded or clipped: it is
    refused, mallory is dropped, and the round's model (the honest two's) is accepted."""
    def act(mallory, fit, weights):
        mallory.upload(_int8_update(fit, weights, scale))

    log, record = mallory_round(processes, shards, tmp_path / "logs", act, "--epochs", "20",
                                "--update-compression", "int8", *flags)
    assert record["dropped"] == {"mallory": f"answer refused: {reason}"}
    assert record["clients"] == ["site-1", "site-2"] and record["refused"] is None
    assert "norm inf" not in log and "refused the new global model" not in log
    if "--dp-noise-multiplier" in flags:
        assert record["privacy"]["epsilon"] > 0  # one release, of the honest two's noised mean
    else:
        assert record["test_accuracy"] > 0.8
    print(f"\nint8 scale {scale:g}: refused ({reason}); round accepted, test accuracy {record['test_accuracy']:.3f}")


# --- 3. a model half precision cannot hold ------------------------------------------------------------

def test_a_model_beyond_half_precision_is_broadcast_in_full_precision_and_the_server_never_exits(
        tmp_path, processes, shards):
    """--broadcast-compression fp16: mallory's finite update pushes an output bias past 65504 (its
    outputs stay finite, so the round's model is accepted). Publishing it raised CompressionError and
    the server exited 1 before the round was checkpointed. Now round 2's FIT goes out in float32 (no
    encoding field), said once; the honest sites train from it and the run ends."""
    seen = {}

    def act(mallory, fit, weights):
        weights = [w.astype(np.float32) for w in weights]  # what mallory got was half precision
        poisoned = [*weights[:-1], weights[-1] + np.float32(2e6)]  # 100 of 1,059 examples: a mean of 1.9e5
        mallory.upload(_update(fit.round, poisoned))
        fit2 = mallory.receive(timeout_s=120, skip=(MessageType.EVALUATE,))
        assert (fit2.type, fit2.round) == (MessageType.FIT, 2)
        seen["encoding"], seen["dtype"] = fit2.body.get("encoding"), fit2.arrays[-1].dtype
        seen["bias"] = float(np.abs(fit2.arrays[-1]).max())
        mallory.leave("mallory")

    log, _ = mallory_round(processes, shards, tmp_path / "logs", act, "--epochs", "5", "--rounds", "2",
                           "--broadcast-compression", "fp16")
    assert seen["encoding"] is None and seen["dtype"] == np.float32 and seen["bias"] > 65504
    assert log.count("cannot travel in fp16") == 1 and "sent in full precision" in log
    rounds = json.loads((tmp_path / "logs" / "summary.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and rounds[1]["clients"] == ["site-1", "site-2"]
    assert "Traceback" not in log
    print(f"\nround 2's model (an output bias of {seen['bias']:.3g}) went out in float32; the run finished")
