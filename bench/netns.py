"""The bench's network namespaces: tests/support: NetnsPair with names
and addresses (10.78.0.0/24) of its own, so a bench and the tests can run
side by side."""

from __future__ import annotations

from tests import support as testing

CLIENT_IP, SERVER_IP = "10.78.0.1", "10.78.0.2"


class NetnsPair(testing.NetnsPair):
    def __init__(self) -> None:
        super().__init__(prefix="bkb", subnet="10.78.0")
