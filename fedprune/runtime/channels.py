"""gRPC channels to TFF workers: options, readiness, a clean close.

Used by `contexts.py` for the local worker and remote workers. Importing this
module is cheap: gRPC is imported by the functions that need it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

# The channel options of TFF's own executor factory: models and
# client datasets travel as single gRPC messages, far above gRPC's 4 MB default.
GRPC_MAX_MESSAGE_BYTES = 2 * 1000 * 1000 * 1000
CHANNEL_OPTIONS = (
    ("grpc.max_message_length", GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
)


class WorkerUnreachableError(ConnectionError):
    """A TFF worker address does not accept a gRPC connection."""


def open_channel(address: str):
    import grpc

    return grpc.insecure_channel(address, options=list(CHANNEL_OPTIONS))


def close_channel(channel) -> None:
    """Closes `channel` after its connectivity-polling thread has stopped.

    TFF's stub subscribes to connectivity for the channel's life; grpc polls it
    on a daemon thread, which dies with "Cannot invoke RPC: Channel closed!" (an
    unhandled thread exception on stderr) if the channel closes between two of
    its calls. Unsubscribed, the thread stops within one 0.2 s poll.
    """
    state = getattr(channel, "_connectivity_state", None)
    if state is not None and hasattr(channel, "_unsubscribe_all"):
        channel._unsubscribe_all()
        deadline = time.monotonic() + 1.0
        while getattr(state, "polling", False) and time.monotonic() < deadline:
            time.sleep(0.01)
    channel.close()


def wait_ready(channels: dict, timeout_s: float) -> list[str]:
    """Waits for all channels at once; returns the addresses not ready in time."""
    import grpc

    futures = {address: grpc.channel_ready_future(ch) for address, ch in channels.items()}
    deadline = time.monotonic() + timeout_s
    unreachable = []
    for address, future in futures.items():
        try:
            future.result(timeout=max(0.0, deadline - time.monotonic()))
        except grpc.FutureTimeoutError:
            future.cancel()
            unreachable.append(address)
    return unreachable


def unreachable_error(addresses: Sequence[str], timeout_s: float) -> WorkerUnreachableError:
    if len(addresses) == 1:
        what = f"TFF worker at {addresses[0]} is unreachable"
    else:
        what = f"TFF workers at {', '.join(addresses)} are unreachable"
    return WorkerUnreachableError(
        f"{what}: no gRPC connection within {timeout_s:g} s "
        "(start one there with `python -m fedprune.worker --port=PORT`)"
    )
