"""What one admitted client could still do after the first hardening (issue "Hardening II"): each
attack of the second adversarial review run through the wire, as a client would send it, against
a live server on loopback, with the expected behaviour asserted. ``pytest -s`` prints the figures.
"""

from __future__ import annotations

import json
import re
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


# --- 4 and 5. secure aggregation: bad unmasking shares, bad dealing, unchecked masked inputs ------------

def _secure_round(tmp_path, processes, shards, stages, *flags: str) -> tuple[str, dict]:
    """One securely aggregated round of the three sites and mallory, who runs ``stages`` (a lying
    ClientStages) through the wire; the server's log and the round's record."""
    def act(mallory, fit, weights):
        assert "secagg" in fit.body
        mallory.secure_aggregation("mallory", stages, fit)

    return mallory_round(processes, shards, tmp_path / "logs", act, "--epochs", "5", "--secure-aggregation",
                         "--round-timeout", "60", *flags, honest_sites=(1, 2, 3))


def test_unmasking_shares_its_owner_did_not_sign_are_refused_naming_the_sender_and_the_round_is_right(
        tmp_path, processes, shards):
    """The review's mallory revealed shares off by one: the server rebuilt wrong seeds, logged a sum
    over 101,807,646 examples (true: 1,059) and accepted a chance-level model, naming nobody; a rebuild
    that raised SecAggError instead stopped the server. Every share now carries its owner's
    signature: mallory's reveal is refused, naming it, and the others' shares rebuild the true sum."""
    from pyfed.federation.secure_aggregation import ClientStages

    class OffByOne(ClientStages):
        def answer(self, kind, server_round, body):
            kind, reply, arrays = super().answer(kind, server_round, body)
            if kind is MessageType.SECAGG_REVEAL:
                for owner, (which, share, signature) in reply["shares"].items():
                    if owner != "mallory":
                        value = int.from_bytes(protocol.unb64(share), "big") + 1
                        reply["shares"][owner] = [which, protocol.b64(value.to_bytes(66, "big")), signature]
            return kind, reply, arrays

    log, record = _secure_round(tmp_path, processes, shards, OffByOne("mallory"))
    assert record["dropped"]["mallory"].startswith("secagg_reveal: answer refused: mallory sent a share of site-")
    assert "did not sign" in record["dropped"]["mallory"]
    examples = 100 + sum(int(np.load(shards / f"client-{i}.npz")["y"].size) for i in (1, 2, 3))
    assert f"the weighted sum of 4 updates ({examples} examples) unmasked" in log  # mallory's input is in it, rightly
    assert record["refused"] is None and record["test_accuracy"] > 0.6
    assert "Traceback" not in log
    print(f"\nforged unmasking shares: refused, mallory named; the sum of 4 updates over {examples} examples, "
          f"test accuracy {record['test_accuracy']:.3f}")


def test_a_client_whose_signed_shares_rebuild_another_seed_than_it_committed_to_is_named_and_left_out(
        tmp_path, processes, shards):
    import os

    from pyfed.federation.secure_aggregation import ClientStages

    class Equivocator(ClientStages):
        def begin(self, *args, **kwargs):
            body = super().begin(*args, **kwargs)  # committed to one seed ...
            self._round._self_seed = os.urandom(32)  # ... deals and masks with another  # noqa: SLF001
            return body

    log, record = _secure_round(tmp_path, processes, shards, Equivocator("mallory"))
    (failed,) = record["failed_attempts"]
    assert failed["dropped"]["mallory"] == ("secure aggregation: its self-mask seed, rebuilt from the shares it "
                                            "signed, is not the one it committed to")
    assert record["clients"] == ["site-1", "site-2", "site-3"] and record["refused"] is None
    assert "Traceback" not in log


@pytest.mark.parametrize("forge, reason", [
    ("values", "coordinate(s) of the unmasked mean lie outside the clipping range [-1, 1]"),
    ("weight", "but the 4 clients in the sum declared"),
], ids=["values-shifted-2^26", "weight-forged"])
def test_a_masked_input_that_cannot_be_a_clipped_update_gets_the_round_refused_not_the_model_moved(
        tmp_path, processes, shards, forge, reason):
    """The review added 2^26 to each masked coordinate (the model moved by up to 1.95 a coordinate with
    --secagg-clip 1; test loss 20,084), and forged the weight coordinate (the sum became "2 examples"; a
    coordinate moved by 535.7; test loss 8.3e10); both models were accepted. Now the unmasked sum must
    weigh what the survivors declared and every coordinate of its mean must lie in the clipping range:
    the round's result is refused and the previous model kept. Who did it cannot be seen."""
    from pyfed.federation.secure_aggregation import ClientStages

    class Shifter(ClientStages):
        def answer(self, kind, server_round, body):
            kind, reply, arrays = super().answer(kind, server_round, body)
            if kind is MessageType.SECAGG_MASKED and arrays:
                vector = arrays[0].astype(np.uint64)
                ring = np.uint64(2**self._round.setup.ring_bits - 1)  # noqa: SLF001
                target = slice(0, -1) if forge == "values" else slice(-1, None)
                vector[target] = (vector[target] + np.uint64(2**26 if forge == "values" else 2**20)) & ring
                arrays = [vector.astype(arrays[0].dtype)]
            return kind, reply, arrays

    log, record = _secure_round(tmp_path, processes, shards, Shifter("mallory"))
    assert record["refused"].startswith("aggregation failed (secure aggregation: ") and reason in record["refused"]
    initial = float(re.search(r"global model before round 1: test loss [\d.]+, accuracy ([\d.]+)", log)[1])
    assert record["test_accuracy"] == pytest.approx(initial, abs=1e-4)  # the previous model, kept
    assert "Traceback" not in log
    print(f"\nmasked input forged ({forge}): the round's result refused ({record['refused'][:120]}...)")


# --- 6. one key, many ids, under secure aggregation ---------------------------------------------------------

def test_under_secure_aggregation_a_key_is_one_party_and_cannot_isolate_an_honest_site(tmp_path, processes, shards):
    """The review's sybils: one admitted key held many ids (--max-ids-per-key 4096); two of them
    accusing an honest site made it leave alone, attempt after attempt, until the round's model was
    exactly the attacker's; ejecting one site while sending zeros made the sum one site's update,
    which every client then received. Now one id of each key is asked a round: mallory's key holds two
    ids (both connected, both lying about site-1); the one asked leaves with the site it names, the two
    sites left are fewer than --secagg-min-clients 3, and the round ends without unmasking anything."""
    import threading

    import zmq

    from pyfed.federation.secure_aggregation import ClientStages
    from pyfed.wire.security import generate_keys
    from tests.integration.support import Peer, check_every_round_once, curve_client, free_port, start_server

    class Accuser(ClientStages):
        def answer(self, kind, server_round, body):
            if kind is MessageType.SECAGG_BOXES:  # every box opened; it says site-1's did not
                return MessageType.SECAGG_MASKED, {"attempt": body["attempt"], **self._input[2],
                                                   "bad_boxes": ["site-1"]}, []
            return super().answer(kind, server_round, body)

    keys = tmp_path / "keys"
    generate_keys(keys, 4)
    logdir, address = tmp_path / "logs", f"tcp://127.0.0.1:{free_port()}"
    server = start_server(processes, shards, logdir, address, "--rounds", "2", "--min-clients", "5", "--epochs", "3",
                          "--secure-aggregation", "--round-timeout", "60",
                          "--curve-secret-key", str(keys / "server.key_secret"), "--authorized-keys", str(keys))
    context = zmq.Context()
    finished: dict[str, object] = {}
    try:
        sybils = {cid: Peer(context, address, curve=(keys / "client-4.key_secret", keys / "server.key"))
                  for cid in ("mallory-a", "mallory-b")}
        for cid, peer in sybils.items():
            peer.join(cid)
        sites = [curve_client(processes, address, shards, keys, i) for i in (1, 2, 3)]

        def lie(cid: str, peer: Peer) -> None:
            fit = peer.receive(timeout_s=180, skip=(MessageType.EVALUATE,))
            finished[cid] = peer.secure_aggregation(cid, Accuser(cid), fit) if fit.type is MessageType.FIT else fit

        threads = [threading.Thread(target=lie, args=item, daemon=True) for item in sybils.items()]
        for thread in threads:
            thread.start()
        assert processes.wait(server, 300) == 0, processes.tail(server)
        for thread in threads:
            thread.join(30)
        for site in sites:
            assert processes.wait(site, 60) == 0, processes.tail(site)
    finally:
        context.destroy(linger=0)
    log = server.log_path.read_text()
    summary = check_every_round_once(logdir, 2)
    for record in summary["rounds"]:
        for attempt in record["failed_attempts"]:  # one id of mallory's key a round, never both
            assert len([cid for cid in attempt["selected"] if cid.startswith("mallory")]) == 1
        assert record["clients"] == [] and "fewer than the 3 a sum is unmasked for" in record["refused"]
    assert not re.search(r"the weighted sum of [0-2] updates", log)  # no sum of fewer than 3 was ever unmasked
    assert "the weighted sum of" not in log  # nor any sum, while the liar kept one site out
    assert "Traceback" not in log
    print(f"\none key, two lying ids: each round asked one of them; {len(summary['rounds'])} rounds ended without "
          f"unmasking a sum of fewer than 3 parties ({summary['rounds'][0]['refused'][:90]}...)")
