"""``python -m p2p.client``: the same as the ``p2p-client`` command."""

from p2p.client.main import main

main()
