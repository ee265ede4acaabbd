"""Which weight-sync failures the orchestrator treats as a lost engine (rebuild the group, resend)."""

from mopd_ray.recovery import _peer_lost


def test_lost_peer_errors_are_recognised_and_others_are_not():
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:12936. "
                        "This is typically caused by a remote worker crashing.")
    assert _peer_lost(gloo)
    assert _peer_lost(RuntimeError("Connection reset by peer"))
    assert not _peer_lost(RuntimeError("size mismatch for model.layers.0.mlp.up_proj.weight"))
    assert not _peer_lost(ValueError("bucket 3 has 12 tensors, expected 11"))
