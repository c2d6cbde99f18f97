"""The PD control channel: an authenticated connection whose every message is signed.

The connection starts with multiprocessing's HMAC challenge in both directions (the shared secret never
crosses the wire). After it, each message carries an HMAC-SHA256 over (direction, sequence number,
payload), checked before the payload is unpickled: a peer without the secret cannot inject, alter,
replay or reflect a message, so it can never make the other side unpickle its bytes. The secret does not
hide the traffic (request token ids, sampling parameters): use a private network or a tunnel for that.
"""

from __future__ import annotations

import hmac
import os
import pickle
import socket
import threading
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

HANDSHAKE_TIMEOUT_S = 10.0
_MAC = 32


class ChannelError(ConnectionError):
    pass


class Channel:
    def __init__(self, conn: Connection, key: bytes, is_coordinator: bool):
        self.conn, self.key = conn, key
        self._out, self._in = (b"c>w", b"w>c") if is_coordinator else (b"w>c", b"c>w")
        self._sent = self._received = 0

    def _mac(self, direction: bytes, number: int, payload: bytes) -> bytes:
        return hmac.new(self.key, direction + number.to_bytes(8, "big") + payload, "sha256").digest()

    def send(self, msg) -> None:
        payload = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        self.conn.send_bytes(self._mac(self._out, self._sent, payload) + payload)
        self._sent += 1

    def recv(self):
        data = self.conn.recv_bytes()
        mac, payload = data[:_MAC], data[_MAC:]
        if not hmac.compare_digest(mac, self._mac(self._in, self._received, payload)):
            raise ChannelError("a control message failed its signature check: the connection is not trusted")
        self._received += 1
        return pickle.loads(payload)

    def poll(self, timeout: float = 0.0) -> bool:
        return self.conn.poll(timeout)

    def fileno(self) -> int:
        return self.conn.fileno()

    def close(self) -> None:
        self.conn.close()


def handshake(sock: socket.socket, key: bytes, is_coordinator: bool,
              timeout_s: float = HANDSHAKE_TIMEOUT_S) -> Channel:
    """Authenticate a fresh connection both ways within `timeout_s`; a silent or wrong peer raises
    (ChannelError, EOFError or OSError) and is closed, and nothing else waits on it."""
    sock.settimeout(None)  # Connection reads the descriptor directly: it must block
    conn = Connection(sock.detach())
    timer = threading.Timer(timeout_s, lambda: _cut(conn))
    timer.start()
    try:
        if is_coordinator:
            deliver_challenge(conn, key)
            answer_challenge(conn, key)
        else:
            answer_challenge(conn, key)
            deliver_challenge(conn, key)
    except BaseException as e:
        conn.close()
        if not timer.is_alive():
            raise ChannelError(f"no handshake within {timeout_s:.0f} s") from None
        if isinstance(e, Exception) and not isinstance(e, (EOFError, OSError)):
            raise ChannelError(f"handshake failed: {e}") from None
        raise
    finally:
        timer.cancel()
    return Channel(conn, key, is_coordinator)


def _cut(conn: Connection) -> None:
    """Unblock a handshake that is waiting on a silent peer (shutdown wakes a blocked read; close may not)."""
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as dup:
            dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
