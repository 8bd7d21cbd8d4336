"""The live side of the gateway: who is connected (the registry), revoking what a key
authorised, the connect bindings agents hold, and the tunnel sessions and TCP hub ports
whose streams go to agents."""
