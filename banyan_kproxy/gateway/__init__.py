"""
The gateway role (``[gateway]``): the edge access tier, an mTLS ``CONNECT`` terminator.

Devices present a client certificate that chains to ``client_ca_file``; they may only
``CONNECT`` to the service domains registered in ``services``, each dialled at its
backend address ("backend DNS override"), optionally only by some client identities.
`banyan_kproxy.gateway.policy` decides and dials, `banyan_kproxy.gateway.audit`
turns tunnels into audit events, `banyan_kproxy.gateway.service` assembles the role.
The protocol itself is the shared `banyan_kproxy.connectserver`.
"""
