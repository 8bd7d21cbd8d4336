"""The application API behind ``/api/v1``, one module per feature: the Tunnels API
(:mod:`.tunnels`, its OpenAPI description, shares and webhooks), container services
(:mod:`.services`, with :mod:`.invoke`) and tasks (:mod:`.tasks`)."""
