"""HTTP in the gateway: the small h11 server of the control API (:mod:`.server`), the
streaming reverse proxy engine (:mod:`.proxy`, compiled from its source), and what it
serves: HTTP tunnels ``/tunnel/{token}/...`` (:mod:`.tunnel_proxy`, compiled too) and
share links ``/s/{token}/...`` (:mod:`.share_proxy`)."""
