"""The client side of ``relay connect``: a local listener whose connections (``tcp``)
or datagram flows (``udp``) become streams of a tunnel."""
