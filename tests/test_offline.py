import socket

from conftest import is_loopback


def test_loopback_addresses_allowed():
    assert is_loopback(("127.0.0.1", 80))
    assert is_loopback(("::1", 80, 0, 0))
    assert is_loopback(("localhost", 8000))
    assert is_loopback("/tmp/some.sock")


def test_other_addresses_rejected():
    assert not is_loopback(("10.1.2.3", 80))
    assert not is_loopback(("pypi.org", 443))


def test_loopback_connection_works():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.create_connection(server.getsockname(), timeout=5)
    client.close()
    server.close()
